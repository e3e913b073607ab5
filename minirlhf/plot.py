"""Training curves from the files a run already wrote: one PNG per stage kind (matplotlib, an optional extra).

    python -m minirlhf.plot RUN_DIR      # an iterate.py run, or the folder of one train_dpo.py / train_rm.py run

Every folder in RUN_DIR with a metrics.jsonl and an args.json (a running stage's staging/, labelled "(running)")
is one line per panel against its optimizer step: sft.png (loss, lr, grad norm), reward_model.png (loss, accuracy,
margin), dpo.png (loss, margin, accuracy), ppo.png (policy and value loss, lr); summary.png from summary.json;
in RUN_DIR/plots/, added to its manifest.
"""
import argparse
import glob
import json
import os
import re

from minirlhf import rundir, task

PANELS = {"sft": ["loss", "lr", "grad_norm"], "reward_model": ["loss", "accuracy", "margin"],
          "dpo": ["loss", "margin", "accuracy"], "ppo": ["pg_loss", "vf_loss", "lr"]}  # stage kind -> the metrics.jsonl keys drawn, one panel each


def pyplot():
    """matplotlib.pyplot drawing to files, or None without matplotlib (an optional extra, not a dependency)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save(plt, fig, path):
    fig.tight_layout()
    fig.savefig(path + ".tmp.png")
    plt.close(fig)
    os.replace(path + ".tmp.png", path)


def find_stages(run_dir):
    """-> {kind: {label: [metrics.jsonl rows]}}, labels in natural order (iter2 before iter10)."""
    stages = {}
    paths = glob.glob(os.path.join(run_dir, "**", "metrics.jsonl"), recursive=True)
    for path in sorted(paths, key=lambda p: [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", p)]):
        folder = os.path.dirname(path)
        if (args := rundir.read_json(os.path.join(folder, "args.json"))) is None:
            continue
        rel, running = os.path.relpath(folder, run_dir), os.path.basename(folder) == rundir.STAGING
        rel = (os.path.dirname(rel) or ".") if running else rel
        label = (os.path.basename(os.path.abspath(run_dir)) if rel == "." else rel) + " (running)" * running
        with open(path) as f:  # a line cut by a kill or still being written has no newline yet
            rows = [json.loads(line) for line in f if line.endswith("\n")]
        kind = ("reward_model" if "kind" in args else "ppo" if "ppo_epochs" in args else  # train_rm/ppo/dpo.py
                "sft" if args.get("loss") == "sft" else "dpo")
        stages.setdefault(kind, {})[label] = rows
    return stages


def plot_stages(plt, kind, stages, path):
    fig, axes = plt.subplots(1, len(PANELS[kind]), figsize=(4.3 * len(PANELS[kind]), 3.4))
    for ax, key in zip(axes, PANELS[kind]):
        for label, rows in stages.items():
            if points := [(r["step"], r[key]) for r in rows if key in r]:
                ax.plot(*zip(*points), label=label)
        ax.set(xlabel="optimizer step", title=f"{kind.replace('_', ' ')}: {key}")
    axes[0].legend(fontsize=7)
    save(plt, fig, path)


def plot_summary(rows: dict, path, proxy_scale=1.0):
    """iterate.py's summary {policy: metrics}, "sft", "iter1".."iterT" as a path, others as lines. Left: gold and proxy
    reward times `proxy_scale` (task.TAU: a calibrated proxy), shifted to gold at SFT (a BT reward is defined up to a
    constant), over-optimisation a gap; middle: KL(pi || pi_0); right: gold against KL (Gao et al. 2023). -> path."""
    if (plt := pyplot()) is None:
        return None
    names = [n for n in rows if n == "sft" or (n.startswith("iter") and n[4:].isdigit())]
    baselines = [n for n in rows if n not in names]
    x, has_gold = list(range(len(names))), "gold_reward" in rows[names[0]]
    proxy, kl = ([rows[n][key] for n in names] for key in ("proxy_reward", "kl_to_ref"))
    gold = [rows[n]["gold_reward"] for n in names] if has_gold else None
    fig, axes = plt.subplots(1, 3 if has_gold else 2, figsize=(13 if has_gold else 9, 3.6))
    shift = rows["sft"]["gold_reward"] - proxy_scale * rows["sft"]["proxy_reward"] if has_gold else 0.0
    if has_gold:
        axes[0].plot(x, gold, "o-", color="C0", label="gold reward")
    axes[0].plot(x, [shift + proxy_scale * p for p in proxy], "s--", color="C1",
                 label="proxy reward" + (" (shifted to gold at SFT)" if has_gold else ""))
    axes[1].plot(x, kl, "o-", color="C0", label="online iterations")
    key = "gold_reward" if has_gold else "proxy_reward"
    for k, b in enumerate(baselines):
        axes[0].axhline(rows[b][key], color=f"C{k + 2}", ls=":", label=f"{b} ({key.split('_')[0]})")
        axes[1].axhline(rows[b]["kl_to_ref"], color=f"C{k + 2}", ls=":", label=b)
    for ax, title in zip(axes, ["reward", "KL(pi || pi_0)"]):
        ax.set_xticks(x, names)
        ax.set_title(title)
        ax.legend(fontsize=7)
    if has_gold:
        axes[2].plot(kl, gold, "o-", color="C0", label="online iterations")
        for n in names:
            axes[2].annotate(n, (rows[n]["kl_to_ref"], rows[n]["gold_reward"]), fontsize=7)
        for k, b in enumerate(baselines):
            axes[2].plot(rows[b]["kl_to_ref"], rows[b]["gold_reward"], "*", ms=10, color=f"C{k + 2}", label=b)
        axes[2].set(xlabel="KL(pi || pi_0)", ylabel="gold reward")
        axes[2].legend(fontsize=7)
    save(plt, fig, path)
    return path


def main(argv=None):
    """-> {kind: path of its PNG} (kinds: sft, reward_model, dpo, summary)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a run's --output-dir")
    args = p.parse_args(argv)
    if (plt := pyplot()) is None:
        raise SystemExit("error: python -m minirlhf.plot needs matplotlib, an optional extra: "
                         "pip install matplotlib (or pip install 'minirlhf[plot]')")
    stages, summary = find_stages(args.run_dir), rundir.read_json(os.path.join(args.run_dir, "summary.json"))
    if not stages and summary is None:
        raise SystemExit(f"error: {args.run_dir}: no metrics.jsonl with an args.json beside it, and no summary.json:"
                         " pass the --output-dir of an iterate.py, train_dpo.py or train_rm.py run")
    out = os.path.join(args.run_dir, "plots")
    if os.path.exists(os.path.join(args.run_dir, rundir.MANIFEST)):
        rundir.claim(args.run_dir, ["plots"])
    os.makedirs(out, exist_ok=True)
    written = {kind: os.path.join(out, f"{kind}.png") for kind in PANELS if kind in stages}
    for kind, path in written.items():
        plot_stages(plt, kind, stages[kind], path)
    if summary is not None:  # the built-in task's proxy is put on the gold scale as iterate.py does
        builtin = (rundir.read_json(os.path.join(args.run_dir, "args.json")) or {}).get("sft_model", "") is None
        written["summary"] = plot_summary(summary["policies"], os.path.join(out, "summary.png"),
                                          task.TAU if builtin else 1.0)
    for kind, path in written.items():
        print(f"{kind}: {path}")
    return written


if __name__ == "__main__":
    main()
