"""train_rm.py --kind regression (HelpSteer2's multi-attribute reward model): the masked loss, rating rows, learning
known linear attributes, the transformers layout, use as a reward source, and what a regression model sees that a
Bradley-Terry model cannot (a per-prompt offset; verbosity apart from quality)."""
import json
import random

import pytest
import torch
import transformers

import train_rm
from minirlhf import losses, rewards
from minirlhf.checkpoint import load_model
from minirlhf.data import MISSING, DataError, collate_sequences, load_dataset_any, tokenize_ratings, write_jsonl
from tiny import save_tiny

ATTRIBUTES = train_rm.HELPSTEER2.split(",")
WEIGHTS = [float(w) for w in train_rm.HELPSTEER2_WEIGHTS.split(",")]
WORDS = list("bcdf")  # one token each: short sequences, a fast test
# each word adds a known amount to each attribute: a permutation of 0..4 per attribute, so every attribute spreads
g = torch.Generator().manual_seed(0)
CONTRIBUTION = torch.stack([torch.linspace(0, 4, len(WORDS))[torch.randperm(len(WORDS), generator=g)]
                            for _ in ATTRIBUTES], 1)  # (words, K)


def rating_rows(n_prompts, seed):
    """Two responses per prompt, each 2 words; attribute k = mean of its words' contributions: linear in the
    word counts z (R^4), a_k = W_k . z / 2, in [0, 4]."""
    r, rows = random.Random(seed), []
    for _ in range(n_prompts):
        prompt = f"q{r.randint(0, 999)}"
        for _ in range(2):
            words = [r.randrange(len(WORDS)) for _ in range(2)]
            ratings = CONTRIBUTION[words].mean(0).tolist()
            rows.append(dict(prompt=prompt, response=" ".join(WORDS[i] for i in words),
                             **{a: round(v, 4) for a, v in zip(ATTRIBUTES, ratings)}))
    return rows


@pytest.fixture
def model_dir(tmp_path, tokenizer):
    save_tiny(tmp_path / "model", "llama3", vocab_size=len(tokenizer))
    tokenizer.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def test_mask_masks():
    """Unrated entries: no gradient to their rows of the head, and any value there (NaN included) changes nothing;
    the rest is NeMo-Aligner's sum((pred - label)^2 * mask) / sum(mask), written out."""
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 5, bias=False)
    h = torch.randn(6, 8)
    labels = torch.rand(6, 5) * 4
    mask = torch.ones(6, 5, dtype=torch.bool)
    mask[:, 3] = False  # attribute 3 unrated everywhere
    mask[[0, 4], 1] = False  # attribute 1 unrated in two rows
    pred = head(h)
    loss = losses.window_mean(losses.regression_loss(pred, labels, mask), mask.sum().item())
    loss.backward()
    assert torch.all(head.weight.grad[3] == 0) and torch.all(head.weight.grad[[0, 1, 2, 4]].abs().sum(1) > 0)
    by_hand = sum((pred[i, k] - labels[i, k]) ** 2 for i in range(6) for k in range(5) if mask[i, k]) / 22  # 30 - 6 - 2
    torch.testing.assert_close(loss, by_hand)
    for garbage in (float("nan"), 1e9, MISSING):
        dirty = labels.where(mask, garbage)
        head.zero_grad()
        again = losses.window_mean(losses.regression_loss(head(h), dirty, mask), mask.sum().item())
        again.backward()
        assert again.item() == loss.item() and torch.all(head.weight.grad[3] == 0)


def test_rating_rows(tmp_path, tokenizer):
    """A null or absent rating is unrated (MISSING); a string, a bool or a value outside the range is a bad row
    naming file, row and column; a misspelt attribute column is an error before any row."""
    rows = [dict(prompt="hi", response="yo", a=1, b=None), dict(prompt="hi", response=[
        {"role": "assistant", "content": "ho"}], a=4.0, b=0)]
    write_jsonl(tmp_path / "ok.jsonl", rows)
    examples = tokenize_ratings(load_dataset_any(tmp_path / "ok.jsonl"), tokenizer, "prompt", "response", ["a", "b"],
                                (0, 4), source="ok.jsonl")
    assert [labels for _, labels in examples] == [[1.0, MISSING], [4.0, 0.0]]
    for i, (bad, column) in enumerate([({"a": 5}, "a"), ({"b": "3"}, "b"), ({"a": True}, "a"), ({"b": -0.5}, "b")]):
        path = tmp_path / f"bad{i}.jsonl"
        write_jsonl(path, [rows[0], rows[1] | bad])
        with pytest.raises(DataError, match=rf"bad{i}.jsonl: row 1: field '{column}': expected a number in \[0, 4\]"):
            tokenize_ratings(load_dataset_any(path), tokenizer, "prompt", "response", ["a", "b"], (0, 4),
                             source=str(path))
    with pytest.raises(DataError, match=r"no rating column\(s\) \['c'\]"):
        tokenize_ratings(load_dataset_any(tmp_path / "ok.jsonl"), tokenizer, "prompt", "response", ["a", "c"], (0, 4))


def test_learns_known_linear_attributes(tmp_path, model_dir, tokenizer):
    """Synthetic ratings linear in the words: per-attribute R^2 > 0.9 on held-out rows, and the saved folder, as a
    --reward source, ranks >= 90% of held-out pairs as the true weighted score does; transformers loads it with K
    labels and the same K scores; a per-prompt offset leaves a BT loss unchanged but not the regression loss."""
    write_jsonl(tmp_path / "train.jsonl", rating_rows(128, 0))
    held_out = rating_rows(50, 1)
    write_jsonl(tmp_path / "eval.jsonl", held_out)
    out = tmp_path / "rm"
    result = train_rm.main(["--kind", "regression", "--model", str(model_dir), "--train-data",
                            str(tmp_path / "train.jsonl"), "--eval-data", str(tmp_path / "eval.jsonl"), "--output-dir",
                            str(out), "--max-length", "64", "--lr", "6e-3", "--batch-size", "8", "--epochs", "2",
                            "--warmup-ratio", "0"])
    print(json.dumps(result))
    assert all(result[f"{a}_r2"] > 0.9 for a in ATTRIBUTES), result
    assert result["rows"] == 100 and result["pairs"] > 0

    config = json.load(open(out / "config.json"))
    assert config["num_labels"] == 5 and config["id2label"] == {str(i): a for i, a in enumerate(ATTRIBUTES)}
    assert config["attribute_weights"] == WEIGHTS
    reward_fn = rewards.load_reward_source(out)
    prompts = [row["prompt"] for row in held_out[::2]]
    scores = reward_fn(prompts, [[a["response"], b["response"]] for a, b in zip(held_out[::2], held_out[1::2])])
    truth = [sum(w * row[a] for w, a in zip(WEIGHTS, ATTRIBUTES)) for row in held_out]
    right = [(s[0] > s[1]) == (truth[2 * i] > truth[2 * i + 1]) for i, s in enumerate(scores)
             if abs(truth[2 * i] - truth[2 * i + 1]) > 1e-6]  # not the ties (the same two words)
    print("pair accuracy against the true weighted score", sum(right) / len(right))
    assert sum(right) / len(right) >= 0.9

    hf = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    ours = load_model(out, kind="reward").eval()
    examples = tokenize_ratings(load_dataset_any(tmp_path / "eval.jsonl"), tokenizer, "prompt", "response",
                                ATTRIBUTES, (0, 4))
    batch = collate_sequences([seq for seq, _ in examples[:8]], tokenizer.pad_token_id)
    with torch.no_grad():
        expected = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (8, 5)
        predictions = ours(batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(predictions, expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.tensor(scores[:4]).flatten(), expected @ torch.tensor(WEIGHTS), atol=1e-4, rtol=0)

    # cross-prompt comparability: shift the scores of each prompt (rows 2i, 2i+1) by its own offset f(x)
    offset = torch.randn(4, generator=torch.Generator().manual_seed(1)).repeat_interleave(2)  # (8,)
    reward = predictions @ torch.tensor(WEIGHTS)
    bt = losses.bradley_terry_loss(reward[0::2], reward[1::2])
    torch.testing.assert_close(losses.bradley_terry_loss((reward + offset)[0::2], (reward + offset)[1::2]), bt)
    labels = torch.tensor([y for _, y in examples[:8]])
    mask = labels != MISSING
    base = losses.regression_loss(predictions, labels, mask).sum()
    assert losses.regression_loss(predictions + offset[:, None], labels, mask).sum() > base + 1.0


def length_rows(n, seed, confounded_pairs=False):
    """quality q = number of "g" words (0-4), verbosity = length / 2 (0-4). Rating rows, or (confounded_pairs)
    preference pairs in which the better response is always the longer one too."""
    r, rows = random.Random(seed), []

    def response(q, filler):
        words = ["g"] * q + [r.choice(WORDS) for _ in range(filler)]
        r.shuffle(words)
        return " ".join(words)
    for _ in range(n):
        prompt = f"q{r.randint(0, 999)}"
        if confounded_pairs:
            q = r.randint(0, 3)
            f = r.randint(0, 2)
            rows.append(dict(prompt=prompt, chosen=response(q + 1, f + r.randint(2, 3)), rejected=response(q, f)))
        else:
            q, f = r.randint(0, 4), r.randint(1, 4)
            rows.append(dict(prompt=prompt, response=response(q, f), helpfulness=q, verbosity=(q + f) / 2))
    return rows


def test_verbosity_is_disentangled(tmp_path, model_dir):
    """Pairs of equal quality that differ only in length: the regression model (negative verbosity weight) prefers
    the shorter; a BT model trained on pairs where the better response was also the longer prefers the longer."""
    write_jsonl(tmp_path / "ratings.jsonl", length_rows(256, 0))
    write_jsonl(tmp_path / "pairs.jsonl", length_rows(256, 1, confounded_pairs=True))
    common = ["--model", str(model_dir), "--max-length", "64", "--lr", "6e-3", "--batch-size", "8",
              "--warmup-ratio", "0", "--eval-fraction", "0"]
    train_rm.main(common + ["--kind", "regression", "--epochs", "3", "--batch-size", "16", "--train-data",
                            str(tmp_path / "ratings.jsonl"), "--attributes", "helpfulness,verbosity",
                            "--attribute-weights", "0.65,-0.4", "--output-dir", str(tmp_path / "reg")])
    train_rm.main(common + ["--kind", "bt", "--epochs", "1", "--train-data", str(tmp_path / "pairs.jsonl"), "--output-dir",
                            str(tmp_path / "bt")])
    r = random.Random(2)
    tests = []
    for _ in range(40):  # same "good" count, 2-3 more filler words in the long one
        q, f = r.randint(0, 3), r.randint(0, 2)
        words = ["g"] * q + [r.choice(WORDS) for _ in range(f + 1)]
        longer = words + [r.choice(WORDS) for _ in range(r.randint(2, 3))]
        r.shuffle(longer)
        tests.append((f"q{r.randint(0, 999)}", " ".join(words), " ".join(longer)))
    prefer_short = {}
    assert [rewards.reward_kind(tmp_path / k) for k in ("reg", "bt")] == ["regression", "bt"]
    assert rewards.reward_kind(model_dir) == "pairwise" and rewards.reward_kind("mod:fn") == "function"
    for kind in ("reg", "bt"):
        scores = rewards.load_reward_source(tmp_path / kind)([p for p, _, _ in tests],
                                                             [[s, l] for _, s, l in tests])
        prefer_short[kind] = sum(s[0] > s[1] for s in scores) / len(scores)
    print("share of equal-quality pairs where the shorter wins", prefer_short)
    assert prefer_short["reg"] >= 0.85 and prefer_short["bt"] <= 0.15
