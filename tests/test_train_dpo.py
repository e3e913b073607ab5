"""train_dpo.py end to end on a tiny Llama and the conftest tokenizer: DPO starts at ln 2 and learns a rule,
the loss variants start where their formulas say, SFT lowers held-out NLL, gradient accumulation and resume are
exact, a non-finite loss stops the run, and two FSDP2 processes (killed and resumed) equal one."""
import json
import math
import os
import random
import socket
import subprocess
import sys

import pytest
import torch
import transformers
from safetensors.torch import load_file

import train_dpo
from minirlhf import rundir
from minirlhf.data import tokenize_preferences, write_jsonl
from tiny import save_tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def synthetic_rows(n, seed):
    """The learnable rule: chosen responses start with "yes", rejected ones with "no"; the rest is noise."""
    rng = random.Random(seed)

    def word():
        return "".join(rng.choice("abcdefgh") for _ in range(3))
    return [dict(prompt=f"tell me {word()}", chosen=f"yes {word()}", rejected=f"no {word()}") for _ in range(n)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer):
    d = tmp_path_factory.mktemp("dpo")
    save_tiny(d / "model", "llama3")
    tokenizer.save_pretrained(d / "model")  # the policy folder carries its tokenizer, as real checkpoints do
    rows = synthetic_rows(72, seed=0)
    write_jsonl(d / "train.jsonl", rows[:56])
    write_jsonl(d / "eval.jsonl", rows[56:])
    write_jsonl(d / "eight.jsonl", rows[:8])
    write_jsonl(d / "seven.jsonl", rows[:7])
    write_jsonl(d / "thirteen.jsonl", rows[:13])
    return d


def run(d, out, *extra):
    """In-process main() with test-sized settings (lr large enough to learn in a few steps)."""
    args = ["--model", str(d / "model"), "--output-dir", str(out), "--lr", "1e-3", "--warmup-ratio", "0",
            "--max-length", "64", "--max-prompt-length", "32", "--eval-fraction", "0", *map(str, extra)]
    return train_dpo.main(args)


def killed_after(step, d, out, args, monkeypatch):
    """A run of `args` into `out` killed after optimizer step `step` (MINIRLHF_FAIL_AFTER_STEP)."""
    monkeypatch.setenv("MINIRLHF_FAIL_AFTER_STEP", str(step))
    with pytest.raises(RuntimeError, match="simulated kill"):
        run(d, out, *args)
    monkeypatch.delenv("MINIRLHF_FAIL_AFTER_STEP")


def weights(out):
    return load_file(os.path.join(out, "model.safetensors"))


def assert_same_weights(a, b, atol):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=atol, rtol=0, msg=k)


def hf_logps(model, tokenizer, rows):
    """log p(chosen), log p(rejected) per row with transformers' own forward: (N, 2)."""
    pairs, _ = tokenize_preferences(rows, tokenizer)
    out = []
    for p in pairs:
        row = []
        for response in (p.chosen_ids, p.rejected_ids):
            ids = torch.tensor([p.prompt_ids + response])
            with torch.no_grad():
                logp = model(ids).logits[0, :-1].float().log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
            row.append(logp[len(p.prompt_ids) - 1:].sum())
        out.append(row)
    return torch.tensor(out)


def test_dpo_starts_at_ln2_and_learns_a_rule(setup, tmp_path, tokenizer):
    """Step 1: policy == reference, so every implicit reward is 0 and the loss is ln 2. After training the
    implicit reward ranks held-out pairs; transformers reads the saved model and agrees."""
    d, out = setup, tmp_path / "dpo"
    result = run(d, out, "--train-data", d / "train.jsonl", "--eval-data", d / "eval.jsonl", "--batch-size", 8,
                 "--grad-accum", 1, "--epochs", 2, "--lr-schedule", "cosine")
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    # 1e-5, not 0: the reference pass pads its batches differently, and MKL's sums depend on shapes and alignment
    assert first["step"] == 1 and abs(first["loss"] - math.log(2)) < 1e-5
    assert abs(first["chosen_reward"]) < 1e-5 and abs(first["rejected_reward"]) < 1e-5 and abs(first["margin"]) < 1e-5
    assert {"lr", "grad_norm", "tokens_per_sec", "accuracy"} <= first.keys()
    assert result["step"] == 14 and result["eval_accuracy"] >= 0.8 and result["eval_margin"] > 0
    assert json.loads((out / "eval.json").read_text())["eval_accuracy"] == result["eval_accuracy"]
    ref = load_file(out / "ref_logps.safetensors")
    assert ref["chosen_logps"].shape == (56,) and ref["eval_rejected_logps"].shape == (16,)

    rows = [json.loads(line) for line in (d / "eval.jsonl").read_text().splitlines()]
    policy = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    reference = transformers.AutoModelForCausalLM.from_pretrained(d / "model").eval()
    log_ratio = hf_logps(policy, tokenizer, rows) - hf_logps(reference, tokenizer, rows)  # (N, 2)
    assert log_ratio[:, 0].mean() > 0, "chosen responses did not gain log-probability over the reference"
    assert (log_ratio[:, 0] > log_ratio[:, 1]).float().mean() >= 0.8
    torch.testing.assert_close(ref["eval_chosen_logps"], hf_logps(reference, tokenizer, rows)[:, 0], atol=1e-4, rtol=0)


def test_empty_responses_train_as_the_stop_token_alone(setup, tmp_path, tokenizer):
    """A pair whose chosen or rejected response is "" is trained on, not dropped: its response is the EOS token,
    and its reference log-prob is log p(EOS | prompt) as transformers computes it."""
    d = setup
    rows = synthetic_rows(8, seed=3)
    for i in range(0, 8, 2):
        rows[i]["rejected"] = ""
    rows[1]["chosen"] = ""
    write_jsonl(d / "with_empty.jsonl", rows)
    out = tmp_path / "empty"
    result = run(d, out, "--train-data", d / "with_empty.jsonl", "--batch-size", 4, "--grad-accum", 1, "--epochs", 1)
    assert result["step"] == 2  # 8 pairs, none skipped
    ref = load_file(out / "ref_logps.safetensors")
    assert ref["rejected_tokens"][0::2].tolist() == [1.0] * 4 and ref["chosen_tokens"][1].item() == 1.0
    reference = transformers.AutoModelForCausalLM.from_pretrained(d / "model").eval()
    expected = hf_logps(reference, tokenizer, rows)
    torch.testing.assert_close(ref["chosen_logps"], expected[:, 0], atol=1e-4, rtol=0)
    torch.testing.assert_close(ref["rejected_logps"], expected[:, 1], atol=1e-4, rtol=0)


def test_loss_variants_at_the_first_step(setup, tmp_path):
    """Policy == reference at step 1, so IPO with length-normalised log-probs gives (0 - 1/(2 beta))^2 = 25 per
    pair, and RPO's term adds nll_coef x the chosen per-token NLL, read back from ref_logps.safetensors. Runs with
    activation checkpointing and a linear schedule."""
    d, out = setup, tmp_path / "ipo"
    run(d, out, "--train-data", d / "eight.jsonl", "--batch-size", 8, "--grad-accum", 1, "--max-steps", 1,
        "--loss", "ipo", "--length-normalize", "--nll-coef", 0.5, "--gradient-checkpointing", "--lr-schedule", "linear")
    ref = load_file(out / "ref_logps.safetensors")
    expected = 25 + 0.5 * (-ref["chosen_logps"] / ref["chosen_tokens"]).mean().item()
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert abs(first["loss"] - expected) < 1e-4 and abs(first["margin"]) < 1e-5


def test_sft_lowers_heldout_nll(setup, tmp_path):
    """--loss sft on a messages dataset, evaluated on a prompt/completion one: held-out NLL per token falls."""
    d = setup
    rows = synthetic_rows(72, seed=1)
    write_jsonl(tmp_path / "train.jsonl", [dict(messages=[{"role": "user", "content": r["prompt"]},
                                                          {"role": "assistant", "content": r["chosen"]}])
                                           for r in rows[:56]])
    write_jsonl(tmp_path / "eval.jsonl", [dict(prompt=r["prompt"], completion=r["chosen"]) for r in rows[56:]])
    common = ["--loss", "sft", "--train-data", tmp_path / "train.jsonl", "--eval-data", tmp_path / "eval.jsonl",
              "--batch-size", 8, "--grad-accum", 1]
    before = run(d, tmp_path / "sft0", *common, "--max-steps", 0)
    after = run(d, tmp_path / "sft", *common, "--epochs", 2)
    assert after["step"] == 14 and after["eval_nll"] < 0.8 * before["eval_nll"], (before, after)


def first_metrics(out):
    return json.loads((out / "metrics.jsonl").read_text().splitlines()[0])


@pytest.mark.parametrize("data", ["eight.jsonl", "seven.jsonl"])
def test_gradient_accumulation_equals_one_big_batch(setup, tmp_path, data):
    """One step on 8 (or 7) pairs at once == 4 accumulated micro-batches of 2 (7 pairs: 2+2+2+1): the same
    loss and gradient norm (before clipping, so a wrongly scaled mean shows), and the same updated weights.
    AdamW's eps is 1e-3 so that its update is a smooth function of the gradient: with 1e-8 a gradient entry
    near 1e-8 makes g / (|g| + eps) swing with the last bits of the summation order."""
    d = setup
    for name, batch, accum in [("big", 8, 1), ("accum", 2, 4)]:
        run(d, tmp_path / name, "--train-data", d / data, "--batch-size", batch, "--grad-accum", accum,
            "--max-steps", 1, "--max-grad-norm", 0.5, "--weight-decay", 0.1, "--adam-eps", 1e-3)
    big, accum = first_metrics(tmp_path / "big"), first_metrics(tmp_path / "accum")
    assert big["grad_norm"] > 0.5  # clipping was active
    for key in "loss", "grad_norm":
        assert big[key] == pytest.approx(accum[key], rel=1e-5), key
    assert_same_weights(tmp_path / "big", tmp_path / "accum", atol=1e-6)
    assert_same_weights(tmp_path / "big", d / "model", atol=2e-3)  # one step with lr 1e-3 moved every weight
    with pytest.raises(AssertionError):
        assert_same_weights(tmp_path / "big", d / "model", atol=1e-4)


def test_resume_after_kill_equals_uninterrupted_run(setup, tmp_path, monkeypatch):
    """A run killed after step 3 (last checkpoint at step 2) and resumed ends with the uninterrupted weights:
    optimizer moments, LR schedule (cosine with warmup) and data position all come back; the reference
    log-probs are read from disk, not recomputed. --save-total-limit 3 keeps the last two checkpoints before the
    final one as checkpoint-STEP (a finished run drops the final one's optimizer state, not those)."""
    d = setup
    args = ["--train-data", d / "train.jsonl", "--batch-size", 4, "--grad-accum", 2, "--epochs", 2,
            "--warmup-ratio", 0.2, "--save-steps", 2, "--adam-eps", 1e-3]  # eps: see the accumulation test
    full = run(d, tmp_path / "full", *args)
    killed_after(3, d, tmp_path / "killed", [*args, "--save-total-limit", 3], monkeypatch)
    assert json.loads((tmp_path / "killed/checkpoint/trainer_state.json").read_text())["step"] == 2
    ref_file = tmp_path / "killed/staging/ref_logps.safetensors"  # the run in progress, published at its end
    mtime = ref_file.stat().st_mtime_ns
    resumed = run(d, tmp_path / "killed", *args, "--resume", "--save-total-limit", 3)
    assert sorted(p.name for p in tmp_path.glob("killed/checkpoint*")) == ["checkpoint-10", "checkpoint-12"]
    assert json.loads((tmp_path / "killed/checkpoint-12/trainer_state.json").read_text())["step"] == 12
    assert not list(tmp_path.glob("full/checkpoint*"))
    assert (tmp_path / "killed/ref_logps.safetensors").stat().st_mtime_ns == mtime  # moved in, not recomputed
    assert resumed["step"] == full["step"] == 14
    assert_same_weights(tmp_path / "full", tmp_path / "killed", atol=1e-6)
    steps = [json.loads(line)["step"] for line in (tmp_path / "killed/metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 15))
    run(d, tmp_path / "killed", *args, "--max-steps", 1)  # a new run into the finished folder clears them
    assert not list(tmp_path.glob("killed/checkpoint*"))


def test_nonfinite_step_leaves_a_good_checkpoint_to_resume_with_a_lower_lr(setup, tmp_path, monkeypatch):
    """A run killed after step 3 (checkpoint at step 2) resumes with an absurd lr: step 3 is finite but blows the
    weights up, step 4 is not finite. The run stops before updating, the kept checkpoint is still step 2's (saved
    only once the next step came out finite; before, step 3's blown-up weights were kept), the message says
    which step and how to resume, and resuming from it with a sane lr finishes."""
    d, out = setup, tmp_path / "nan"
    common = ["--train-data", d / "eight.jsonl", "--batch-size", 4, "--grad-accum", 1, "--epochs", 3, "--save-steps", 1]
    killed_after(3, d, out, common, monkeypatch)
    with pytest.raises(FloatingPointError, match=r"step 4: .*not finite.*checkpoint, .*checkpoint \(step 2\), "
                                                 r"with --resume --lr LOWER --allow-changed-args"):
        run(d, out, *common, "--resume", "--lr", 1e30, "--allow-changed-args")
    assert json.loads((out / "checkpoint/trainer_state.json").read_text())["step"] == 2
    assert max(w.abs().max().item() for w in weights(out / "checkpoint").values()) < 10
    assert not (out / "model.safetensors").exists()
    result = run(d, out, *common, "--resume", "--allow-changed-args")
    assert result["step"] == 6 and math.isfinite(result["train_loss"])


def test_foreign_files_are_refused_and_kept(setup, tmp_path):
    """A folder holding files this program did not write is refused before any work, naming them and --overwrite;
    with --overwrite the run goes ahead and the user's files that do not share a name with ours stay."""
    d, out = setup, tmp_path / "out"
    out.mkdir()
    mine = ["model_backup.safetensors", "model-v1.safetensors", "model_old.index.json"]
    for name in mine:
        (out / name).write_text("user data")
    (out / "checkpoint").mkdir()
    (out / "checkpoint" / "notes.txt").write_text("user data")
    args = ["--train-data", d / "eight.jsonl", "--batch-size", 8, "--grad-accum", 1, "--max-steps", 1]
    with pytest.raises(ValueError, match=r"did not write: \['checkpoint', 'model-v1.safetensors', 'model_backup."
                                         r"safetensors', 'model_old.index.json'\].*--overwrite"):
        run(d, out, *args)
    assert (out / "checkpoint" / "notes.txt").exists() and not (out / "args.json").exists()
    (out / "checkpoint" / "notes.txt").unlink()
    (out / "checkpoint").rmdir()
    run(d, out, *args, "--overwrite")
    assert all((out / name).read_text() == "user data" for name in mine) and (out / "done.json").exists()


def test_a_folder_describes_one_run_until_the_next_one_publishes(setup, tmp_path, monkeypatch):
    """A finished folder rerun with other values: an input error and a kill leave its args, metrics, eval,
    weights and done.json those of the first run; a finished rerun replaces them all together."""
    d, out = setup, tmp_path / "out"
    args = ["--train-data", d / "eight.jsonl", "--batch-size", 4, "--grad-accum", 1, "--epochs", 2]
    run(d, out, *args)
    files = ["args.json", "metrics.jsonl", "eval.json", "model.safetensors", "done.json", "config.json"]
    before = {name: (out / name).read_bytes() for name in files}
    (tmp_path / "bad.jsonl").write_text('{"prompt": "hi", "chosen": "a"}\n')
    with pytest.raises(ValueError, match="bad.jsonl: row 0: field 'rejected'"):
        run(d, out, *args, "--lr", 1e-2, "--train-data", tmp_path / "bad.jsonl")
    killed_after(1, d, out, [*args, "--lr", 1e-2, "--overwrite"], monkeypatch)
    assert {name: (out / name).read_bytes() for name in files} == before
    run(d, out, *args, "--lr", 1e-2, "--overwrite")  # --overwrite: drop the killed run's checkpoint
    assert json.loads((out / "args.json").read_text())["lr"] == 1e-2 and not (out / "staging").exists()
    lrs = [json.loads(line)["lr"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lrs) == 4 and lrs[0] == 1e-2
    assert json.loads((out / "done.json").read_text())["step"] == 4
    assert (out / "model.safetensors").read_bytes() != before["model.safetensors"]


def test_resume_refuses_changed_arguments_and_a_held_folder(setup, tmp_path, monkeypatch, capsys):
    """--resume with another lr or batch size is refused with the list, and so is other data under the same path
    (the reference log-probs' fingerprint); --save-steps may differ. A second run into a folder that a live run
    holds is refused with the holder's pid."""
    d, out = setup, tmp_path / "out"
    args = ["--train-data", d / "eight.jsonl", "--batch-size", 4, "--grad-accum", 1, "--epochs", 2, "--save-steps", 1]
    killed_after(2, d, out, args, monkeypatch)
    with pytest.raises(ValueError, match=r"--batch-size: recorded 4, now 2\n  --lr: recorded 0.001, now 0.002"):
        run(d, out, *args, "--resume", "--lr", 2e-3, "--batch-size", 2)
    held = rundir.lock(out)
    with pytest.raises(ValueError, match=rf"in use by pid {os.getpid()}"):
        run(d, out, *args, "--resume")
    rundir.unlock(held)
    write_jsonl(tmp_path / "edited.jsonl", synthetic_rows(8, seed=5))  # other rows under the recorded path
    os.replace(d / "eight.jsonl", tmp_path / "eight.jsonl")
    os.replace(tmp_path / "edited.jsonl", d / "eight.jsonl")
    try:
        with pytest.raises(ValueError, match="differ from those the run began with"):
            run(d, out, *args, "--resume")
    finally:
        os.replace(tmp_path / "eight.jsonl", d / "eight.jsonl")
    assert run(d, out, *args, "--resume", "--save-steps", 3)["step"] == 4
    assert "resuming from" in capsys.readouterr().out


def test_ipo_without_length_normalize_says_how_it_differs_from_trl(setup, tmp_path, capsys):
    with pytest.raises(ValueError):  # the note comes first, before any input is read
        run(setup, tmp_path / "o", "--train-data", tmp_path / "missing.jsonl", "--loss", "ipo")
    assert "note: IPO on summed log-probs" in capsys.readouterr().out


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_fsdp_processes_equal_one(setup, tmp_path):
    """torchrun with 2 gloo ranks (FSDP2, batch 2 per rank), killed after step 3 and resumed from its step-2
    checkpoint (per-rank optimizer shards back into DTensors), ends where 1 process with batch 4 ends (global
    batch 8). 10 training pairs make every second window short: rank 1 then runs a zero-weight forward."""
    d = setup
    common = ["--model", d / "model", "--train-data", d / "thirteen.jsonl", "--eval-fraction", 0.25, "--lr", "1e-3",
              "--epochs", 3, "--grad-accum", 2, "--warmup-ratio", 0.2, "--max-length", 64, "--max-prompt-length", 32,
              "--save-steps", 2, "--adam-eps", 1e-3]
    common = list(map(str, common))
    one = train_dpo.main(common + ["--batch-size", "4", "--output-dir", str(tmp_path / "one")])
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", os.path.join(ROOT, "train_dpo.py"), *common, "--batch-size", "2",
           "--output-dir", str(tmp_path / "two")]
    killed = subprocess.run(cmd, env={**env, "MINIRLHF_FAIL_AFTER_STEP": "3"}, capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode != 0 and "simulated kill" in killed.stderr, killed.stderr[-3000:]
    assert sorted(f for f in os.listdir(tmp_path / "two/checkpoint") if f.startswith("optimizer")) == \
        ["optimizer.rank0.safetensors", "optimizer.rank1.safetensors"]
    cmd[4] = f"--master-port={free_port()}"
    proc = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resuming from" in proc.stdout
    two = json.loads((tmp_path / "two/eval.json").read_text())
    assert one["step"] == two["step"] == 6
    assert abs(one["eval_accuracy"] - two["eval_accuracy"]) < 1e-6
    assert abs(one["eval_margin"] - two["eval_margin"]) < 1e-4
    assert_same_weights(tmp_path / "one", tmp_path / "two", atol=1e-4)
    grad_norms = [[json.loads(line)["grad_norm"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
                  for name in ("one", "two")]
    assert grad_norms[0] == pytest.approx(grad_norms[1], rel=1e-4)  # FSDP's mean over ranks undone exactly


def test_bf16_input_saves_bf16_drops_the_optimizer_and_logs_plain_lines(setup, tmp_path, tokenizer, capsys):
    """A bf16 checkpoint comes out bf16 (not fp32, twice the disk) and its finished run leaves no optimizer state
    unless --keep-optimizer; with stdout not a terminal, the stage's progress lines carry its name; a run of 4
    steps is warned of; --eval-every logs held-out implicit-reward accuracy and margin during training."""
    from safetensors import safe_open
    from minirlhf.checkpoint import load_model, save_model
    save_model(load_model(setup / "model"), tmp_path / "bf16", tokenizer, dtype=torch.bfloat16)
    flags = ["--model", tmp_path / "bf16", "--train-data", setup / "eight.jsonl", "--batch-size", 4, "--grad-accum",
             1, "--name", "iter2 dpo", "--eval-every", 1]
    run(setup, tmp_path / "out", *flags, "--eval-fraction", 0.25)
    printed = capsys.readouterr().out
    assert "warning: only 4 optimizer step(s): 6 pairs in windows of batch 4 x accum 1 x world size 1" in printed
    assert "iter2 dpo: step 4/4 loss" in printed
    metrics = [json.loads(line) for line in open(tmp_path / "out" / "metrics.jsonl")]
    assert all({"eval_accuracy", "eval_margin"} <= m.keys() for m in metrics[:3]) and metrics[0]["eval_margin"] != 0
    kept = run(setup, tmp_path / "kept", *flags, "--keep-optimizer", "--save-dtype", "float32")
    for out, code in [("out", "BF16"), ("kept", "F32")]:
        with safe_open(tmp_path / out / "model.safetensors", "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {code}
        assert json.load(open(tmp_path / out / "config.json"))["dtype"] == {"BF16": "bfloat16", "F32": "float32"}[code]
    assert not (tmp_path / "out" / "checkpoint").exists()
    assert (tmp_path / "kept" / "checkpoint" / "optimizer.rank0.safetensors").exists() and kept["step"] == 4
