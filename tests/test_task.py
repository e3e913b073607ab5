"""The built-in task: a tokenizer `transformers` reloads, a gold reward with the promised properties, demonstrations
between a fixed answer and the best, and annotators that follow Bradley-Terry at the stated temperature."""
import math

import numpy as np
import pytest
import torch
import transformers

from minirlhf import task
from minirlhf.model import CausalLM, config_from_hf


def test_tokenizer_round_trip(tmp_path):
    tokenizer = task.build_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    reloaded = transformers.AutoTokenizer.from_pretrained(tmp_path)
    prompt, response = "c j f h", "c f h j"
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    for tok in (tokenizer, reloaded):
        prompt_ids = tok.apply_chat_template(messages[:1], add_generation_prompt=True)["input_ids"]
        full_ids = tok.apply_chat_template(messages)["input_ids"]
        assert full_ids[:len(prompt_ids)] == prompt_ids  # the prompt is a prefix of the conversation
        assert prompt_ids == [tok.bos_token_id, tok.convert_tokens_to_ids(task.USER)] + tok.encode(prompt) + [
            tok.convert_tokens_to_ids(task.ASSISTANT)]
        assert full_ids[len(prompt_ids):] == tok.encode(response) + [tok.eos_token_id]
        assert tok.decode(full_ids[len(prompt_ids):], skip_special_tokens=True) == response
        assert tok.encode("cjfh") == tok.encode(prompt) and len(tok.encode(prompt)) == 4  # one token per letter
    assert len(reloaded) == len(tokenizer) == len(task.SPECIAL) + len(task.LETTERS)
    assert (reloaded.pad_token_id, reloaded.bos_token_id, reloaded.eos_token_id) == (0, 1, 2)


def test_policy_config_builds_a_tiny_llama():
    tokenizer = task.build_tokenizer()
    cfg = task.policy_config(tokenizer)
    assert transformers.LlamaConfig(**cfg).rope_parameters["rope_type"] == "default"
    ours = config_from_hf(cfg)
    with torch.device("meta"):  # shapes only, no init
        assert sum(p.numel() for p in CausalLM(ours).parameters()) < 200_000
    assert (ours.vocab_size, ours.pad_token_id) == (len(tokenizer), tokenizer.pad_token_id)
    assert cfg["eos_token_id"] == tokenizer.eos_token_id and cfg["bos_token_id"] == tokenizer.bos_token_id


def test_gold_reward_values():
    # hand-computed: prompt {a,b,c,d}; "a b x b" hits a, b (2) and has 2 extras (x, the repeated b):
    # (2 - 0.5 * 2) / 4 = 0.25
    assert task.gold_reward("a b c d", "a b x b") == pytest.approx(0.25)
    assert task.gold_reward("a b c d", "") == 0.0
    for prompt in task.make_prompts(200, seed=0):
        assert task.gold_reward(prompt, task.best_response(prompt)) == task.BEST_GOLD_REWARD
        assert task.gold_reward(prompt, prompt) == task.BEST_GOLD_REWARD  # any order is as good
        assert task.gold_reward(prompt, prompt + " " + prompt.split()[0]) < task.BEST_GOLD_REWARD


def test_gold_reward_needs_the_prompt():
    prompts = task.make_prompts(500, seed=1)
    # a fixed answer scores far below the best on average, whatever it is
    for constant in ["", "a", "a b c d", " ".join(task.LETTERS), task.best_response(prompts[0])]:
        assert np.mean([task.gold_reward(p, constant) for p in prompts]) < task.BEST_GOLD_REWARD - 0.8
    # the same response is worth different amounts under different prompts
    assert len({task.gold_reward(p, "a b c") for p in prompts}) > 5


def test_demonstrations_are_imperfect_but_useful():
    prompts = task.make_prompts(2000, seed=2)
    demos = task.demonstrations(prompts, seed=3)
    demo_gold = np.mean([task.gold_reward(p, d) for p, d in zip(prompts, demos)])
    best_constant = max(np.mean([task.gold_reward(p, c) for p in prompts]) for c in ["", "a", "a b c"])
    assert best_constant + 0.3 < demo_gold < task.BEST_GOLD_REWARD - 0.3, demo_gold
    assert all(len(d.split()) <= task.MAX_RESPONSE_TOKENS - 1 for d in demos)  # fits the sampling budget


def test_seeds_determine_everything():
    assert task.make_prompts(50, seed=4) == task.make_prompts(50, seed=4) != task.make_prompts(50, seed=5)
    prompts = task.make_prompts(50, seed=4)
    assert task.demonstrations(prompts, seed=6) == task.demonstrations(prompts, seed=6) != task.demonstrations(
        prompts, seed=7)
    labels = lambda g: [task.annotate("a b c d", "a b c", "a b", task.TAU, g) for _ in range(100)]
    assert labels(torch.Generator().manual_seed(0)) == labels(torch.Generator().manual_seed(0))
    assert labels(np.random.default_rng(0)) == labels(np.random.default_rng(0))


@pytest.mark.parametrize("make_generator", [lambda: torch.Generator().manual_seed(0), lambda: np.random.default_rng(0)])
def test_annotators_follow_bradley_terry(make_generator):
    # gold 1.0 vs 0.75: P(a preferred) = sigmoid(0.25 / 0.1) = 0.924; with tau twice as large it would be 0.777.
    # 4000 labels give a standard error of 0.004, so a 0.02 band accepts the right tau and rejects the wrong one.
    prompt, a, b = "a b c d", "d c b a", "a b c"
    expected = 1 / (1 + math.exp(-0.25 / task.TAU))
    assert task.preference_prob(prompt, a, b) == pytest.approx(expected)
    g = make_generator()
    rate = np.mean([task.annotate(prompt, a, b, task.TAU, g) for _ in range(4000)])
    assert abs(rate - expected) < 0.02
    assert abs(rate - 1 / (1 + math.exp(-0.25 / (2 * task.TAU)))) > 0.1
    swapped = np.mean([task.annotate(prompt, b, a, task.TAU, g) for _ in range(4000)])
    assert abs(swapped - (1 - expected)) < 0.02
    tie = np.mean([task.annotate(prompt, "a b", "c d", task.TAU, g) for _ in range(4000)])
    assert abs(tie - 0.5) < 0.03
