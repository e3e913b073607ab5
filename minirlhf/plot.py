"""Training curves from the files a run already wrote, no script of your own: one PNG per stage kind.

    python -m minirlhf.plot RUN_DIR      # an iterate.py run, or the folder of one train_dpo.py / train_rm.py run

Every stage folder in RUN_DIR (itself included) with a metrics.jsonl is one line per panel, labelled by its
folder and drawn against its optimizer step; its kind comes from its args.json. A stage still running is read
from its staging/ folder and labelled "(running)".
- sft.png: SFT's loss (NLL per response token), learning rate and gradient norm;
- reward_model.png: every reward model's (the initial one, each iteration's refit) loss, accuracy and margin;
- dpo.png: every DPO stage's (offline_dpo, iter1/policy, ...) loss, implicit reward margin and accuracy;
- summary.png: the run's summary.json, drawn by evaluate.plot (the iterations as a path, baselines as lines).
They go to RUN_DIR/plots/, which is added to RUN_DIR's manifest (a rerun must not take it for a foreign file).
matplotlib is an optional extra: pip install 'minirlhf[plot]'.
"""
import argparse
import glob
import json
import os
import re

from minirlhf import evaluate, rundir, task

PANELS = {"sft": ["loss", "lr", "grad_norm"], "reward_model": ["loss", "accuracy", "margin"],
          "dpo": ["loss", "margin", "accuracy"]}  # stage kind -> the metrics.jsonl keys drawn, one panel each


def stage_kind(args):
    """A stage's args.json -> "reward_model" (train_rm.py), "sft" or "dpo" (train_dpo.py, any preference loss)."""
    return "reward_model" if "kind" in args else "sft" if args.get("loss") == "sft" else "dpo"


def find_stages(run_dir):
    """-> {kind: {label: [metrics.jsonl rows]}}, labels in natural order (iter2 before iter10)."""
    stages = {}
    paths = glob.glob(os.path.join(run_dir, "**", "metrics.jsonl"), recursive=True)
    for path in sorted(paths, key=lambda p: [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", p)]):
        folder = os.path.dirname(path)
        args = rundir.read_json(os.path.join(folder, "args.json"))
        if args is None:
            continue
        rel, running = os.path.relpath(folder, run_dir), os.path.basename(folder) == rundir.STAGING
        rel = (os.path.dirname(rel) or ".") if running else rel
        label = (os.path.basename(os.path.abspath(run_dir)) if rel == "." else rel) + " (running)" * running
        with open(path) as f:  # a line cut by a kill or still being written has no newline yet
            rows = [json.loads(line) for line in f if line.endswith("\n")]
        stages.setdefault(stage_kind(args), {})[label] = rows
    return stages


def plot_stages(plt, kind, stages, path):
    fig, axes = plt.subplots(1, len(PANELS[kind]), figsize=(4.3 * len(PANELS[kind]), 3.4))
    for ax, key in zip(axes, PANELS[kind]):
        for label, rows in stages.items():
            points = [(r["step"], r[key]) for r in rows if key in r]
            if points:
                ax.plot(*zip(*points), label=label)
        ax.set_xlabel("optimizer step")
        ax.set_title(f"{kind.replace('_', ' ')}: {key}")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path + ".tmp.png")
    plt.close(fig)
    os.replace(path + ".tmp.png", path)


def main(argv=None):
    """-> {kind: path of its PNG} (kinds: sft, reward_model, dpo, summary)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a run's --output-dir")
    args = p.parse_args(argv)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("error: python -m minirlhf.plot needs matplotlib, an optional extra: "
                         "pip install matplotlib (or pip install 'minirlhf[plot]')") from None
    stages, summary = find_stages(args.run_dir), rundir.read_json(os.path.join(args.run_dir, "summary.json"))
    if not stages and summary is None:
        raise SystemExit(f"error: {args.run_dir}: no metrics.jsonl with an args.json beside it, and no summary.json:"
                         " pass the --output-dir of an iterate.py, train_dpo.py or train_rm.py run")
    out = os.path.join(args.run_dir, "plots")
    if os.path.exists(os.path.join(args.run_dir, rundir.MANIFEST)):
        rundir.claim(args.run_dir, ["plots"])
    os.makedirs(out, exist_ok=True)
    written = {}
    for kind in PANELS:
        if kind in stages:
            written[kind] = os.path.join(out, f"{kind}.png")
            plot_stages(plt, kind, stages[kind], written[kind])
    if summary is not None:  # the built-in task's proxy is put on the gold scale as iterate.py does
        builtin = (rundir.read_json(os.path.join(args.run_dir, "args.json")) or {}).get("sft_model", "") is None
        written["summary"] = evaluate.plot(summary["policies"], os.path.join(out, "summary.png"),
                                           task.TAU if builtin else 1.0)
    for kind, path in written.items():
        print(f"{kind}: {path}")
    return written


if __name__ == "__main__":
    main()
