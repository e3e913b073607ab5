"""Reward sources: the pairwise ranking (all pairs and tournament) on hand-made probabilities, both orders with a
position-biased judge, truncation of the judge prompt, and load_reward_source for a user function, a BT reward
model folder and a pairwise model folder."""
import math
import re
import sys

import pytest
import torch

import iterate
from minirlhf import rewards
from minirlhf.checkpoint import load_model, save_model
from minirlhf.rewards import load_reward_source
from minirlhf.tokenizer import encode_pair
from tiny import save_tiny


def bt_compare(quality, calls=None):
    """A judge that follows Bradley-Terry on hand-made qualities: P(a > b) = sigmoid(q(a) - q(b))."""
    def compare(comparisons):
        if calls is not None:
            calls.extend(comparisons)
        return [1 / (1 + math.exp(quality[b] - quality[a])) for _, a, b in comparisons]
    return compare


def test_all_pairs_win_rates_rank_correctly():
    responses = [["r0", "r1", "r2", "r3", "r4"], ["s0", "s1"], ["t0"]]
    quality = {"r0": 0.3, "r1": 2.0, "r2": -1.0, "r3": 0.9, "r4": 0.0, "s0": -1.0, "s1": 1.0, "t0": 0.0}
    calls = []
    scores = rewards.rank_responses(bt_compare(quality, calls), ["p", "q", "r"], responses)
    assert len(calls) == 10 + 1  # each unordered pair once (both orders are inside one comparison)
    for rs, sc in zip(responses[:2], scores):
        assert sorted(rs, key=quality.get) == [r for _, r in sorted(zip(sc, rs))]
        assert abs(sum(sc) - len(rs) / 2) < 1e-9  # win rates: P(i > j) + P(j > i) = 1
    assert scores[2] == [0.0]  # a lone response has nothing to beat


@pytest.mark.parametrize("n", [9, 13, 32])
def test_tournament_finds_best_and_worst(n):
    g = torch.Generator().manual_seed(n)
    quality = {f"r{i}": q for i, q in enumerate(torch.randn(n, generator=g).tolist())}
    responses = [list(quality), list(quality)[::-1]]
    calls = []
    scores = rewards.rank_responses(bt_compare(quality, calls), ["p", "q"], responses, all_pairs_max=8, seed=1)
    assert len(calls) <= 2 * 2 * (n - 1)  # two brackets per prompt, each fewer than n matches
    for rs, sc in zip(responses, scores):
        best, worst = max(rs, key=quality.get), min(rs, key=quality.get)
        assert rs[sc.index(max(sc))] == best and sc.count(max(sc)) == 1
        assert rs[sc.index(min(sc))] == worst and sc.count(min(sc)) == 1


class BiasedJudge(torch.nn.Module):
    """Stands in for a causal LM: reads responses A and B back from the judge prompt and gives the label logits
    l_A = 3 + q(A) - q(B), l_B = 0 with q = the number of 'x' in a response: a strong bias towards "A" that
    only averaging the two orders removes. Records the (A, B) texts it saw."""

    def __init__(self, tokenizer, label_ids):
        super().__init__()
        self.tokenizer, self.label_ids, self.seen = tokenizer, label_ids, []

    def forward(self, input_ids, attention_mask=None, labels=None):
        out = torch.zeros(input_ids.shape)
        for row, (ids, lab) in enumerate(zip(input_ids, labels)):
            text = self.tokenizer.decode(ids[attention_mask[row].bool()], skip_special_tokens=True)
            a, b = re.search(r"response a (.*) response b (.*) \n", text, re.S).groups()
            self.seen.append((a, b))
            logits = torch.tensor([3.0 + a.count("x") - b.count("x"), 0.0]).log_softmax(0)
            t = int((lab != -100).nonzero())
            out[row, t] = logits[self.label_ids.index(int(lab[t]))]
        return out


def test_preference_probs_use_both_orders(tokenizer):
    label_ids = rewards.label_token_ids(tokenizer)
    judge = BiasedJudge(tokenizer, label_ids)
    comparisons = [("hi", "xx", "x"), ("hi", "x", "xx"), ("hello there", "xxx", "xxx")]
    probs = rewards.preference_probs(judge, tokenizer, comparisons, label_ids, batch_size=2)
    assert probs[0] > 0.5 > probs[1] and abs(probs[0] + probs[1] - 1) < 1e-6 and abs(probs[2] - 0.5) < 1e-6
    # exact: P = 1/2 [sigmoid(3 + d) + 1 - sigmoid(3 - d)] with d = q(a) - q(b) = 1
    assert abs(probs[0] - 0.5 * (torch.tensor(4.0).sigmoid() + 1 - torch.tensor(2.0).sigmoid()).item()) < 1e-6
    judge.seen.clear()  # one comparison: both orders, each with both label tokens
    rewards.preference_probs(judge, tokenizer, [("hi", "xx", "x")], label_ids)
    assert sorted(judge.seen) == [("x", "xx")] * 2 + [("xx", "x")] * 2


def test_judge_prompt_is_cut_to_max_length(tokenizer):
    long_a, long_b = "a" * 60, "b" * 30
    full = rewards.pairwise_prompt_ids(tokenizer, "hi", long_a, long_b)
    ids = rewards.pairwise_prompt_ids(tokenizer, "hi", long_a, long_b, max_length=len(full) - 20)
    assert len(ids) < len(full) - 20  # room left for the label token
    text = tokenizer.decode(ids)
    assert "a" * 30 in text and "b" * 30 in text and "a" * 60 not in text  # the longer one is cut first
    full = rewards.pairwise_prompt_ids(tokenizer, "hi", "x", long_a)  # a short response keeps all of itself
    text = tokenizer.decode(rewards.pairwise_prompt_ids(tokenizer, "hi", "x", long_a, max_length=len(full) - 20))
    assert " x " in text and max(map(len, re.findall("a+", text))) == 60 - 21
    with pytest.raises(ValueError, match="no room"):
        rewards.pairwise_prompt_ids(tokenizer, "hi " * 50, long_a, long_b, max_length=40)


def test_user_function(tmp_path, monkeypatch):
    (tmp_path / "my_reward.py").write_text(
        "def score(prompts, responses):\n"
        "    text = [p if isinstance(p, str) else '|'.join(m['content'] for m in p) for p in prompts]\n"
        "    return [len(t) * 100 + len(r) for t, r in zip(text, responses)]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = rewards.load_reward_source("my_reward:score")
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hey"},
            {"role": "assistant", "content": "yo"}, {"role": "user", "content": "ab"}]
    # the whole conversation reaches the function: "be brief|hey|yo|ab" is 18 characters
    assert fn(["abc", chat], [["x", "yy"], ["zzz"]]) == [[301.0, 302.0], [1803.0]]
    with pytest.raises(ValueError, match="not a checkpoint folder"):
        rewards.load_reward_source(str(tmp_path / "missing"))


def test_bt_folder_scores_like_the_reward_model(tmp_path, tokenizer):
    save_tiny(tmp_path / "lm", "qwen3", vocab_size=len(tokenizer))
    reward_model = load_model(tmp_path / "lm", kind="reward", seed=1).eval()
    save_model(reward_model, tmp_path / "rm", tokenizer)
    fn = rewards.load_reward_source(tmp_path / "rm", batch_size=2)
    prompts, responses = ["hi there", [{"role": "user", "content": "why?"}]], [["yes", "no, never", "ok"], ["because"]]
    scores = fn(prompts, responses)
    for p, rs, sc in zip(prompts, responses, scores):
        for r, s in zip(rs, sc):
            with torch.no_grad():
                expected = reward_model(torch.tensor([sum(encode_pair(tokenizer, p, r, whole=True), [])])).item()
            assert abs(s - expected) < 1e-5
    assert len({s for sc in scores for s in sc}) == 4


def test_pairwise_folder(tmp_path, tokenizer):
    save_tiny(tmp_path / "pm", "llama3", vocab_size=len(tokenizer))
    tokenizer.save_pretrained(tmp_path / "pm")
    fn = rewards.load_reward_source(tmp_path / "pm", batch_size=3)
    scores = fn(["hi", "why"], [["yes", "no", "maybe", "ok"], ["because", "dunno"]])
    assert [len(s) for s in scores] == [4, 2]
    for sc in scores:  # win rates of a consistent (order-averaged) judge
        assert abs(sum(sc) - len(sc) / 2) < 1e-5 and all(0 < s < 1 for s in sc)


def test_score_sequences_matches_one_by_one(tmp_path):
    """Batched, right-padded scoring of ragged sequences equals scoring each sequence alone."""
    from tiny import ragged_batch, save_tiny
    save_tiny(tmp_path, "qwen2", kind="reward")
    reward_model = load_model(tmp_path, kind="reward").eval()
    ids, mask = ragged_batch([7, 3, 9, 1, 5], "right")
    sequences = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
    scores = rewards.score_sequences(reward_model, sequences, batch_size=2)
    with torch.no_grad():
        ref = [reward_model(torch.tensor([s]))[0].item() for s in sequences]
    assert scores == pytest.approx(ref, abs=1e-5)


def test_module_function_is_imported_from_the_working_directory(tmp_path, monkeypatch):
    """`python /elsewhere/iterate.py --reward mod:fn` from the folder holding mod.py: sys.path then has the
    script's folder, not the working directory, yet the documented lookup finds the module; --help says it runs."""
    (tmp_path / "reward_in_cwd.py").write_text("def f(prompts, responses):\n    return [1.0 for _ in responses]\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    assert load_reward_source("reward_in_cwd:f")(["p"], [["a", "b"]]) == [[1.0, 1.0]]
    assert "imports and runs that Python code" in " ".join(iterate.build_parser().format_help().split())


@pytest.mark.parametrize("style,family", [("chatml", "qwen2"), ("llama3", "llama3")])
def test_reward_model_reads_what_apply_chat_template_renders(tmp_path, style, family, monkeypatch):
    """A BT reward model scores the conversation as `apply_chat_template` renders it (ChatML's "\\n" after
    <|im_end|> included), so a hub pipeline (AutoModelForSequenceClassification on those ids, as TRL's
    RewardTrainer and reward-model cards do) reads the same score, and train_rm.py trains on those same ids.
    The tokenizer is the one built here: transformers 5 reloads it from a folder whose config.json names a model
    type as that type's class (Qwen2Tokenizer), which drops the test vocabulary's "\\n"."""
    import transformers
    from conftest import build_chat_tokenizer
    from minirlhf.data import tokenize_preferences
    tok = build_chat_tokenizer(tmp_path, style)
    save_tiny(tmp_path, family, kind="reward", vocab_size=len(tok), pad_token_id=tok.pad_token_id,
              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    monkeypatch.setattr(rewards, "load_tokenizer", lambda path: tok)
    prompts = ["hi there", [{"role": "system", "content": "be brief"}, {"role": "user", "content": "why?"}]]
    responses = [["yes", "no, never"], ["because"]]
    scores = load_reward_source(str(tmp_path))(prompts, responses)
    for p, rs, sc in zip(prompts, responses, scores):
        for r, s in zip(rs, sc):
            messages = ([{"role": "user", "content": p}] if isinstance(p, str) else p) + [
                {"role": "assistant", "content": r}]
            ids = tok.apply_chat_template(messages, tokenize=True, return_dict=False)
            with torch.no_grad():
                assert abs(hf(torch.tensor([ids])).logits[0, 0].item() - s) < 1e-4, (style, p, r)
            pair = tokenize_preferences([dict(prompt=p, chosen=r, rejected=r + "!")], tok, whole=True)[0][0]
            assert pair.prompt_ids + pair.chosen_ids == ids
            cut = sum(encode_pair(tok, p, r), [])  # what the policy generates: up to the stop token
            assert cut == (ids[:-1] if style == "chatml" else ids) and cut[-1] == tok.eos_token_id
