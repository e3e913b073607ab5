"""PPO, DR-PO and iterative DPO on the built-in task from the same SFT policy and the same reward model (issue #13).

Per seed, the iterative DPO arm (`python iterate.py --labels-per-iteration 0 --seed S`: the paper's loop, a proxy
reward model fit once on every label) makes the shared stages (init, SFT, the labelled SFT pairs, the reward model,
offline DPO); the PPO arm (`--algorithm ppo`) and the DR-PO arm (`--algorithm ppo --reset-prob 1`, resets to the
task's demonstrations) copy them, so all three start from the same policy and optimise the same reward model.
Printed: gold reward, proxy reward and KL to pi_SFT of each iteration (mean ± sd over seeds, 500 held-out prompts),
and the wall time of each iteration of each arm (from its metrics.json; arms of a seed run one after the other).

    python benchmarks/ppo_builtin.py --seeds 0 1 2 --output-dir runs/ppo_study --jobs 2
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from online_vs_offline import mean_std  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARMS = {"iterative_dpo": ["--labels-per-iteration", "0"], "ppo": ["--algorithm", "ppo"],
        "drpo": ["--algorithm", "ppo", "--reset-prob", "1"], "drpo_half": ["--algorithm", "ppo", "--reset-prob", "0.5"]}
SHARED = ["init", "sft", "data", "reward_model", "reward_model_labels.jsonl", "offline_dpo", "manifest.json"]
COLUMNS = ["gold_reward", "proxy_reward", "kl_to_ref"]


def run_seed(seed, arms, root, extra):
    """All arms of one seed -> {arm: (summary, [seconds per iteration])}; logs in ROOT/seedS/ARM.log."""
    out = {}
    for k, (arm, flags) in enumerate(arms.items()):
        run = os.path.join(root, f"seed{seed}", arm)
        first = os.path.join(root, f"seed{seed}", next(iter(arms)))
        if k > 0 and not os.path.exists(run):  # the first arm made the shared stages
            os.makedirs(run)
            for stage in SHARED:
                (shutil.copytree if os.path.isdir(os.path.join(first, stage)) else shutil.copy)(
                    os.path.join(first, stage), os.path.join(run, stage))
        start = time.time()
        os.makedirs(os.path.dirname(run), exist_ok=True)
        if not os.path.exists(os.path.join(run, "summary.json")):  # a finished run is read, not run again
            with open(run + ".log", "w") as log:
                subprocess.run([sys.executable, os.path.join(ROOT, "iterate.py"), "--seed", str(seed),
                                "--output-dir", run] + flags + extra, check=True, stdout=log,
                               stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
        with open(os.path.join(run, "summary.json")) as f:
            summary = json.load(f)
        iterations = sorted(p for p in summary["policies"] if p.startswith("iter"))
        seconds = [json.load(open(os.path.join(run, p, "metrics.json")))["seconds"] for p in iterations]
        out[arm] = (summary, seconds)
        print(f"seed {seed} {arm}: {time.time() - start:.0f} s", flush=True)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds to run")
    p.add_argument("--output-dir", default="runs/ppo_study", help="ROOT/seedS/ARM: one iterate.py run per arm")
    p.add_argument("--jobs", type=int, default=1, help="seeds run in parallel (one thread each)")
    p.add_argument("--only", nargs="+", choices=list(ARMS), help="these arms only (the first makes the shared stages)")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="flags passed on to every arm's iterate.py (after --)")
    args = p.parse_args()
    extra = [a for a in args.extra if a != "--"]
    arms = {a: ARMS[a] for a in args.only or ARMS}
    with ThreadPoolExecutor(args.jobs) as pool:
        results = dict(zip(args.seeds, pool.map(lambda s: run_seed(s, arms, args.output_dir, extra), args.seeds)))
    first = results[args.seeds[0]]
    rows = [("sft", next(iter(arms)), "sft"), ("offline_dpo", next(iter(arms)), "offline_dpo")]
    for arm in arms:
        rows += [(f"{arm} {p}", arm, p) for p in sorted(first[arm][0]["policies"]) if p.startswith("iter")]
    lines = ["| policy | " + " | ".join(COLUMNS) + " | s / iteration |", "|---" * (len(COLUMNS) + 2) + "|"]
    for label, arm, policy in rows:
        cells = ["%.3f ± %.3f" % mean_std([results[s][arm][0]["policies"][policy][c] for s in args.seeds])
                 for c in COLUMNS]
        seconds = "-" if not policy.startswith("iter") else "%.0f ± %.0f" % mean_std(
            [results[s][arm][1][int(policy[4:]) - 1] for s in args.seeds])
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {seconds} |")
    lines += ["", "| seed | " + " | ".join(f"{a} last" for a in arms) + " |", "|---" * (len(arms) + 1) + "|"]
    for s in args.seeds:
        lines.append(f"| {s} | " + " | ".join("%.3f" % results[s][a][0]["policies"][max(
            p for p in results[s][a][0]["policies"] if p.startswith("iter"))]["gold_reward"] for a in arms) + " |")
    lines.append(f"seeds {args.seeds}; mean ± sample sd over seeds; gold reward on 500 held-out prompts")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
