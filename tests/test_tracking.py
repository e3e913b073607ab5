"""--report-to: TensorBoard event files hold metrics.jsonl's scalars and the arguments; wandb runs are named by
stage and grouped under the iterate.py run; a missing package is a clear error before any work."""
import json
import sys
import types

import pytest

import train_dpo
from minirlhf import tracking
from minirlhf.data import write_jsonl
from minirlhf.rundir import UserError
from test_train_dpo import synthetic_rows
from tiny import save_tiny


def test_tensorboard_event_files_hold_the_metrics(tmp_path, tokenizer, monkeypatch):
    """Killed after step 4 and resumed from its step-2 checkpoint: the event files hold each step once, as
    metrics.jsonl does (the resumed writer purges the killed run's steps 3 and 4)."""
    pytest.importorskip("tensorboard", reason="--report-to tensorboard needs the optional tensorboard package")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    save_tiny(tmp_path / "model", "llama3")
    tokenizer.save_pretrained(tmp_path / "model")
    write_jsonl(tmp_path / "train.jsonl", synthetic_rows(12, seed=0))
    out = tmp_path / "out"
    args = ["--model", str(tmp_path / "model"), "--train-data", str(tmp_path / "train.jsonl"), "--output-dir",
            str(out), "--batch-size", "4", "--grad-accum", "1", "--lr", "1e-3", "--max-length", "64",
            "--max-prompt-length", "32", "--save-steps", "2", "--report-to", "tensorboard"]
    monkeypatch.setenv("MINIRLHF_FAIL_AFTER_STEP", "4")
    with pytest.raises(RuntimeError, match="simulated kill"):
        train_dpo.main(args)
    monkeypatch.delenv("MINIRLHF_FAIL_AFTER_STEP")
    train_dpo.main(args + ["--resume"])
    lines = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [m["step"] for m in lines] == [1, 2, 3, 4, 5, 6]  # 12 pairs / 4 per step x 2 epochs
    events = EventAccumulator(str(out / "tensorboard")).Reload()
    tags = events.Tags()["scalars"]
    assert set(tags) == set(lines[0]) - {"step"}
    for tag in tags:
        points = events.Scalars(tag)
        assert [p.step for p in points] == [m["step"] for m in lines]
        assert [p.value for p in points] == pytest.approx([m[tag] for m in lines], rel=1e-6, abs=1e-9), tag
    args = events.Tensors("args/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert json.loads(args.strip("`\n")) == json.load(open(out / "args.json"))
    assert "tensorboard" in json.load(open(out / "manifest.json"))["files"]  # a rerun does not call it foreign


def fake_wandb(monkeypatch):
    """A stand-in `wandb` module recording init's arguments and every log call -> the list of its runs."""
    runs = []

    class Run:
        def __init__(self, **kw):
            self.init, self.logged, self.finished = kw, [], False
            runs.append(self)

        def log(self, scalars, step):
            self.logged.append((step, scalars))

        def finish(self):
            self.finished = True
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **kw: Run(**kw)))
    return runs


def test_wandb_runs_are_stages_grouped_under_the_iterate_run(tmp_path, monkeypatch):
    runs = fake_wandb(monkeypatch)
    monkeypatch.setenv("WANDB_PROJECT", "proj")
    group = tracking.start("wandb", tmp_path / "exp", {"iterations": 2}, group=True)
    stage = tracking.start("wandb", tmp_path / "exp" / "iter1" / "policy", {"lr": 0.1})
    stage.log({"step": 3, "loss": 0.5, "accuracy": 1, "note": "text is not a scalar"})
    stage.close()
    group.close()
    alone = tracking.start("wandb", tmp_path / "dpo", {"lr": 0.2})
    alone.close()
    (staged, single) = runs  # the iterate.py run itself is no wandb run: it logs no metrics.jsonl
    assert staged.init == dict(project="proj", name="iter1/policy", group="exp", config={"lr": 0.1},
                               dir=tmp_path / "exp" / "iter1" / "policy")
    assert staged.logged == [(3, {"loss": 0.5, "accuracy": 1})] and staged.finished
    assert (single.init["name"], single.init["group"]) == ("dpo", None) and tracking.GROUPS == []
    assert tracking.start("none", tmp_path, {}) is None


def test_missing_package_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    for group in (False, True):  # iterate.py's run too: before its first stage
        with pytest.raises(UserError, match="--report-to wandb needs the wandb package"):
            tracking.start("wandb", tmp_path, {}, group=group)
    assert tracking.GROUPS == []
