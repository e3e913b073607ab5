"""Throughput and peak memory of DPO training steps: train_dpo.py against TRL's DPOTrainer, same model, data, batch.

    python benchmarks/dpo.py                  # CPU: random 4-layer Llama (~7M params), fp32
    python benchmarks/dpo.py --device cuda    # GPU: random Llama-3.2-1B shape, bf16 autocast, fp32 master weights

Both sides train the same random-init checkpoint (saved once with `transformers`) on the same pairs, one
optimizer step per batch of --pairs pairs (no accumulation), reference log-probs precomputed before training
(TRL: precompute_ref_log_probs=True), so one step is the policy's forward + backward over 2 x pairs sequences
plus AdamW. The text is random words of a word-level tokenizer (one token per word) behind a chat template that
adds nothing but EOS, so both sides see identical sequences of prompt + response + EOS tokens, no padding.

Each side runs in a fresh subprocess for --steps steps; the first --warmup are dropped and the median of the
rest is reported: tokens per second (tokens in the batch / step time), and peak memory, on CUDA the peak of
torch.cuda.max_memory_allocated (weights, gradients, AdamW state and activations), on CPU the growth of the
process's peak resident set (VmHWM) over its size after imports. On CUDA, MFU = 6 x params x tokens/s / --peak-flops.

TRL is optional and only used here: `pip install --no-deps trl accelerate psutil` (its other needs - datasets,
transformers, torch, pandas, pyarrow, jinja2 - are already installed; --no-deps keeps torch and transformers as
they are). If it is missing or does not run with the installed transformers, that side is skipped with a message.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the repo, uninstalled

SHAPES = {  # LlamaConfig kwargs
    "cpu": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                num_key_value_heads=4, vocab_size=8192, tie_word_embeddings=False, rope_theta=10000.0),
    "cuda": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_scaling=dict(
                     rope_type="llama3", rope_theta=500000.0, factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                     original_max_position_embeddings=8192)),
}
TEMPLATE = ("{% for m in messages %}{{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}{% else %} "
            "{% endif %}{% endfor %}")


def memory_mb(device):
    """Peak memory so far: CUDA allocator peak, or the CPU process's peak resident set (VmHWM)."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def make_run(path, args):
    """Random-init checkpoint + word-level tokenizer (folder `path`) and a jsonl of pairs; returns n_params."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    shape = SHAPES[args.device]
    V = shape["vocab_size"]
    words = [f"w{i}" for i in range(V - 3)]
    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<unk>"] + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                                     unk_token="<unk>", chat_template=TEMPLATE)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**shape, head_dim=shape["hidden_size"] // shape["num_attention_heads"],
                                   max_position_embeddings=8192, pad_token_id=0, eos_token_id=1, bos_token_id=1)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    g = torch.Generator().manual_seed(0)

    def text(n):
        return " ".join(words[i] for i in torch.randint(len(words), (n,), generator=g).tolist())
    rows = [dict(prompt=text(args.prompt_len), chosen=" " + text(args.response_len),
                 rejected=" " + text(args.response_len)) for _ in range(args.pairs * args.steps)]
    with open(os.path.join(path, "pairs.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return sum(p.numel() for p in model.parameters())


def run_ours(path, args):
    """train_dpo.main for --steps steps -> per-step tokens/s (from its metrics.jsonl)."""
    import train_dpo
    out = os.path.join(path, "ours")
    train_dpo.main(["--model", path, "--train-data", os.path.join(path, "pairs.jsonl"), "--output-dir", out,
                    "--batch-size", str(args.pairs), "--grad-accum", "1", "--max-steps", str(args.steps),
                    "--lr", "1e-6", "--warmup-ratio", "0", "--lr-schedule", "constant", "--save-steps", "0",
                    "--eval-fraction", "0",
                    "--max-length", str(args.prompt_len + args.response_len + 8), "--max-prompt-length",
                    str(args.prompt_len + 4)] + (["--gradient-checkpointing"] if args.gradient_checkpointing else []))
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line)["tokens_per_sec"] for line in f]


def run_trl(path, args):
    """TRL's DPOTrainer for --steps steps -> per-step tokens/s (timed by a callback around each step)."""
    import datasets
    import transformers
    from trl import DPOConfig, DPOTrainer

    tokens = 2 * args.pairs * (args.prompt_len + args.response_len + 1)
    times, cuda = [], args.device == "cuda"

    class Timer(transformers.TrainerCallback):
        def on_step_begin(self, *a, **k):
            torch.cuda.synchronize() if cuda else None
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            torch.cuda.synchronize() if cuda else None
            times.append(time.perf_counter() - self.t0)

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    config = DPOConfig(output_dir=os.path.join(path, "trl"), per_device_train_batch_size=args.pairs,
                       gradient_accumulation_steps=1, max_steps=args.steps, learning_rate=1e-6,
                       lr_scheduler_type="constant", beta=0.1, loss_type="sigmoid", precompute_ref_log_probs=True,
                       max_length=None, bf16=cuda, use_cpu=not cuda, optim="adamw_torch", save_strategy="no",
                       report_to="none", logging_steps=10**6, disable_tqdm=True, dataloader_num_workers=0,
                       gradient_checkpointing=args.gradient_checkpointing, seed=0)
    dataset = datasets.load_dataset("json", data_files=os.path.join(path, "pairs.jsonl"), split="train")
    trainer = DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         callbacks=[Timer()])
    trainer.train()
    return [tokens / t for t in times]


def worker(args):
    """One side in this (fresh) process: prints one JSON line {tokens_per_sec, peak_mb}."""
    torch.set_num_threads(args.threads) if args.threads else None
    import datasets  # noqa: F401  (imports count towards the baseline, not the peak)
    import transformers  # noqa: F401
    if args.worker == "ours":
        import train_dpo  # noqa: F401
    else:
        import trl  # noqa: F401
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = 0.0
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident set
        base = memory_mb("cpu")
    per_step = (run_ours if args.worker == "ours" else run_trl)(args.dir, args)
    print(json.dumps({"tokens_per_sec": statistics.median(per_step[args.warmup:]),
                      "peak_mb": memory_mb(args.device) - base}))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cpu: small; cuda: Llama-3.2-1B")
    p.add_argument("--pairs", type=int, default=None, help="pairs per step (default 4 CPU, 8 CUDA)")
    p.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default 64 CPU, 512 CUDA)")
    p.add_argument("--response-len", type=int, default=None, help="response tokens (default 64 CPU, 512 CUDA)")
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per side")
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of the median")
    p.add_argument("--peak-flops", type=float, default=989e12, help="accelerator peak FLOP/s for MFU (H100 bf16 dense)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="activation checkpointing on both sides")
    p.add_argument("--skip-trl", action="store_true", help="only measure train_dpo.py")
    p.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    cuda = args.device == "cuda"
    for name, cpu_default, cuda_default in [("pairs", 4, 8), ("prompt_len", 64, 512), ("response_len", 64, 512)]:
        if getattr(args, name) is None:
            setattr(args, name, cuda_default if cuda else cpu_default)
    if args.worker:
        return worker(args)

    with tempfile.TemporaryDirectory() as path:
        n_params = make_run(path, args)
        tokens = 2 * args.pairs * (args.prompt_len + args.response_len + 1)
        print(f"model: {n_params / 1e6:.1f}M params ({args.device}, {'bf16 autocast' if cuda else 'fp32'}); batch: "
              f"{args.pairs} pairs = {2 * args.pairs} sequences x {tokens // (2 * args.pairs)} tokens = {tokens}")
        results = {}
        for side in ["ours"] + ([] if args.skip_trl else ["trl"]):
            cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--worker", side, "--dir", path]
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
                   "TQDM_DISABLE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                reason = (proc.stderr.strip().splitlines() or ["?"])[-1]
                print(f"{side}: skipped ({reason})" if side == "trl" else proc.stderr)
                continue
            results[side] = json.loads(proc.stdout.strip().splitlines()[-1])
    names = {"ours": "train_dpo.py", "trl": "TRL DPOTrainer"}
    for side, r in results.items():
        mfu = f", MFU {6 * n_params * r['tokens_per_sec'] / args.peak_flops:.1%}" if cuda else ""
        print(f"{names[side]:>15}: {r['tokens_per_sec']:10.0f} tokens/s, peak memory {r['peak_mb']:8.0f} MB{mfu}")
    if len(results) == 2:
        ours, trl = results["ours"], results["trl"]
        print(f"ratio train_dpo.py / TRL: throughput {ours['tokens_per_sec'] / trl['tokens_per_sec']:.2f}x, "
              f"peak memory {ours['peak_mb'] / trl['peak_mb']:.2f}x")
    return results


if __name__ == "__main__":
    main()
