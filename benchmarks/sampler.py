"""Decode throughput of `minirlhf.sampler.generate` against `transformers` `generate`, same weights and prompts.

A random-init `transformers` Llama is saved with `save_pretrained` and loaded back with `load_model`, so both
generators run identical weights. Both decode greedily for exactly --new-tokens tokens (no stop id) from the
same ragged, left-padded prompts; tokens/s counts generated tokens (prefill time included), best of --repeats
interleaved rounds. The ratio against transformers is the median over rounds of the two times in the same
round (a shared machine's slow and fast spells last longer than a round). With --n 4 both draw 4 samples per prompt at temperature 1 (our prefill is shared,
transformers' is repeated). On CPU, "ours unpacked" is our sampler with plain sgemm (pack_weights=False).

    python benchmarks/sampler.py                     # CPU, a 55M-parameter Llama shape
    python benchmarks/sampler.py --device cuda       # Llama-3.2-1B and Llama-3-8B shapes in bf16, plus the
                                                     # memory-bandwidth fraction at batch 1
    python benchmarks/sampler.py --models smollm2-135m --n 8   # a real chat model's shape (random weights)

Bandwidth fraction at batch 1 = bytes of weights read per token x tokens/s / --bandwidth (H100 SXM HBM3:
3.35e12 B/s). The input embedding is not counted unless tied (one row of it is read per token).
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from minirlhf.checkpoint import load_model  # noqa: E402
from minirlhf.sampler import generate  # noqa: E402

SHAPES = {  # name -> LlamaConfig overrides
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000),  # benchmarks/gpu.sh --tiny: the code path, in seconds
    "small": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=2, vocab_size=32000),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0),
    # HuggingFaceTB/SmolLM2-135M-Instruct's config.json (random weights): deep and narrow, 30 layers of width 576
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, head_dim=64, vocab_size=49152, tie_word_embeddings=True,
                         rope_theta=100000.0, rms_norm_eps=1e-5),
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
}

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run")
parser.add_argument("--models", default=None, help="comma-separated shapes from SHAPES "
                    "(default: small on CPU, llama-3.2-1b,llama-3-8b on CUDA)")
parser.add_argument("--batch-sizes", default="1,16,64", help="comma-separated numbers of prompts per run")
parser.add_argument("--prompt-len", type=int, default=64, help="longest prompt; lengths are drawn in [len/2, len]")
parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per prompt (no stop id)")
parser.add_argument("--n", type=int, default=1, help="samples per prompt; n > 1 samples at temperature 1 "
                    "(transformers: num_return_sequences, which prefills each prompt n times)")
parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
parser.add_argument("--no-unpacked", action="store_true", help="CPU: skip the plain-sgemm variant")
parser.add_argument("--repeats", type=int, default=7, help="timed rounds, each runs every variant once")
parser.add_argument("--print-rounds", action="store_true", help="also print every round's seconds per variant")
parser.add_argument("--bandwidth", type=float, default=3.35e12, help="HBM bandwidth in bytes/s (H100 SXM)")
args = parser.parse_args()

device = torch.device(args.device)
dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
if args.threads:
    torch.set_num_threads(args.threads)
models = (args.models or ("small" if device.type == "cpu" else "llama-3.2-1b,llama-3-8b")).split(",")


def sync():
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn):
    """-> wall seconds of fn()."""
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def hf_generate(hf_model, prompts, new_tokens):
    P = max(map(len, prompts))
    ids = torch.tensor([[0] * (P - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts], device=device)
    sampling = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, num_return_sequences=args.n)
    out = hf_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, pad_token_id=0,
                            **(sampling if args.n > 1 else dict(do_sample=False)))
    assert out.shape[1] == P + new_tokens  # no early stop: a fixed output length for both


def our_generate(model, prompts, new_tokens, pack_weights=True):
    gen = generate(model, prompts, new_tokens, n=args.n, temperature=0 if args.n == 1 else 1.0, eos_token_id=None,
                   batch_size=len(prompts) * args.n, pack_weights=pack_weights)
    assert all(len(y) == new_tokens for r in gen.responses for y in r)


print(f"torch {torch.__version__}, transformers {transformers.__version__}, device {device}, threads "
      f"{torch.get_num_threads()}, prompts up to {args.prompt_len} tokens, {args.new_tokens} new tokens, "
      + ("greedy" if args.n == 1 else f"{args.n} samples per prompt at temperature 1"))
for name in models:
    config = transformers.LlamaConfig(**SHAPES[name], max_position_embeddings=8192, pad_token_id=0)
    config.eos_token_id = None  # nothing stops early in transformers either
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        with torch.device(device):
            hf_model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
        hf_model.generation_config.eos_token_id = None
        hf_model.save_pretrained(tmp)
        model = load_model(tmp, dtype=dtype, device=device).eval()
    hf_model.eval()
    n_params = sum(p.numel() for p in model.parameters())
    read_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if model.lm_head is not None:  # untied: the input embedding is gathered, not streamed
        read_bytes -= model.model.embed_tokens.weight.numel() * model.model.embed_tokens.weight.element_size()
    print(f"\n{name}: {n_params / 1e6:.0f}M parameters, {read_bytes / 1e9:.2f} GB of weights read per decode step")
    g = torch.Generator().manual_seed(0)
    variants = {"ours": dict()}
    if device.type == "cpu":  # the same sampler with plain sgemm: what MKL weight packing adds
        variants |= {} if args.no_unpacked else {"ours unpacked": dict(pack_weights=False)}
    for B in map(int, args.batch_sizes.split(",")):
        lengths = torch.randint(args.prompt_len // 2, args.prompt_len + 1, (B,), generator=g).tolist()
        prompts = [torch.randint(3, config.vocab_size, (n,), generator=g).tolist() for n in lengths]
        tokens = B * args.n * args.new_tokens
        runs = {"transformers": lambda: hf_generate(hf_model, prompts, args.new_tokens)}
        runs |= {label: (lambda kw=kw: our_generate(model, prompts, args.new_tokens, **kw)) for label, kw in variants.items()}
        with torch.no_grad():
            hf_generate(hf_model, prompts, 4)  # warm-up
            for kw in variants.values():  # warm-up
                our_generate(model, prompts, 4, **kw)
            walls = {label: [] for label in runs}
            for _ in range(args.repeats):  # interleaved, so a slow spell of a shared machine hits every variant
                for label, fn in runs.items():
                    walls[label].append(timed(fn))
        if args.print_rounds:
            print({k: [round(x, 3) for x in v] for k, v in walls.items()})
        hf_walls = walls.pop("transformers")
        line = f"  batch {B:3d}: transformers {tokens / min(hf_walls):8.1f} tok/s"
        for label, ours in walls.items():
            # the ratio is the median over rounds of transformers' time / ours in the same round: a shared
            # machine's slow and fast spells last longer than a round, so pairing cancels them
            ratio = statistics.median(hf / our for hf, our in zip(hf_walls, ours))
            line += f" | {label} {tokens / min(ours):8.1f} tok/s ({ratio:.2f}x)"
            wall = min(ours)
            if B == 1 and device.type == "cuda":
                line += f" [{read_bytes * tokens / wall / args.bandwidth:.0%} of bandwidth]"
        print(line, flush=True)
    del model, hf_model
    if device.type == "cuda":
        torch.cuda.empty_cache()
