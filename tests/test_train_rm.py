"""train_rm.py end to end on a tiny model: both kinds learn a preference rule, the saved BT model scores the same
in `transformers`, the margin column enters the loss, and two FSDP processes give the loss curve of one."""
import json
import os
import random
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file

import train_rm
from minirlhf import rewards
from minirlhf.checkpoint import load_model
from minirlhf.data import collate_pairs, load_preferences, write_jsonl
from tiny import save_tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ["apple", "river", "stone", "cloud", "music", "light", "tree", "water", "fire", "paper"]


def preference_rows(n, seed, margin=False):
    """The rule to learn: the chosen response contains the word "good", the rejected one "bad", both hidden
    among 2-4 random words at a random place."""
    r = random.Random(seed)
    rows = []
    for _ in range(n):
        chosen, rejected = ([r.choice(WORDS) for _ in range(r.randint(2, 4))] for _ in range(2))
        chosen.insert(r.randint(0, len(chosen)), "good")
        rejected.insert(r.randint(0, len(rejected)), "bad")
        row = dict(prompt="tell me about " + r.choice(WORDS), chosen=" ".join(chosen), rejected=" ".join(rejected))
        rows.append(row | ({"margin": r.choice([0.0, 1.0, 3.0])} if margin else {}))
    return rows


@pytest.fixture
def setup(tmp_path, tokenizer):
    """A tiny Llama (vocab = the test tokenizer's) with the tokenizer saved next to it, and train/eval data."""
    save_tiny(tmp_path / "model", "llama3", vocab_size=len(tokenizer))
    tokenizer.save_pretrained(tmp_path / "model")
    write_jsonl(tmp_path / "train.jsonl", preference_rows(512, 0))
    write_jsonl(tmp_path / "eval.jsonl", preference_rows(100, 1))
    return tmp_path


def flags(path, kind, out, *extra):
    return ["--kind", kind, "--model", str(path / "model"), "--train-data", str(path / "train.jsonl"),
            "--eval-data", str(path / "eval.jsonl"), "--output-dir", str(path / out), "--max-length", "128",
            "--seed", "0", *extra]


def test_bt_learns_and_transformers_scores_the_same(setup, tokenizer):
    out = setup / "bt"
    result = train_rm.main(flags(setup, "bt", "bt", "--lr", "3e-3", "--batch-size", "16", "--warmup-ratio", "0"))
    assert result["accuracy"] >= 0.9 and result["pairs"] == 100
    assert json.load(open(out / "eval.json"))["accuracy"] == result["accuracy"]
    metrics = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [m["step"] for m in metrics] == list(range(1, 33))  # 512 pairs / 16 per step, one epoch
    assert metrics[-1]["loss"] < 0.5 * metrics[0]["loss"]
    assert json.load(open(out / "args.json"))["lr"] == 3e-3

    # the saved folder is a transformers *ForSequenceClassification with the tokenizer, scoring like ours
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    ours = load_model(out, kind="reward").eval()
    pairs, _ = load_preferences(setup / "eval.jsonl", transformers.AutoTokenizer.from_pretrained(out))
    batch = collate_pairs(pairs[:8], tokenizer.pad_token_id)  # right-padded, ragged
    with torch.no_grad():
        expected = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
        torch.testing.assert_close(ours(batch["input_ids"], batch["attention_mask"]), expected, atol=1e-4, rtol=0)


def test_pairwise_learns(setup):
    out = setup / "pm"
    result = train_rm.main(flags(setup, "pairwise", "pm", "--lr", "3e-3", "--batch-size", "16", "--warmup-ratio", "0"))
    assert result["accuracy"] >= 0.85
    assert json.load(open(out / "pairwise.json"))["label_tokens"] == ["A", "B"]
    assert json.load(open(out / "config.json"))["architectures"] == ["LlamaForCausalLM"]
    assert os.path.isfile(out / "tokenizer.json") and os.path.isfile(out / "metrics.jsonl")
    # as iterate.py uses it: the response with "good" wins the all-pairs ranking of each prompt
    rows = preference_rows(6, 3)
    responses = [[row["rejected"], row["chosen"], row["rejected"].replace("bad", "fire")] for row in rows]
    scores = rewards.load_reward_source(out)([row["prompt"] for row in rows], responses)
    assert all(max(sc) == sc[1] for sc in scores)


def test_margin_column_enters_the_loss(tmp_path, tokenizer):
    """One step over the whole set (16 pairs in one batch): the logged loss is mean softplus(r_r - r_c + m) of
    the initial model, whose new score head is drawn from the seed."""
    save_tiny(tmp_path / "model", "llama3", vocab_size=len(tokenizer))
    tokenizer.save_pretrained(tmp_path / "model")
    rows = preference_rows(16, 2, margin=True)
    write_jsonl(tmp_path / "train.jsonl", rows)
    base = ["--model", str(tmp_path / "model"), "--train-data", str(tmp_path / "train.jsonl"), "--batch-size", "16",
            "--max-steps", "1", "--eval-fraction", "0", "--seed", "5", "--max-length", "128"]
    train_rm.main(base + ["--output-dir", str(tmp_path / "m"), "--margin-column", "margin", "--gradient-checkpointing"])
    train_rm.main(base + ["--output-dir", str(tmp_path / "no_m")])
    model = load_model(tmp_path / "model", kind="reward", seed=5).eval()
    pairs, _ = load_preferences(tmp_path / "train.jsonl", tokenizer, max_length=128, whole=True)  # as train_rm reads
    batch = collate_pairs(pairs, tokenizer.pad_token_id)
    with torch.no_grad():
        r = model(batch["input_ids"], batch["attention_mask"])
    margin = torch.tensor([row["margin"] for row in rows])
    for out, m in (("m", margin), ("no_m", 0.0)):
        logged = json.loads(open(tmp_path / out / "metrics.jsonl").readline())["loss"]
        assert abs(logged - F.softplus(r[16:] - r[:16] + m).mean().item()) < 1e-5


def test_margins_follow_their_rows_when_bad_rows_are_skipped(tmp_path, tokenizer):
    """Rows 2 (identical responses), 4 (no chosen) and 5 (a prompt longer than --max-length) are skipped in both
    kinds; each bt pair keeps the margin of its own row (data.Pair.row), not of the row at its position."""
    rows = [row | {"margin": float(i)} for i, row in enumerate(preference_rows(6, 4))]
    rows[2]["rejected"] = rows[2]["chosen"]
    del rows[4]["chosen"]
    rows[5]["prompt"] = " ".join(WORDS * 20)
    write_jsonl(tmp_path / "train.jsonl", rows)
    examples = {}
    for kind in ("bt", "pairwise"):
        args = train_rm.build_parser().parse_args([
            "--kind", kind, "--model", "unused", "--train-data", str(tmp_path / "train.jsonl"), "--output-dir",
            str(tmp_path / "out"), "--max-length", "128", "--margin-column", "margin", "--skip-bad-rows"])
        examples[kind] = train_rm.load_examples(args, tokenizer, args.train_data, "train")
    assert len(examples["pairwise"]) == 3
    assert [(pair.row, margin) for pair, margin in examples["bt"]] == [(0, 0.0), (1, 1.0), (3, 3.0)]

@pytest.mark.parametrize("kind", ["bt", "pairwise"])
def test_resume_after_kill_equals_uninterrupted_run(setup, kind, monkeypatch):
    """Killed after step 3 (checkpoint at step 2, saved once step 3's forward came out finite) and resumed: the
    weights equal the uninterrupted run's exactly (optimizer moments, both param groups, schedule and data
    position come back), the metrics are one line per step, and pairwise.json is published with the model."""
    common = ["--lr", "3e-3", "--batch-size", "16", "--max-steps", "5", "--warmup-ratio", "0.4", "--save-steps", "2",
              "--train-data", str(setup / "eval.jsonl"), "--eval-fraction", "0.2"]
    full = train_rm.main(flags(setup, kind, "full", *common))
    monkeypatch.setenv("MINIRLHF_FAIL_AFTER_STEP", "3")
    with pytest.raises(RuntimeError, match="simulated kill"):
        train_rm.main(flags(setup, kind, "killed", *common))
    monkeypatch.delenv("MINIRLHF_FAIL_AFTER_STEP")
    assert json.load(open(setup / "killed/checkpoint/trainer_state.json"))["step"] == 2
    resumed = train_rm.main(flags(setup, kind, "killed", *common, "--resume"))
    assert resumed["step"] == full["step"] == 5 and resumed["accuracy"] == full["accuracy"]
    a, b = (load_file(setup / name / "model.safetensors") for name in ("full", "killed"))
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) == 0
    metrics = [json.loads(line) for line in open(setup / "killed/metrics.jsonl")]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5]
    assert metrics[0]["lr"] == 3e-3 / 2  # losses.lr_at: 2 warmup steps, the first already at half the peak
    assert os.path.exists(setup / "killed/done.json")
    assert os.path.exists(setup / "killed/pairwise.json") == (kind == "pairwise")


@pytest.mark.parametrize("script", ["train_rm", "train_dpo", "iterate"])
def test_every_flag_documented_unknown_and_abbreviated_flags_rejected(script):
    parser = __import__(script).build_parser()
    assert all(a.help for a in parser._actions)
    valid = [] if script == "iterate" else ["--model", "m", "--train-data", "d"]
    assert parser.parse_args(valid + ["--output-dir", "o"]).output_dir == "o"
    for bad in (["--no-such-flag"], ["--output-d", "o"]):  # "--output-d": a prefix of --output-dir
        with pytest.raises(SystemExit):
            parser.parse_args(valid + ["--output-dir", "o"] + bad)


def test_bad_rows_name_row_and_field_and_are_counted_per_reason(setup, capsys):
    rows = [dict(prompt="hi", chosen="a b", rejected="c d"), dict(prompt="hi", chosen="a b"),
            dict(prompt="hi", chosen="c d", rejected="c d"), dict(prompt="", chosen="a", rejected="b")]
    write_jsonl(setup / "bad.jsonl", rows)
    for kind in ("bt", "pairwise"):
        with pytest.raises(ValueError, match=r"bad.jsonl: row 1: field 'rejected'"):
            train_rm.main(flags(setup, kind, "x", "--train-data", str(setup / "bad.jsonl")))
        train_rm.main(flags(setup, kind, kind, "--train-data", str(setup / "bad.jsonl"), "--skip-bad-rows",
                            "--batch-size", "1", "--max-steps", "1"))
        assert "skipped 3 bad rows of 4: {'missing': 1, 'identical': 1, 'empty': 1}" in capsys.readouterr().out


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["bt", "pairwise"])
def test_two_fsdp_processes_match_one(setup, kind):
    """Global batch 8 = 2 ranks x 4 = 1 process x 8 (x grad accum 2): same loss curve and eval in fp32. 36 pairs
    make windows of 16, 16 and 4 (step 3: rank 1 has nothing and runs a zero-weight forward), then epoch 2."""
    write_jsonl(setup / "train36.jsonl", preference_rows(36, 0))
    common = ["--lr", "3e-3", "--grad-accum", "2", "--max-steps", "4", "--warmup-ratio", "0.25",
              "--train-data", str(setup / "train36.jsonl")]
    one = train_rm.main(flags(setup, kind, "one", *common, "--batch-size", "8"))
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master-port={free_port()}",
           os.path.join(ROOT, "train_rm.py"), *flags(setup, kind, "two", *common, "--batch-size", "4")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "view tensor" not in proc.stderr  # FSDP2's warning about the root module's output (model.RewardModel)
    curves = [[json.loads(line) for line in open(setup / out / "metrics.jsonl")] for out in ("one", "two")]
    assert len(curves[0]) == len(curves[1]) == 4
    for a, b in zip(*curves):
        for key in ("loss", "accuracy", "margin", "grad_norm"):
            assert abs(a[key] - b[key]) < 1e-4, (key, a, b)
    two = json.load(open(setup / "two" / "eval.json"))
    for key in ("accuracy", "loss", "margin"):
        assert abs(one[key] - two[key]) < 1e-4, key
    assert two["pairs"] == one["pairs"] == 100
    # the saved weights are the full model, the same as the single process's
    a, b = (load_model(setup / out, kind="reward" if kind == "bt" else "causal").state_dict() for out in ("one", "two"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
