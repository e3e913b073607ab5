"""Output folders (minirlhf/rundir.py): the lock, the manifest that refuses foreign files, the argument check, and
the publish step that moves a run's files in together, config.json and done.json last."""
import json
import os

import pytest

from minirlhf import rundir
from tiny import save_tiny


def test_lock_refuses_a_second_holder_and_reports_a_stale_one(tmp_path, capsys):
    held = rundir.lock(tmp_path)
    with pytest.raises(rundir.UserError, match=rf"in use by pid {os.getpid()} on host .*{tmp_path}/.lock"):
        rundir.lock(tmp_path)
    rundir.unlock(held)
    assert (tmp_path / ".lock").read_text() == ""  # released cleanly: nothing stale to report
    rundir.unlock(rundir.lock(tmp_path))
    assert "note" not in capsys.readouterr().out
    (tmp_path / ".lock").write_text("pid 999999 on host elsewhere\n")  # what a killed holder leaves
    rundir.unlock(rundir.lock(tmp_path))
    assert "was left by pid 999999 on host elsewhere" in capsys.readouterr().out


def test_foreign_files_are_those_not_in_the_manifest(tmp_path):
    for name in ["model.safetensors", "model_backup.safetensors", ".checkpoint.old", ".x.tmp-1234abcd",
                 "metrics.jsonl.tmp-0badcafe"]:
        (tmp_path / name).write_text("")
    (tmp_path / "checkpoint").mkdir()
    rundir.claim(tmp_path, ["model.safetensors", "metrics.jsonl"])
    rundir.claim(tmp_path, ["checkpoint"])  # claims add up
    assert rundir.foreign_files(tmp_path) == [".x.tmp-1234abcd", "model_backup.safetensors"]


def test_changed_args_lists_what_changes_results():
    recorded = {"lr": 1e-3, "loss": "dpo", "save_steps": 2, "data": "a.jsonl"}
    new = {"lr": 2e-3, "loss": "dpo", "save_steps": 5, "data": "b.jsonl", "beta": 0.1}
    assert rundir.changed_args(recorded, new, ignore=("save_steps",)) == [
        "--beta: recorded None, now 0.1", "--data: recorded 'a.jsonl', now 'b.jsonl'",
        "--lr: recorded 0.001, now 0.002"]


def test_publish_moves_a_run_in_together(tmp_path, monkeypatch):
    """An earlier sharded model's files go, a user's file stays (never in the manifest), config.json and
    done.json come last, and a publish killed halfway leaves neither, so the folder loads as no mix of two runs."""
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    save_tiny(ckpt, "llama3")
    out.mkdir()
    for name in ["model-00001-of-00002.safetensors", "model.safetensors.index.json"]:
        (out / name).write_text("old")
    rundir.claim(out, [], published=["model-00001-of-00002.safetensors", "model.safetensors.index.json"])
    (out / "notes.txt").write_text("mine")
    run = rundir.start(out, {"lr": 1}, ["args.json"], overwrite=True)  # notes.txt is foreign
    order = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: real_replace(a, b) or (
        os.path.basename(os.path.dirname(a)) == "staging" and order.append(os.path.basename(b))))
    run.publish(ckpt, {"eval.json": {"accuracy": 0.5}})
    run.close()
    assert order[-2:] == ["config.json", "done.json"] and "model.safetensors" in order
    assert sorted(os.listdir(out)) == sorted([
        "notes.txt", ".lock", "manifest.json", "done.json", "args.json", "eval.json", "config.json",
        "generation_config.json", "model.safetensors"])
    assert json.loads((out / "done.json").read_text())["accuracy"] == 0.5
    assert json.loads((out / "args.json").read_text()) == {"lr": 1}

    def kill(a, b):
        if os.path.basename(b) == "model.safetensors":
            raise KeyboardInterrupt
        real_replace(a, b)
    monkeypatch.setattr(os, "replace", kill)
    run = rundir.start(out, {"lr": 1}, ["args.json"], overwrite=True)
    with pytest.raises(KeyboardInterrupt):
        run.publish(ckpt, {"eval.json": {}})
    run.close()
    assert not (out / "config.json").exists() and not (out / "done.json").exists()


def test_refusals_before_any_work(tmp_path):
    """Foreign files name --overwrite; an unfinished run's checkpoint names --resume; a rerun of a non-staged
    folder (iterate.py) with other arguments lists them; nothing is written or deleted by a refusal."""
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "model_old.index.json").write_text("{}")
    with pytest.raises(rundir.UserError, match=r"\['model_old.index.json'\].*--overwrite"):
        rundir.start(tmp_path / "a", {}, [])
    assert sorted(os.listdir(tmp_path / "a")) == [".lock", "model_old.index.json"]
    run = rundir.start(tmp_path / "b", {}, [])
    os.makedirs(tmp_path / "b" / "checkpoint")
    (tmp_path / "b" / "checkpoint" / "trainer_state.json").write_text('{"step": 3}')
    run.close()
    with pytest.raises(rundir.UserError, match=r"unfinished run \(step 3\): pass --resume"):
        rundir.start(tmp_path / "b", {}, [])
    assert (tmp_path / "b" / "checkpoint" / "trainer_state.json").exists()
    rundir.start(tmp_path / "c", {"seed": 0, "beta": 0.1, "resume": False}, [], staged=False).close()
    with pytest.raises(rundir.UserError, match=r"--beta: recorded 0.1, now 0.5\n  --seed: recorded 0, now 7"):
        rundir.start(tmp_path / "c", {"seed": 7, "beta": 0.5, "resume": True}, [], staged=False, ignore=("resume",))
    assert json.loads((tmp_path / "c" / "args.json").read_text())["seed"] == 0


def test_writes_are_durable(tmp_path, monkeypatch):
    """The file's data is fsynced before the rename that publishes it, and its folder after (the rename itself)."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
                        or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", str(b))) or real_replace(a, b))
    rundir.atomic_write_json(tmp_path / "x.json", {"a": 1})
    assert [e[0] for e in events] == ["fsync", "replace", "fsync"]
    assert events[0][1].startswith(str(tmp_path / "x.json.tmp-")) and events[2][1] == str(tmp_path)
    with pytest.raises(ValueError):  # NaN is not JSON: refused, not written
        rundir.atomic_write_json(tmp_path / "y.json", {"a": float("nan")})
    assert not (tmp_path / "y.json").exists()
