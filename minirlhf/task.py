"""The built-in toy task, simulated so that `iterate.py` runs end to end on a CPU in minutes: tokenizer, prompts,
demonstrations, human preferences and the hidden true quality.

The user names a few distinct letters; the assistant must say each exactly once and nothing else
("c j f h o p" -> "c f h j o p"; any order scores the same, writers sort).
- Gold reward, hidden: r*(x, y) = (hits - EXTRA_PENALTY * (len(y) - hits)) / len(x), hits = |set(y) & set(x)|, 1
  for a permutation of x: graded, so a label carries information. (A positional task, "reverse the prompt", gave a
  2-layer reward model ~50% held-out accuracy from 1000-5000 pairs; this one 68% from 1000 pairs, 79% from 2000.)
- Demonstrations: the sorted letters, each replaced w.p. DEMO_NOISE, the length off by one w.p. LENGTH_NOISE. SFT
  learns the noise too: its samples reach ~50% of the best reward, the best of 8 ~90%, the gap to close.
- Annotators: Bradley-Terry as Dong et al. 2024 assume, P(a > b | x) = sigmoid((r*(x, a) - r*(x, b)) / TAU), TAU =
  0.1 (one missing letter of five is noticed 88% of the time; ties are coin flips).
"""
import math

import numpy as np
import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

LETTERS = [chr(ord("a") + i) for i in range(16)]
BOS, EOS, PAD, UNK, USER, ASSISTANT = "<|bos|>", "<|eos|>", "<|pad|>", "<|unk|>", "<|user|>", "<|assistant|>"
SPECIAL = [PAD, BOS, EOS, UNK, USER, ASSISTANT]  # ids 0..5, letters follow
MIN_LEN, MAX_LEN = 3, 6  # letters per prompt
MAX_RESPONSE_TOKENS = MAX_LEN + 4  # sampling budget: room for extra letters and eos
BEST_GOLD_REWARD = 1.0
EXTRA_PENALTY = 0.5  # cost of an off-prompt letter or a repeat, in units of one requested letter
DEMO_NOISE = 0.3  # probability that a writer replaces a letter by a random one
LENGTH_NOISE = 0.2  # probability that a demonstration drops its last letter or adds a random one
TAU = 0.1  # annotator temperature, in gold-reward units (a one-letter difference is 0.17 to 0.33)

CHAT_TEMPLATE = (  # one user turn, then the assistant's closed by eos; the generation prompt opens it
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}<|user|> {{ message['content'] }} "
    "{% elif message['role'] == 'assistant' %}<|assistant|> {{ message['content'] }}{{ eos_token }}"
    "{% else %}{{ raise_exception('only user and assistant roles are supported') }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A 22-token tokenizer: the specials, then one token per letter ("cjf" and "c j f" encode alike)."""
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(SPECIAL + LETTERS)}, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Split(Regex("."), "isolated")])
    tok.add_special_tokens(SPECIAL)  # matched in the raw text before pre-tokenization
    return PreTrainedTokenizerFast(  # no decoder: decode joins tokens with spaces, the response format "c f h j o p"
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        extra_special_tokens=[USER, ASSISTANT], chat_template=CHAT_TEMPLATE, model_max_length=64)


def policy_config(tokenizer) -> dict:
    """A 126k-parameter 2-layer Llama config dict (the keys of `LlamaConfig(...).to_dict()`) for `tokenizer`."""
    return dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=len(tokenizer), hidden_size=64,
                intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                hidden_act="silu", max_position_embeddings=64, initializer_range=0.02, rms_norm_eps=1e-5,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, attention_bias=False, mlp_bias=False,
                attention_dropout=0.0, tie_word_embeddings=False, use_cache=True, dtype="float32",
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)


def make_prompts(n: int, seed: int) -> list[str]:
    """n prompts of MIN_LEN..MAX_LEN distinct letters in random order, space separated."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(LETTERS, rng.integers(MIN_LEN, MAX_LEN + 1), replace=False)) for _ in range(n)]


def best_response(prompt: str) -> str:
    """One response with BEST_GOLD_REWARD (every permutation of the prompt is another)."""
    return " ".join(sorted(prompt.split()))


def demonstrations(prompts: list[str], seed: int) -> list[str]:
    """Noisy human-written responses (see the module docstring)."""
    rng = np.random.default_rng(seed)
    responses = []
    for prompt in prompts:
        words = [str(rng.choice(LETTERS)) if rng.random() < DEMO_NOISE else w for w in best_response(prompt).split()]
        if rng.random() < LENGTH_NOISE:
            words = words[:-1] if rng.random() < 0.5 else words + [str(rng.choice(LETTERS))]
        responses.append(" ".join(words))
    return responses


def gold_reward(prompt: str, response: str) -> float:
    """r*(x, y) = (hits - EXTRA_PENALTY * (len(y) - hits)) / len(x), hits = number of prompt letters in y."""
    requested, words = set(prompt.split()), response.split()
    hits = len(requested & set(words))
    return (hits - EXTRA_PENALTY * (len(words) - hits)) / len(requested)


def preference_prob(prompt: str, response_a: str, response_b: str, tau: float = TAU) -> float:
    """Bradley-Terry: P(a preferred to b) = sigmoid((r*(x, a) - r*(x, b)) / tau)."""
    margin = (gold_reward(prompt, response_a) - gold_reward(prompt, response_b)) / tau
    return 0.5 * (1.0 + math.tanh(0.5 * margin))  # = sigmoid(margin), without overflow for large |margin|


def annotate(prompt: str, response_a: str, response_b: str, tau: float, generator) -> bool:
    """One simulated human label, True if a is preferred. `generator`: a torch.Generator or numpy Generator."""
    u = generator.random() if isinstance(generator, np.random.Generator) else torch.rand((), generator=generator).item()
    return bool(u < preference_prob(prompt, response_a, response_b, tau))
