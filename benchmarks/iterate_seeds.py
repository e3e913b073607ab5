"""The default built-in run (`python iterate.py`) with several seeds: mean and spread of every table cell.

Each seed changes everything random: the initial weights, the prompts, the demonstrations, the simulated
labels and every sample. The output is a Markdown table for README.md / benchmarks/RESULTS.md.

    python benchmarks/iterate_seeds.py --seeds 0 1 2 --output-dir runs/seeds
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLUMNS = ["gold_reward", "gold_win_rate", "proxy_reward", "length", "kl_to_ref"]


def mean_std(values):
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds to run")
    p.add_argument("--output-dir", default="runs/seeds", help="one iterate.py run folder per seed inside")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="flags passed on to iterate.py (after --)")
    args = p.parse_args()
    summaries, seconds = [], []
    for seed in args.seeds:
        out = os.path.join(args.output_dir, f"seed{seed}")
        start = time.time()
        extra = [a for a in args.extra if a != "--"]
        subprocess.run([sys.executable, os.path.join(ROOT, "iterate.py"), "--seed", str(seed), "--output-dir", out]
                       + extra, check=True)
        seconds.append(time.time() - start)
        with open(os.path.join(out, "summary.json")) as f:
            summaries.append(json.load(f))
    policies = list(summaries[0]["policies"])
    lines = ["| policy | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for name in policies:
        cells = []
        for c in COLUMNS:
            values = [s["policies"][name][c] for s in summaries if c in s["policies"][name]]
            cells.append("-" if not values else "%.3f ± %.3f" % mean_std(values))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    acc = [s["reward_model_gold_accuracy"] for s in summaries]
    lines.append("")
    lines.append("reward model accuracy against gold labels: %.3f ± %.3f" % mean_std(acc))
    lines.append("wall time per run (s): " + ", ".join(f"{t:.0f}" for t in seconds))
    lines.append(f"seeds: {args.seeds}; mean ± sample standard deviation over seeds")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
