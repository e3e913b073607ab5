"""PPO and DR-PO (minirlhf/ppo.py, train_ppo.py): the reset's statistics, teacher forcing in the sampler, the masked
policy loss, GAE and the clipped losses against hand-computed values, train_ppo.py on chat references with a reward
model folder, and iterate.py --algorithm ppo end to end (reset-prob 0 bit for bit, resume after a kill, and the
combination lock that isolates what resets buy)."""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import iterate
import train_ppo
from minirlhf import ppo, task
from minirlhf.checkpoint import load_model, save_model
from minirlhf.data import write_jsonl
from minirlhf.model import init_model
from minirlhf.sampler import generate, sampling_logits
from minirlhf.tokenizer import encode_prompt
from test_train_dpo import ROOT, free_port
from tiny import save_tiny


def test_reset_share_and_prefix_lengths():
    """beta 0.5 over 20k draws: reset share 0.5 +- 0.01, h uniform on {1..L-1} (chi-square), no reset for L < 2."""
    g = torch.Generator().manual_seed(0)
    h = ppo.reset_lengths([9] * 20000, 0.5, g)
    resets = [k for k in h if k > 0]
    assert abs(len(resets) / len(h) - 0.5) < 0.01
    counts = torch.bincount(torch.tensor(resets), minlength=9)
    assert counts[0] == 0 and counts[9:].sum() == 0  # 1 <= h <= L-1: the whole reference is never forced
    expected = len(resets) / 8
    assert ((counts[1:9] - expected) ** 2 / expected).sum().item() < 24.32  # chi-square, 7 dof, p = 0.001
    assert ppo.reset_lengths([0, 1] * 1000, 1.0, g) == [0] * 2000
    assert ppo.reset_lengths([2] * 100, 1.0, g) == [1] * 100


def test_teacher_forcing_gives_the_reference_and_the_policys_logps(tmp_path):
    save_tiny(tmp_path, "llama3")
    model = load_model(tmp_path).eval()
    prompts = [[5, 6, 7], [8, 9]]
    forced = [[[11, 12, 13], []], [[14], [15, 16, 17, 18, 19, 20]]]  # the last one longer than max_new_tokens
    gen = generate(model, prompts, max_new_tokens=5, n=2, temperature=0.7, seed=3, forced=forced)
    for prompt, responses, logps, given in zip(prompts, gen.responses, gen.token_logps, forced):
        for response, lp, ids in zip(responses, logps, given):
            assert response[:len(ids)] == ids[:5] and len(response) == 5
            seq = torch.tensor([prompt + response])
            with torch.no_grad():
                logits = model(seq)[0, len(prompt) - 1:-1]
            policy = sampling_logits(logits, 0.7).log_softmax(-1)[torch.arange(5), response]
            torch.testing.assert_close(torch.tensor(lp), policy, atol=1e-5, rtol=0)
    # no forced token: the same draws as plain sampling (the generator advances alike)
    plain = generate(model, prompts, max_new_tokens=5, n=2, temperature=0.7, seed=3)
    empty = generate(model, prompts, max_new_tokens=5, n=2, temperature=0.7, seed=3, forced=[[[], []], [[], []]])
    assert plain == empty
    assert gen.responses[0][1] == plain.responses[0][1]  # an unforced row of a batch with forced rows


def test_policy_loss_has_zero_gradient_at_forced_tokens_value_and_kl_do_not():
    g = torch.Generator().manual_seed(0)
    B, T, V = 3, 6, 5
    logits = torch.randn(B, T, V, generator=g, requires_grad=True)
    tokens = torch.randint(V, (B, T), generator=g)
    token_logps = logits.log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)
    old = token_logps.detach()  # ratio 1: no token clipped
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, :2] = False  # a prompt position
    forced = torch.zeros(B, T, dtype=torch.bool)
    forced[:, 2:4] = True
    values = torch.randn(B, T, generator=g, requires_grad=True)
    rewards, kl = ppo.token_rewards(old, old - 0.5, torch.ones(B), mask, kl_coef=0.1)
    advantages, returns = ppo.gae(rewards, values.detach() + 1, mask)
    pg, vf = ppo.ppo_losses(token_logps, old, advantages, values, values.detach() + 0.1, returns, mask,
                            mask & ~forced)
    pg.sum().backward()
    assert (logits.grad[forced] == 0).all() and (logits.grad[mask & ~forced].abs().sum(-1) > 0).all()
    vf.sum().backward()
    assert (values.grad[mask & forced] != 0).all()  # the value loss covers forced tokens
    assert torch.allclose(rewards[:, 2:4], torch.tensor(-0.05)) and torch.allclose(kl[mask], torch.tensor(0.5))
    assert (advantages[mask & forced] != 0).all()


def test_gae_and_clipped_losses_by_hand():
    """rewards (0.1, -0.2, 1.0), values (0.5, 0.4, 0.3), gamma 1, lambda 0.95, after a prompt position and before
    padding: delta = (0.1 + 0.4 - 0.5, -0.2 + 0.3 - 0.4, 1.0 - 0.3) = (0, -0.3, 0.7); A_2 = 0.7,
    A_1 = -0.3 + 0.95 * 0.7 = 0.365, A_0 = 0.95 * 0.365 = 0.34675; returns A + V."""
    rewards = torch.tensor([[9.0, 0.1, -0.2, 1.0, 9.0]])
    values = torch.tensor([[9.0, 0.5, 0.4, 0.3, 9.0]])
    mask = torch.tensor([[False, True, True, True, False]])
    advantages, returns = ppo.gae(rewards, values, mask, gamma=1.0, lam=0.95)
    torch.testing.assert_close(advantages, torch.tensor([[0, 0.34675, 0.365, 0.7, 0]]))
    torch.testing.assert_close(returns, torch.tensor([[0, 0.84675, 0.765, 1.0, 0]]))
    # ratios 1.5, 0.5, 1 with advantages 1, -1, 2 and eps 0.2: max(-A r, -A clip(r)) = -1.2, 0.8, -2
    old = torch.zeros(1, 3)
    logps = torch.tensor([[math.log(1.5), math.log(0.5), 0.0]])
    # values 0.5, 0, 1 (old 0.2, 0.1, 1; returns 1, 0.5, 0): clipped values 0.4, 0, 1 -> 0.5 * (0.36, 0.25, 1)
    pg, vf = ppo.ppo_losses(logps, old, torch.tensor([[1.0, -1.0, 2.0]]), torch.tensor([[0.5, 0.0, 1.0]]),
                            torch.tensor([[0.2, 0.1, 1.0]]), torch.tensor([[1.0, 0.5, 0.0]]),
                            torch.ones(1, 3, dtype=torch.bool), torch.ones(1, 3, dtype=torch.bool))
    torch.testing.assert_close(pg, torch.tensor([[-1.2, 0.8, -2.0]]))
    torch.testing.assert_close(vf, torch.tensor([[0.18, 0.125, 0.5]]))
    # per-token reward: -0.1 * (logp - ref) everywhere, + score 2 at the last response token
    r, _ = ppo.token_rewards(torch.tensor([[0.0, -1.0, -2.0]]), torch.tensor([[5.0, -1.5, -1.0]]), torch.tensor([2.0]),
                             torch.tensor([[False, True, True]]), 0.1)
    torch.testing.assert_close(r, torch.tensor([[0.0, -0.05, 2.1]]))
    w = ppo.whiten(torch.tensor([1.0, 2.0, 3.0, 7.0]), torch.tensor([True, True, True, False]))
    torch.testing.assert_close(w, torch.tensor([-1.5 ** 0.5, 0.0, 1.5 ** 0.5, 0.0]))
    assert ppo.next_kl_coef(0.1, 12.0, 6.0, 10000, 1000) == pytest.approx(0.1 * (1 + 0.2 * 0.1))
    assert ppo.next_kl_coef(0.1, 12.0, None, 10000, 1000) == 0.1


# ---- iterate.py --algorithm ppo end to end --------------------------------------------------------------------
SECRET = "c a d b b a c d"
# the policy's output layer has exactly the 4 letters (ids 0-3); the tokenizer's eos, pad and unk come after them,
# so no response can stop early or hold a special token: every response is 8 letters, uniform at start
LOCK_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }} {% else %}{{ m['content'] }}"
                 "{{ eos_token }}{% endif %}{% endfor %}")
LOCK_REWARD = f"def reward(prompts, responses):\n    return [float(r.split() == {SECRET.split()!r}) for r in responses]\n"


def lock_tokenizer():
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate([*"abcd", "<eos>", "<pad>", "<unk>"])},
                                     unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Split(Regex("."), "isolated")])
    tok.add_special_tokens(["<eos>", "<pad>", "<unk>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
                                   chat_template=LOCK_TEMPLATE)


@pytest.fixture(scope="module")
def lock(tmp_path_factory):
    d = tmp_path_factory.mktemp("lock")
    tokenizer = lock_tokenizer()
    config = task.policy_config(tokenizer) | dict(vocab_size=4, hidden_size=32, intermediate_size=64,
                                                  num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                                  initializer_range=0.2)
    model = init_model(config, seed=0)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # uniform over the 4 letters: P(secret) = 4^-8
    save_model(model, d / "sft", tokenizer)
    (d / "lock_reward.py").write_text(LOCK_REWARD)
    write_jsonl(d / "prompts.jsonl", [dict(prompt="a", completion=SECRET)] * 4096)
    write_jsonl(d / "short.jsonl", [dict(prompt="a", completion=SECRET)] * 128)
    return d


def run_lock(d, name, reset_prob, *extra, prompts="prompts.jsonl"):
    iterate.main(["--output-dir", str(d / name), "--sft-model", str(d / "sft"), "--reward", "lock_reward:reward",
                  "--prompts", str(d / prompts), "--algorithm", "ppo", "--reset-prob", str(reset_prob),
                  "--max-new-tokens", "8", "--max-length", "32", "--seed", "0", "--batch-size", "32",
                  "--grad-accum", "1", *extra])


def success_rate(policy_dir, temperature, n=400):
    """From the prompt, no reset: the share of n samples that open the lock."""
    tokenizer = lock_tokenizer()
    gen = generate(load_model(policy_dir).eval(), [encode_prompt(tokenizer, "a")], 8, n=n, seed=1234,
                   temperature=temperature)
    return sum(tokenizer.decode(r, skip_special_tokens=True).split() == SECRET.split() for r in gen.responses[0]) / n


LOCK_BUDGET = ["--iterations", "32", "--prompts-per-iteration", "128", "--lr", "1e-2"]  # 4096 episodes


@pytest.mark.slow
@pytest.mark.parametrize("reset_prob, opens", [(0.75, True), (0.0, False)])
def test_combination_lock_opens_with_resets_only(lock, monkeypatch, reset_prob, opens):
    """8 tokens over 4 letters, reward 1 for one secret string, a uniform policy (P(secret) = 4^-8 = 1.5e-5), the
    secret as every prompt's reference: with the same 4096 episodes DR-PO opens the lock and PPO never sees it open.
    Evaluated from the prompt without resets at DR-PO's evaluation temperature 0.1 (Table 5). Beta 0.75, not 1:
    h >= 1, so with beta 1 the first token is always forced and gets no policy gradient of its own. Measured: beta 1
    opens this lock anyway (400 of 400; P(first letter) = 0.91), but only because the secret holds the transition
    "a" -> "c" and the prompt ends in "a", so the gradient at that later position teaches the first letter through
    the shared weights; with the secret "c b d b a d c d" (no such transition) beta 1 opens it 0 times in 400."""
    monkeypatch.syspath_prepend(str(lock))
    monkeypatch.chdir(lock)
    assert success_rate(lock / "sft", 1.0) == 0.0
    run_lock(lock, f"lock{reset_prob}", reset_prob, *LOCK_BUDGET)
    policy = lock / f"lock{reset_prob}/iter32/policy"
    rate, rate_t1 = success_rate(policy, 0.1), success_rate(policy, 1.0)
    print(f"reset-prob {reset_prob}: success from the prompt {rate:.3f} at temperature 0.1, {rate_t1:.3f} at 1")
    assert rate > 0.9 if opens else rate < 0.01


def weights(folder):
    return load_file(f"{folder}/model.safetensors")


def test_reset_prob_zero_is_plain_ppo_bit_for_bit_and_resume_continues_exactly(lock, monkeypatch):
    """--reset-prob 0 (no reference read) and 1e-12 (references read, resets drawn, none happens) give the same
    weights bit for bit; a run killed in its second epoch and resumed ends where the uninterrupted one ends."""
    monkeypatch.syspath_prepend(str(lock))
    monkeypatch.chdir(lock)
    short = ["--iterations", "2", "--prompts-per-iteration", "64", "--lr", "1e-2"]
    run_lock(lock, "plain", 0.0, *short, prompts="short.jsonl")
    run_lock(lock, "tiny", 1e-12, *short, prompts="short.jsonl")
    for name in ("policy", "policy/value_model"):
        a, b = weights(lock / f"plain/iter2/{name}"), weights(lock / f"tiny/iter2/{name}")
        assert all(torch.equal(a[k], b[k]) for k in a)
    metrics = json.loads((lock / "plain/iter2/metrics.json").read_text())
    assert metrics["resets"] == 0 and metrics["episodes"] == 64
    monkeypatch.setenv("MINIRLHF_FAIL_AFTER_STEP", "3")  # 2 steps per epoch: killed in epoch 2, after 1 saved
    with pytest.raises(RuntimeError, match="simulated kill"):
        run_lock(lock, "killed", 0.0, *short, prompts="short.jsonl")
    monkeypatch.delenv("MINIRLHF_FAIL_AFTER_STEP")
    assert (lock / "killed/iter1/policy/checkpoint").is_dir() and not (lock / "killed/iter1/done.json").exists()
    run_lock(lock, "killed", 0.0, *short, "--resume", prompts="short.jsonl")
    for name in ("policy", "policy/value_model"):
        a, b = weights(lock / f"plain/iter2/{name}"), weights(lock / f"killed/iter2/{name}")
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (lock / "killed/iter1/policy/checkpoint").exists()
    assert not (lock / "killed/iter1/policy/staging").exists()
    # killed in iteration 2 (its lr schedule, value model and KL coefficient carried from iteration 1): the same
    # weights, and its metrics.jsonl holds each of its 8 steps once
    shutil.copytree(lock / "plain", lock / "late")
    shutil.rmtree(lock / "late/iter2")
    (lock / "late/args.json").unlink()  # it names the other folder
    monkeypatch.setenv("MINIRLHF_FAIL_AFTER_STEP", "5")
    with pytest.raises(RuntimeError, match="simulated kill"):
        run_lock(lock, "late", 0.0, *short, prompts="short.jsonl")
    monkeypatch.delenv("MINIRLHF_FAIL_AFTER_STEP")
    run_lock(lock, "late", 0.0, *short, "--resume", prompts="short.jsonl")
    for name in ("policy", "policy/value_model"):
        a, b = weights(lock / f"plain/iter2/{name}"), weights(lock / f"late/iter2/{name}")
        assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (lock / "late/iter2/policy/metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))
    # --kl-target: iteration 2 starts from the coefficient iteration 1's controller chose
    run_lock(lock, "adaptive", 0.0, *short, "--kl-target", "0.01", "--kl-horizon", "100", prompts="short.jsonl")
    first, second = (json.loads((lock / f"adaptive/iter{t}/metrics.json").read_text()) for t in (1, 2))
    assert first["kl_coef"] == 0.05 and second["kl_coef"] == first["next_kl_coef"] != 0.05


# ---- train_ppo.py on a user's chat data, one process and two FSDP ranks ------------------------------------------
def ppo_setup(d, tokenizer):
    """A tiny Llama 3 policy with the test tokenizer, a BT reward model folder grown from it, and 10 chat rows whose
    last assistant message is the reference."""
    save_tiny(d / "sft", "llama3")
    tokenizer.save_pretrained(d / "sft")
    save_tiny(d / "rm", "llama3", kind="reward", seed=1)
    tokenizer.save_pretrained(d / "rm")
    words = ["alpha", "beta", "gamma", "delta", "eps"]
    write_jsonl(d / "chat.jsonl", [dict(messages=[dict(role="user", content=f"say {words[i % 5]}"),
                                                  dict(role="assistant", content=" ".join(words[:2 + i % 4]))])
                                   for i in range(10)])


def ppo_flags(d, out, *extra):
    return list(map(str, ["--model", d / "sft", "--reward", d / "rm", "--prompts", d / "chat.jsonl", "--prompt-column",
                          "messages", "--reference-column", "messages", "--reset-prob", 0.5, "--temperature", 0,
                          "--max-new-tokens", 6, "--ppo-epochs", 2, "--grad-accum", 1, "--lr", "1e-3",
                          "--output-dir", out, *extra]))


def test_train_ppo_on_chat_references_with_a_reward_model(tmp_path, tokenizer):
    """Resets force a prefix of the last assistant message of each conversation; the value model starts from the BT
    reward model (its score head, not a fresh one); the output is a policy folder with its value model beside; a
    response cut at --max-new-tokens scores its reward minus --truncation-penalty."""
    ppo_setup(tmp_path, tokenizer)
    summary = train_ppo.main(ppo_flags(tmp_path, tmp_path / "out", "--batch-size", 4, "--lr", "1e-12",
                                       "--truncation-penalty", "0.5"))
    assert summary["episodes"] == 10 and 0 < summary["resets"] < 1
    rows = [json.loads(line) for line in (tmp_path / "out/samples.jsonl").read_text().splitlines()]
    cut = [t for r in rows for t in r["truncated"]]
    assert 0 < sum(cut) and summary["mean_score"] == pytest.approx(
        sum(x - 0.5 * c for r in rows for x, c in zip(r["rewards"], r["truncated"])) / 10)
    chat = [json.loads(line) for line in (tmp_path / "chat.jsonl").read_text().splitlines()]
    for r, c in zip(rows, chat):
        reference = tokenizer(c["messages"][1]["content"], add_special_tokens=False)["input_ids"]
        k = r["forced_tokens"][0]
        assert r["response_ids"][0][:k] == (reference + [tokenizer.eos_token_id])[:k]
    assert sum(r["forced_tokens"][0] > 0 for r in rows) == round(summary["resets"] * 10)
    value = load_model(tmp_path / "out/value_model", "reward")
    rm = load_model(tmp_path / "rm", "reward")
    torch.testing.assert_close(value.score.weight, rm.score.weight, atol=1e-6, rtol=0)
    assert (tmp_path / "out/done.json").exists() and not (tmp_path / "out/checkpoint").exists()


@pytest.mark.slow
def test_two_fsdp_ranks_killed_and_resumed_equal_one_process(tmp_path, tokenizer):
    """Greedy rollouts (the same on any world size), resets at 0.5: one process with micro-batch 4 and two gloo
    ranks with 2 each (FSDP2; 10 episodes make every third window short, where rank 1 runs a zero-weight forward),
    the latter killed in epoch 2 and resumed from the epoch-1 checkpoint, end with the same policy and value model."""
    ppo_setup(tmp_path, tokenizer)
    one = train_ppo.main(ppo_flags(tmp_path, tmp_path / "one", "--batch-size", 4))
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    cmd = lambda: [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",  # noqa: E731
                   "--master-addr=127.0.0.1", f"--master-port={free_port()}", os.path.join(ROOT, "train_ppo.py"),
                   *ppo_flags(tmp_path, tmp_path / "two", "--batch-size", 2)]
    killed = subprocess.run(cmd(), env={**env, "MINIRLHF_FAIL_AFTER_STEP": "4"}, capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode != 0 and "simulated kill" in killed.stderr, killed.stderr[-3000:]
    proc = subprocess.run(cmd() + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "resuming after epoch 1" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    two = json.loads((tmp_path / "two/eval.json").read_text())
    for key in ("mean_score", "mean_kl", "resets", "pg_loss", "vf_loss"):
        assert two[key] == pytest.approx(one[key], rel=1e-4, abs=1e-6), key
    for name in ("", "value_model"):
        a, b = weights(tmp_path / "one" / name), weights(tmp_path / "two" / name)
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4, name


def test_a_pairwise_judge_needs_two_samples_per_prompt(tmp_path, tokenizer):
    """A pairwise preference model scores a response by its win rate against the prompt's other responses: with
    one sample per prompt there is nothing to compare (every score would be 0), so that is refused before any work;
    with two, each prompt's two scores are win rates that sum to 1."""
    ppo_setup(tmp_path, tokenizer)
    judge = ["--reward", tmp_path / "sft", "--ppo-epochs", 1, "--batch-size", 10]  # a causal LM folder: a judge
    with pytest.raises(train_ppo.rundir.UserError, match="pairwise preference model.*--samples-per-prompt >= 2"):
        train_ppo.main(ppo_flags(tmp_path, tmp_path / "one", *map(str, judge)))
    assert not (tmp_path / "one").exists()
    train_ppo.main(ppo_flags(tmp_path, tmp_path / "two", *map(str, judge), "--samples-per-prompt", "2",
                             "--temperature", "1"))
    rows = [json.loads(line) for line in (tmp_path / "two/samples.jsonl").read_text().splitlines()]
    assert all(len(r["rewards"]) == 2 and r["rewards"][0] + r["rewards"][1] == pytest.approx(1) for r in rows)
