"""Peak memory and time of forward + backward: fused chunked token log-probs vs the naive full-logits op.

    python benchmarks/logprobs.py                                  # CPU: N=2048, D=512, V=128256, fp32
    python benchmarks/logprobs.py --device cuda                    # GPU: N=16384, D=4096, V=128256, bf16

Both ops compute log_softmax(h @ W.T).gather(-1, labels) for N tokens at a Llama-3 vocabulary and
backpropagate into h (N, D) and W (V, D). "Peak extra memory" is the peak above what the inputs already hold
(the (N, D) and (V, D) gradients count). On CUDA it comes from torch.cuda.max_memory_allocated; on CPU each
variant runs in a fresh subprocess, resets the kernel's peak-RSS counter once its inputs exist (Linux:
/proc/self/clear_refs), and reports the growth of the peak resident set (VmHWM) over the first forward +
backward: large CPU tensors are mmapped and returned on free, so RSS follows the live tensors.
Liger-Kernel's Triton LigerFusedLinearCrossEntropyLoss is added on CUDA when it is importable.
Targets: fused peak extra memory <= 1/8 of naive; fused time <= 1.3x naive on GPU.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo, uninstalled
from minirlhf.logprobs import fused_token_logps, naive_token_logps  # noqa: E402


def rss_kib(field):
    """VmRSS (resident now) or VmHWM (peak since the last reset) of this process, in KiB (Linux)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def loss_fn(variant, chunk_size):
    if variant == "naive":
        return lambda h, W, y: naive_token_logps(h, W, y).sum()
    if variant == "fused":
        return lambda h, W, y: fused_token_logps(h, W, y, chunk_size=chunk_size).sum()
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    liger = LigerFusedLinearCrossEntropyLoss(reduction="sum")
    return lambda h, W, y: -liger(W, h, y)  # -(sum of CE) = sum of token log-probs


def make_inputs(args):
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    g = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(args.n, args.d, generator=g, device=device, dtype=dtype).requires_grad_()
    W = torch.randn(args.v, args.d, generator=g, device=device, dtype=dtype).mul_(args.d ** -0.5).requires_grad_()
    labels = torch.randint(0, args.v, (args.n,), generator=g, device=device)
    return h, W, labels


def step(fn, h, W, labels):
    """One forward + backward -> seconds."""
    h.grad = W.grad = None
    t0 = time.perf_counter()
    fn(h, W, labels).backward()
    if h.is_cuda:
        torch.cuda.synchronize()  # sync point: the timing needs the kernels finished
    return time.perf_counter() - t0


def peak_extra_mb(variant, args):
    """Peak memory above the inputs during the first forward + backward of `variant` in this process."""
    h, W, labels = make_inputs(args)
    fn = loss_fn(variant, args.chunk_size)
    if h.is_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(fn, h, W, labels)
        return (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS: the peak of creating the inputs is forgotten
    base = rss_kib("VmRSS")
    step(fn, h, W, labels)
    return (rss_kib("VmHWM") - base) / 2 ** 10


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--n", type=int, default=None, help="tokens N (default 2048 on CPU, 16384 on GPU)")
    p.add_argument("--d", type=int, default=None, help="hidden size D (default 512 on CPU, 4096 on GPU)")
    p.add_argument("--v", type=int, default=128256, help="vocabulary size V (Llama 3)")
    p.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 (default fp32 CPU, bf16 GPU)")
    p.add_argument("--chunk-size", type=int, default=1024, help="rows per chunk of the fused op")
    p.add_argument("--iters", type=int, default=2, help="timed iterations after one warm-up (the best is reported)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # internal: one variant, print JSON
    args = p.parse_args()
    gpu = args.device.startswith("cuda")
    args.n = args.n or (16384 if gpu else 2048)
    args.d = args.d or (4096 if gpu else 512)
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    torch.set_num_threads(args.threads)
    if args.variant:  # in a fresh subprocess: a clean peak-RSS counter for one variant
        print(json.dumps(peak_extra_mb(args.variant, args)))
        return

    variants = ["naive", "fused"]
    if gpu:
        try:
            import liger_kernel  # noqa: F401
            variants.append("liger")
        except ImportError:
            pass
    peaks = {}
    for variant in variants:
        if gpu:  # one process is fine: the CUDA allocator's peak counter is reset per variant
            peaks[variant] = peak_extra_mb(variant, args)
            torch.cuda.empty_cache()
        else:  # a fresh process per variant, so one variant's peak RSS cannot hide the other's
            out = subprocess.run([sys.executable, *sys.argv, f"--variant={variant}"], check=True,
                                 capture_output=True, text=True).stdout
            peaks[variant] = json.loads(out.strip().splitlines()[-1])
    # time: variants interleaved in one process, best of --iters after a warm-up (robust to a shared machine)
    h, W, labels = make_inputs(args)
    fns = {variant: loss_fn(variant, args.chunk_size) for variant in variants}
    times = {variant: [] for variant in variants}
    for it in range(args.iters + 1):
        for variant, fn in fns.items():
            times[variant].append(step(fn, h, W, labels))
    results = {v: {"variant": v, "peak_mb": peaks[v], "time_s": min(times[v][1:])} for v in variants}
    print(f"N={args.n} D={args.d} V={args.v} {args.dtype} {args.device} chunk={args.chunk_size} "
          f"threads={args.threads}")
    print(f"{'variant':8s} {'peak extra MB':>14s} {'time s':>8s}")
    for r in results.values():
        print(f"{r['variant']:8s} {r['peak_mb']:14.1f} {r['time_s']:8.3f}")
    for variant in variants[1:]:
        r, n = results[variant], results["naive"]
        print(f"{variant}/naive: memory {r['peak_mb'] / n['peak_mb']:.3f}, time {r['time_s'] / n['time_s']:.2f}")


if __name__ == "__main__":
    main()
