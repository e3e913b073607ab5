"""Memory of full fine-tuning, LoRA and QLoRA on the same model and batch: weights, optimizer state, peak.

    python benchmarks/lora_memory.py                   # CPU, SmolLM2-135M's shape (random weights), fp32
    python benchmarks/lora_memory.py --device cuda     # GPU: the same, bf16 autocast as train_dpo.py on one GPU
    python benchmarks/lora_memory.py --shape tiny      # the code path in seconds

Each configuration runs in a fresh subprocess: build the model (minirlhf.model.init_model), apply
`lora.add_lora` (rank 16, alpha 16, every block linear; QLoRA: NF4 with double quantisation), then --steps DPO
steps (policy forward and backward over 2 x --pairs sequences of --length tokens, reference log-probs taken
once from the same network with adapters off, AdamW over the trainable parameters). Reported:
- weights: bytes of every parameter and buffer (NF4 codes and absmaxes included);
- optimizer state: bytes of AdamW's tensors after the steps (2 fp32 moments per trainable parameter);
- saved for backward: bytes of the tensors autograd keeps from the forward to the backward (counted with
  torch.autograd.graph.saved_tensors_hooks, each storage once, weights aside): the activations;
- weights + optimizer + gradients + saved: a bound on the tensors alive at once in a step (the gradients, half
  the AdamW state, appear during the backward while the saved tensors go);
- peak: on CUDA torch.cuda.max_memory_allocated over the steps, everything the allocator held; on CPU the
  peak resident set (VmHWM) over the steps minus the resident set after imports. Before the steps, freed heap
  is handed back (malloc_trim) and VmHWM is reset (/proc/self/clear_refs), so the one-time fp32 model that QLoRA
  quantises from does not count: the peak is that of training. Ratios are against full fine-tuning.
"""
import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the repo, uninstalled
from minirlhf import lora, losses  # noqa: E402
from minirlhf.logprobs import sequence_logps  # noqa: E402
from minirlhf.model import init_model  # noqa: E402

SHAPES = {  # LlamaConfig fields; smollm2-135m is HuggingFaceTB/SmolLM2-135M-Instruct's (as in benchmarks/sampler.py)
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=False),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, head_dim=64, vocab_size=49152, tie_word_embeddings=True,
                         rope_theta=100000.0, rms_norm_eps=1e-5),
}
CONFIGS = {"full": {}, "lora": dict(rank=16, alpha=16), "qlora": dict(rank=16, alpha=16, quantize="nf4",
                                                                       double_quant=True)}


def resident_mb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def run_one(args):
    """One configuration in this process -> its measurements (a dict)."""
    torch.manual_seed(0)
    device = torch.device(args.device)
    after_imports = resident_mb("VmRSS") if device.type == "cpu" else 0.0
    model = init_model({"model_type": "llama", **SHAPES[args.shape]})
    if CONFIGS[args.run]:
        lora.add_lora(model, **CONFIGS[args.run])
    model = model.to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, SHAPES[args.shape]["vocab_size"], (2 * args.pairs, args.length), generator=g).to(device)
    mask, loss_mask = torch.ones_like(ids), torch.zeros_like(ids)
    loss_mask[:, args.length // 2:] = 1  # the second half is the response
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    with torch.no_grad(), lora.adapters_off(model), autocast:
        ref = sequence_logps(model, ids, mask, loss_mask)[0].float().view(2, -1)
    gc.collect()
    if device.type == "cpu":
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
    else:
        torch.cuda.reset_peak_memory_stats()
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved = {}  # storage -> bytes of every tensor autograd keeps for backward (the weights themselves aside)

    def keep(t):
        if t.untyped_storage().data_ptr() not in weights:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    for _ in range(args.steps):
        saved.clear()
        with autocast, torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            logps = sequence_logps(model, ids, mask, loss_mask)[0].float().view(2, -1)
        loss = losses.PREFERENCE_LOSSES["dpo"](*logps, *ref, 0.1, 0.0)[0].mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    peak = resident_mb("VmHWM") - after_imports if device.type == "cpu" else torch.cuda.max_memory_allocated() / 2**20
    nbytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    state = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values() if v.dim())
    return {"config": args.run, "params": sum(p.numel() for p in model.parameters()) + sum(
                b.numel() * 2 for n, b in model.named_buffers() if n.endswith("codes")),  # 2 NF4 weights a byte
            "trainable": sum(p.numel() for p in trainable), "weights_mb": nbytes / 2**20,
            "optimizer_mb": state / 2**20, "saved_mb": sum(saved.values()) / 2**20, "peak_mb": peak}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--shape", default="smollm2-135m", choices=list(SHAPES))
    p.add_argument("--pairs", type=int, default=2, help="preference pairs per step (2 x pairs sequences)")
    p.add_argument("--length", type=int, default=256, help="tokens per sequence (the second half is the response)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--run", choices=list(CONFIGS), help=argparse.SUPPRESS)  # one configuration, in a subprocess
    args = p.parse_args()
    if args.run:
        print(json.dumps(run_one(args)))
        return
    rows = []
    for name in CONFIGS:
        cmd = [sys.executable, __file__, "--run", name] + sys.argv[1:]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    full = rows[0]
    peak = "peak allocated (CUDA)" if args.device == "cuda" else "peak RSS over imports"
    print(f"{args.shape}, {args.device}, {args.pairs} pairs x 2 x {args.length} tokens, {torch.__version__}")
    print(f"| config | params | trainable | weights MB | optimizer state MB | saved for backward MB | "
          f"weights + optimizer + gradients + saved MB | {peak} MB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        r["sum_mb"] = r["weights_mb"] + 1.5 * r["optimizer_mb"] + r["saved_mb"]  # gradients: half the AdamW state
        ratios = {k: f"({r[k] / full[k]:.2f}x)" for k in ("weights_mb", "optimizer_mb", "saved_mb", "sum_mb", "peak_mb")}
        print(f"| {r['config']} | {r['params'] / 1e6:.1f}M | {r['trainable'] / 1e6:.2f}M | " + " | ".join(
            f"{r[k]:.0f} {ratio}" for k, ratio in ratios.items()) + " |")


if __name__ == "__main__":
    main()
