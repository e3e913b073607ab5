"""python -m minirlhf.plot: every stage of a run folder found, sorted by kind and labelled by folder (a running
stage from its staging/, without its half-written last line); one PNG per kind; a clear message without
matplotlib or without any run file."""
import json
import os
import sys

import pytest

from minirlhf import plot
from minirlhf.data import write_jsonl
from minirlhf.rundir import atomic_write_json, manifest


def stage(folder, args, rows, partial=""):
    atomic_write_json(os.path.join(folder, "args.json"), args)
    write_jsonl(os.path.join(folder, "metrics.jsonl"), rows)
    with open(os.path.join(folder, "metrics.jsonl"), "a") as f:
        f.write(partial)


def curve(n, **keys):
    return [dict(step=s, **{k: v + 0.1 * s for k, v in keys.items()}) for s in range(1, n + 1)]


@pytest.fixture
def run_dir(tmp_path):
    """A built-in-task iterate.py folder: SFT, a reward model and its refit, offline DPO, iter1 and iter10 done
    and iter11 still running."""
    run = tmp_path / "exp"
    atomic_write_json(run / "args.json", {"sft_model": None, "iterations": 11})
    atomic_write_json(run / "manifest.json", {"files": ["args.json", "sft"], "published": []})
    stage(run / "sft", {"loss": "sft"}, curve(3, loss=2.0, lr=0.1, grad_norm=1.0))
    stage(run / "reward_model", {"kind": "bt"}, curve(4, loss=0.7, accuracy=0.5, margin=0.0))
    stage(run / "iter1" / "reward_model", {"kind": "bt"}, curve(2, loss=0.6, accuracy=0.6, margin=0.1))
    for name in ["offline_dpo", "iter1/policy", "iter10/policy"]:
        stage(run / name, {"loss": "dpo"}, curve(5, loss=0.69, margin=0.0, accuracy=0.5))
    stage(run / "iter11" / "policy" / "staging", {"loss": "ipo"}, curve(2, loss=0.69), partial='{"step": 3, "lo')
    rows = {n: dict(gold_reward=0.5 + k / 10, proxy_reward=k / 5, kl_to_ref=k / 3)
            for k, n in enumerate(["sft", "offline_dpo", "iter1", "iter2"])}
    atomic_write_json(run / "summary.json", {"policies": rows})
    return run


def test_stages_sorted_by_kind_and_labelled_by_folder(run_dir):
    stages = plot.find_stages(run_dir)
    assert {kind: list(s) for kind, s in stages.items()} == {
        "sft": ["sft"], "reward_model": ["iter1/reward_model", "reward_model"],
        "dpo": ["iter1/policy", "iter10/policy", "iter11/policy (running)", "offline_dpo"]}
    assert stages["dpo"]["iter11/policy (running)"] == curve(2, loss=0.69)  # the cut last line is left out
    assert {k: list(s) for k, s in plot.find_stages(run_dir / "sft").items()} == {"sft": ["sft"]}  # one stage


def test_one_png_per_stage_kind(run_dir):
    plt = pytest.importorskip("matplotlib.pyplot", reason="minirlhf.plot draws with the optional matplotlib")
    written = plot.main([str(run_dir)])
    assert written == {kind: str(run_dir / "plots" / f"{kind}.png") for kind in ["sft", "reward_model", "dpo",
                                                                                 "summary"]}
    for path in written.values():
        image = plt.imread(path)
        assert image.shape[0] > 200 and image.std() > 0.05  # drawn, not blank
    assert "plots" in manifest(run_dir)["files"]  # a rerun of iterate.py does not refuse the folder
    assert sorted(os.listdir(run_dir / "plots")) == ["dpo.png", "reward_model.png", "sft.png", "summary.png"]


def test_clear_messages(run_dir, tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match="no metrics.jsonl"):
        plot.main([str(tmp_path / "empty")])
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    with pytest.raises(SystemExit, match=r"needs matplotlib, an optional extra: pip install matplotlib"):
        plot.main([str(run_dir)])
    assert json.load(open(run_dir / "manifest.json"))["files"] == ["args.json", "sft"]  # nothing written
