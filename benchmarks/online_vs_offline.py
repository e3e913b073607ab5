"""The controlled study of issue "online beats offline": the same SFT policy and the same human-label budget, several
arms of the built-in task, several seeds; mean ± sd of gold reward, KL to pi_0 and proxy reward per iteration.

Per seed, the default run (`python iterate.py --seed S`: online labels) makes the shared stages (init, SFT, the
labelled SFT pairs, offline DPO on all of them); every other arm copies those folders and runs with its flags,
so offline DPO and SFT are the same policies in every arm. Arms:
  online      the default: part of the label budget up front, the rest asked of the oracle each iteration on the
              current policy's pairs, reward model refit every iteration
  paper       the paper's loop: a proxy reward model fit once on all labels (--labels-per-iteration 0)
  more with --arm NAME="FLAGS", e.g. --arm rm_only="--labels-train reward_model"

    python benchmarks/online_vs_offline.py --seeds 0 1 2 3 4 --output-dir runs/study --jobs 2 --plot study.png
"""
import argparse
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARMS = {"online": [], "paper": ["--labels-per-iteration", "0"]}
SHARED = ["init", "sft", "data", "offline_dpo"]  # stages every arm of a seed shares
COLUMNS = ["gold_reward", "kl_to_ref", "proxy_reward", "human_labels"]


def mean_std(values):
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1))


def run_seed(seed, arms, root, extra):
    """All arms of one seed -> {arm: summary}, {arm: seconds}. Logs go to ROOT/seedS/ARM.log."""
    summaries, seconds = {}, {}
    for k, (arm, flags) in enumerate(arms.items()):
        out = os.path.join(root, f"seed{seed}", arm)
        first = os.path.join(root, f"seed{seed}", next(iter(arms)))
        if k > 0 and not os.path.exists(out):  # the first arm made the shared stages
            for stage in SHARED:
                shutil.copytree(os.path.join(first, stage), os.path.join(out, stage))
            shutil.copy(os.path.join(first, "manifest.json"), out)  # they are iterate.py's (minirlhf/rundir.py)
        os.makedirs(out, exist_ok=True)
        start = time.time()
        with open(out + ".log", "w") as log:
            subprocess.run([sys.executable, os.path.join(ROOT, "iterate.py"), "--seed", str(seed), "--output-dir",
                            out] + flags + extra, check=True, stdout=log, stderr=subprocess.STDOUT,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
        seconds[arm] = time.time() - start
        with open(os.path.join(out, "summary.json")) as f:
            summaries[arm] = json.load(f)
        print(f"seed {seed} {arm}: {seconds[arm]:.0f} s", flush=True)
    return summaries, seconds


def table(results, arms, seeds):
    """Markdown: one row per (arm, policy), baselines once, cells mean ± sd over seeds."""
    first = next(iter(arms))
    rows = [("sft", first, "sft"), ("offline_dpo", first, "offline_dpo")]
    for arm in arms:
        rows += [(f"{arm} {p}", arm, p) for p in results[seeds[0]][0][arm]["policies"] if p.startswith("iter")]
    lines = ["| policy | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for label, arm, policy in rows:
        cells = []
        for c in COLUMNS:
            values = [results[s][0][arm]["policies"][policy][c] for s in seeds]
            cells.append(("%.0f ± %.0f" if c == "human_labels" else "%.3f ± %.3f") % mean_std(values))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="seeds to run")
    p.add_argument("--output-dir", default="runs/study", help="ROOT/seedS/ARM: one iterate.py run per arm and seed")
    p.add_argument("--arm", action="append", default=[], help='an extra arm: NAME="iterate.py flags"')
    p.add_argument("--only", nargs="+", help="run only these arms (the first one listed makes the shared stages)")
    p.add_argument("--jobs", type=int, default=1, help="seeds run in parallel (one thread each)")
    p.add_argument("--plot", help="also draw the gold reward per iteration of every arm to this PNG (matplotlib)")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="flags passed on to every arm's iterate.py (after --)")
    args = p.parse_args()
    arms = dict(ARMS)
    for spec in args.arm:
        name, _, flags = spec.partition("=")
        arms[name] = shlex.split(flags)
    if args.only:
        arms = {a: arms[a] for a in args.only}
    extra = [a for a in args.extra if a != "--"]
    with ThreadPoolExecutor(args.jobs) as pool:
        results = dict(zip(args.seeds, pool.map(lambda s: run_seed(s, arms, args.output_dir, extra), args.seeds)))
    lines = table(results, arms, args.seeds)
    last = {arm: f"iter{max(int(p[4:]) for p in results[args.seeds[0]][0][arm]['policies'] if p.startswith('iter'))}"
            for arm in arms}
    lines += ["", "| seed | offline_dpo | " + " | ".join(f"{a} {last[a]}" for a in arms) + " |",
              "|---" * (len(arms) + 2) + "|"]
    for s in args.seeds:
        summaries = results[s][0]
        lines.append(f"| {s} | {summaries[next(iter(arms))]['policies']['offline_dpo']['gold_reward']:.3f} | " +
                     " | ".join(f"{summaries[a]['policies'][last[a]]['gold_reward']:.3f}" for a in arms) + " |")
    lines.append("")
    for arm in arms:
        for key in (k for k in results[args.seeds[0]][0][arm] if k.startswith("reward_model_gold_accuracy")):
            lines.append(f"{arm}: {key.replace('reward_model_gold_accuracy_', 'reward model accuracy against gold on ')}"
                         f" pairs: %.3f ± %.3f" % mean_std([results[s][0][arm][key] for s in args.seeds]))
        lines.append(f"{arm}: wall time per run (s): " + ", ".join(f"{results[s][1][arm]:.0f}" for s in args.seeds))
    lines.append(f"seeds: {args.seeds}; mean ± sample standard deviation over seeds; gold reward on held-out prompts")
    print("\n".join(lines))
    if args.plot:
        plot(results, arms, args.seeds, args.plot)


def plot(results, arms, seeds, path):
    """Gold reward (mean ± sd over seeds) against iteration for every arm, SFT at 0, offline DPO as a band."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4))

    def stats(arm, policy):
        return mean_std([results[s][0][arm]["policies"][policy]["gold_reward"] for s in seeds])
    first = next(iter(arms))
    offline, offline_sd = stats(first, "offline_dpo")
    ax.axhspan(offline - offline_sd, offline + offline_sd, color="0.85", label="offline DPO (mean ± sd)")
    for arm in arms:
        names = ["sft"] + sorted((p for p in results[seeds[0]][0][arm]["policies"] if p.startswith("iter")),
                                 key=lambda p: int(p[4:]))
        means, sds = zip(*(stats(arm, n) for n in names))
        ax.errorbar(range(len(names)), means, yerr=sds, marker="o", capsize=3, label=arm)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("gold reward (held-out prompts)")
    ax.set_title(f"same label budget, {len(seeds)} seeds")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
