#!/usr/bin/env bash
# The GPU check in one command: the GPU-marked tests and the benchmarks on CUDA, then a results block to paste
# into benchmarks/RESULTS.md. Under 8 minutes on one H100 or H200: the steps' time limits add up to 8 minutes
# (a step that runs out is reported as exit 124 and the rest still run; not yet run on a GPU).
#
#   bash benchmarks/gpu.sh                        # on a GPU machine
#   bash benchmarks/gpu.sh --device cpu --tiny    # the same steps on tiny shapes on CPU, about a minute (CI runs
#                                                 # this form: tests/test_benchmarks.py)
#
# Steps: `pytest -m gpu` (fused log-probs and greedy sampling on CUDA); sampler.py against
# transformers generate at the Llama-3.2-1B shape, bf16, batch 1 and 64, with the share of
# HBM bandwidth at batch 1; logprobs.py, the fused op against the naive one at V = 128256, 16k tokens, D = 4096,
# bf16 (and Liger-Kernel when it imports); dpo.py, one DPO step against TRL's DPOTrainer at the 1B shape
# (tokens/s, peak memory, MFU); with two GPUs visible, train_dpo.py on 2 ranks (FSDP2, NCCL) equal to 1.
#
# Needs python3 with torch (CUDA), transformers, safetensors, datasets, tqdm and pytest. TRL (+ accelerate) and
# liger-kernel are optional: without them their comparisons say "skipped" and why. On a machine that cannot reach
# a package index (the project's lent H200 image has torch, transformers, accelerate, matplotlib, tensorboard and
# pytest, but not datasets, TRL or Liger-Kernel), fetch wheels once beside the checkout and carry them:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 trl==1.16.0 liger-kernel==0.8.5
# and there (the device tool: carry [".whl"], timeout_s 600, which leaves room for the machine's start):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl &&
#   export PYTHONPATH=/tmp/site && bash benchmarks/gpu.sh 2>&1 | tee $OUT/gpu.log
set -u
DEVICE=cuda TINY=0
while [ $# -gt 0 ]; do
    case "$1" in
        --device) DEVICE=$2; shift 2 ;;
        --tiny) TINY=1; shift ;;
        *) echo "usage: bash benchmarks/gpu.sh [--device cuda|cpu] [--tiny]" >&2; exit 2 ;;
    esac
done
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python3}
LOG=$(mktemp -d)
trap 'rm -rf "$LOG"' EXIT
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 HF_DATASETS_DISABLE_PROGRESS_BARS=1 TOKENIZERS_PARALLELISM=false \
    HF_HUB_OFFLINE=1
STEPS=() FAILED=()

step() {  # step NAME TITLE SECONDS COMMAND...: run it under a time limit; its stdout goes to the results block
    local name=$1 title=$2 limit=$3 start=$SECONDS rc
    shift 3
    echo "== $title: $*"
    timeout "$limit" "$@" 2>"$LOG/$name.err" | tee "$LOG/$name.out"
    rc=${PIPESTATUS[0]}
    [ "$rc" = 0 ] || { tail -n 15 "$LOG/$name.err"; FAILED+=("$name (exit $rc)"); }
    echo "($((SECONDS - start)) s, exit $rc)" | tee -a "$LOG/$name.out"
    STEPS+=("$name|$title|$*")
}

# the accelerator's peak bandwidth (bandwidth share) and dense bf16 FLOP/s (MFU), from its name
read -r GPUS BANDWIDTH FLOPS < <($PY -c "
import torch
name = torch.cuda.get_device_name() if torch.cuda.is_available() else ''
print(torch.cuda.device_count(), 4.8e12 if 'H200' in name else 3.35e12, 989e12)")
VERSIONS=$($PY -c "
import importlib.metadata as m, platform, torch
def v(p):
    try:
        return m.version(p)
    except m.PackageNotFoundError:
        return 'not installed'
gpu = f'{torch.cuda.device_count()} x {torch.cuda.get_device_name()}' if torch.cuda.is_available() else 'no GPU'
print(f'{gpu}; Python {platform.python_version()}, torch {torch.__version__}, transformers {v(\"transformers\")}, '
      f'datasets {v(\"datasets\")}, TRL {v(\"trl\")}, accelerate {v(\"accelerate\")}, Liger-Kernel {v(\"liger-kernel\")}')")
echo "$VERSIONS"

if [ "$TINY" = 1 ]; then
    export OMP_NUM_THREADS=1
    SAMPLER=(--models tiny --batch-sizes 1,4 --repeats 1 --prompt-len 8 --new-tokens 8 --threads 1)
    LOGPROBS=(--n 256 --d 64 --v 1000 --chunk-size 64 --iters 1 --threads 1)
    DPO=(--pairs 2 --prompt-len 8 --response-len 8 --steps 3 --warmup 1 --threads 1)
else  # the scripts' own defaults on CUDA are the shapes above; fewer rounds keep the whole check under 8 minutes
    SAMPLER=(--models llama-3.2-1b --batch-sizes 1,64 --repeats 3)
    LOGPROBS=()
    DPO=()
fi
step tests "GPU-marked tests (skipped without CUDA)" 100 $PY -m pytest -q -m gpu -rs -p no:cacheprovider tests
step sampler "Sampler vs transformers generate" 180 \
    $PY benchmarks/sampler.py --device "$DEVICE" --bandwidth "$BANDWIDTH" "${SAMPLER[@]}"
step logprobs "Fused log-prob op vs naive" 60 $PY benchmarks/logprobs.py --device "$DEVICE" "${LOGPROBS[@]}"
step dpo "One DPO step vs TRL DPOTrainer" 140 \
    $PY benchmarks/dpo.py --device "$DEVICE" --peak-flops "$FLOPS" "${DPO[@]}"
FSDP_NOTE=""
if [ "$DEVICE" = cuda ] && [ "$GPUS" -ge 2 ]; then
    step fsdp "FSDP2 on two GPUs (NCCL) equal to one" 90 \
        $PY -m pytest -q -p no:cacheprovider "tests/test_train_dpo.py::test_two_fsdp_processes_equal_one"
else
    FSDP_NOTE="FSDP2 on two GPUs equal to one: not run ($GPUS CUDA device(s) visible; the gloo form runs in tests/)."
    echo "== $FSDP_NOTE"
fi

echo
echo "---- results block for benchmarks/RESULTS.md ----"
echo "## GPU check: \`bash benchmarks/gpu.sh --device $DEVICE$([ "$TINY" = 1 ] && echo " --tiny")\` ($(date -u +%F))"
echo
echo "$VERSIONS."
for entry in "${STEPS[@]}"; do
    IFS='|' read -r name title cmd <<< "$entry"
    printf '\n### %s\n\n`python %s`\n\n```\n' "$title" "${cmd#"$PY "}"
    grep -v '^\s*$' "$LOG/$name.out"
    echo '```'
done
[ -n "$FSDP_NOTE" ] && printf '\n%s\n' "$FSDP_NOTE"
if [ ${#FAILED[@]} -gt 0 ]; then
    echo; echo "failed: ${FAILED[*]}"
    exit 1
fi
