"""Reward sources for online iterative RLHF (step 3 of Dong et al. 2024): score the n responses of each prompt.

`load_reward_source(spec)` turns any of three sources into one function
    fn(prompts: list[str | messages], responses: list[list[str]]) -> list[list[float]]
- a Bradley-Terry reward model folder (eq. 2; `train_rm.py --kind bt`): the `RewardModel` scalar at the last
  token of the templated conversation, batched by `score_sequences`; a regression model folder (HelpSteer2) the
  same way, its K attribute ratings merged by the attribute_weights of its config.json;
- a pairwise preference model folder (sec. 3.1, RLHFlow's pair-preference-model; `--kind pairwise`): a causal LM
  reads PAIRWISE_TEMPLATE (prompt, responses A and B) and answers "A" or "B"; P(a > b) renormalises the two label
  tokens and averages the two orders (`losses.preference_probability`), cancelling the judge's position bias;
- "module:function": a user function over the flat, aligned lists, each prompt as given (string or conversation).

`rank_responses` turns a pairwise model's comparisons into scores: for n <= ALL_PAIRS_MAX (8, the paper's n) the
win rate over all n(n-1)/2 pairs (Borda count); above, a knockout tournament for the best and a losers' bracket
for the worst, 2(n-1) comparisons (n = 64: 126, not 2016), exact at both ends for a consistent judge (all the
max-min rule of `pairs.py` needs) and coarse in the middle: keep length penalties small with a tournament.
Label-token log-probs come from the model's `labels=` path (the fused op, also under FSDP), never full logits.
"""
import importlib
import json
import math
import os
import sys

import torch

from minirlhf import dist
from minirlhf.checkpoint import load_model, read_config, score_outputs
from minirlhf.data import Sequence, collate_sequences
from minirlhf.logprobs import IGNORE_INDEX
from minirlhf.losses import preference_probability
from minirlhf.rundir import UserError
from minirlhf.tokenizer import as_messages, encode_pair, encode_prompt, load_tokenizer, pad_token_id

# The judge's user turn, RLHFlow's layout; the answer (the assistant's first token) is a label token.
PAIRWISE_TEMPLATE = "[CONTEXT] {context} [RESPONSE A] {response_a} [RESPONSE B] {response_b} \n"
LABEL_TOKENS = ("A", "B")
ALL_PAIRS_MAX = 8
PAIRWISE_CONFIG = "pairwise.json"  # written next to a pairwise model by train_rm.py: template and label tokens


@torch.no_grad()
def score_sequences(reward_model, sequences, batch_size=8, device="cpu", attribute_weights=None) -> list[float]:
    """Rewards of token sequences (each prompt + response ids), right-padded in batches: a Bradley-Terry model's
    scalar, or a regression model's K attribute ratings merged as r = w . a (HelpSteer2 sec. 3; NeMo-Aligner's
    merge_attributes) with w = `attribute_weights` (K,)."""
    pad_id = reward_model.config.pad_token_id or 0  # padded positions are masked; any id works
    out = []
    for s in range(0, len(sequences), batch_size):
        batch = collate_sequences([Sequence(ids, []) for ids in sequences[s:s + batch_size]], pad_id)
        scores = reward_model(batch["input_ids"].to(device), batch["attention_mask"].to(device))  # (B,) or (B, K)
        out += (scores if scores.ndim == 1 else scores @ attribute_weights.to(scores)).tolist()
    return out


def _text(x) -> str:
    """A response (str, or a list of messages from a conversational dataset) as plain text."""
    return x if isinstance(x, str) else "\n".join(m["content"] for m in x)


def pairwise_context(prompt) -> str:
    """The conversation so far as text: a string prompt (or one user message) as is, else 'role: content' lines."""
    messages = as_messages(prompt)
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def pairwise_prompt_ids(tokenizer, prompt, response_a, response_b, max_length=None, template=PAIRWISE_TEMPLATE):
    """Token ids of the judge's prompt (one chat-templated user turn plus the generation prompt); the label token
    is predicted at its last position. If prompt + label exceed max_length, the responses are cut from the right,
    the longer one first (both to the same length when both are long), so the judge still sees the start of each."""
    context = pairwise_context(prompt)

    def render(a, b):
        return encode_prompt(tokenizer, template.format(context=context, response_a=a, response_b=b))

    texts = [_text(response_a), _text(response_b)]
    ids = render(*texts)
    if max_length is None or len(ids) < max_length:
        return ids
    tokens = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    for _ in range(4):  # BPE merges at the cut can change the count slightly: re-check a few times
        budget = sum(map(len, tokens)) - (len(ids) - max_length + 1)  # response tokens that fit
        if budget < 2:
            raise ValueError(f"pairwise judge prompt: the context alone is {len(ids) - sum(map(len, tokens))} tokens, "
                             f"no room for two responses in max_length {max_length}")
        short = min(map(len, tokens))
        cap = budget - short if short <= budget // 2 else budget // 2  # water-filling: the short one keeps all
        tokens = [t[:cap] for t in tokens]
        ids = render(*(tokenizer.decode(t) for t in tokens))
        if len(ids) < max_length:
            return ids
    raise ValueError(f"pairwise judge prompt: could not fit the responses into max_length {max_length}")


def label_token_ids(tokenizer, label_tokens=LABEL_TOKENS) -> list[int]:
    """The ids of the label tokens ("A", "B"); each must be exactly one token and they must differ."""
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in label_tokens]
    if any(len(i) != 1 for i in ids) or ids[0] == ids[1]:
        raise UserError(f"label tokens {list(label_tokens)} must be two different single tokens for this tokenizer, "
                        f"got ids {ids}; pick others with --label-tokens")
    return [i[0] for i in ids]


def label_logps(model, input_ids, attention_mask, label_ids):
    """log p(label | judge prompt), (N,) fp32, at each row's last real token. input_ids, attention_mask (N, T)
    RIGHT-padded judge prompts; label_ids (N,). One row per (order, label token): four rows per comparison, twice
    the minimum, but one code path through the `labels=` fused op (no (N, T, V) logits, works under FSDP)."""
    last = attention_mask.sum(-1) - 1  # right padding: the last real token predicts the label
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[torch.arange(len(input_ids), device=input_ids.device), last] = label_ids
    return model(input_ids, attention_mask=attention_mask, labels=labels).sum(-1)


def compare_batch(model, ab_ids, ba_ids, label_ids, pad_id, device):
    """B comparisons in both orders -> (label_logps_ab, label_logps_ba), each (B, 2): log-probs of the label
    tokens (A, B) with a shown first (ab_ids) and with b shown first (ba_ids). One forward of 4B rows."""
    B = len(ab_ids)
    batch = collate_sequences([Sequence(ids, []) for ids in (ab_ids + ba_ids) * 2], pad_id)
    labels = torch.tensor(label_ids, device=device).repeat_interleave(2 * B)  # rows [0:2B] label A, [2B:4B] label B
    logps = label_logps(model, batch["input_ids"].to(device), batch["attention_mask"].to(device), labels)
    logps = logps.view(2, 2, B)  # (label token, order, comparison)
    return logps[:, 0].T, logps[:, 1].T


@torch.no_grad()
def preference_probs(model, tokenizer, comparisons, label_ids, batch_size=8, device="cpu", max_length=None,
                     template=PAIRWISE_TEMPLATE) -> list[float]:
    """P(a > b) for each (prompt, a, b), both orders averaged; batch_size = comparisons per forward (4 rows each)."""
    pad_id, out = pad_token_id(tokenizer), []
    for s in range(0, len(comparisons), batch_size):
        chunk = comparisons[s:s + batch_size]
        ab = [pairwise_prompt_ids(tokenizer, p, a, b, max_length, template) for p, a, b in chunk]
        ba = [pairwise_prompt_ids(tokenizer, p, b, a, max_length, template) for p, a, b in chunk]
        out += preference_probability(*compare_batch(model, ab, ba, label_ids, pad_id, device)).tolist()
    return out


def _knockout(compare, prompts, responses, entrants, generator, keep_winner=True):
    """Single elimination for every prompt at once (one `compare` call per round, over all prompts' matches).
    Random pairings each round, an odd one out gets a bye. keep_winner=False: the loser advances (finds the worst).
    entrants {prompt index: [response indices]} -> (rounds survived {k: {i: rounds}}, {k: [lost first match]})."""
    alive = {k: list(v) for k, v in entrants.items()}
    survived = {k: dict.fromkeys(v, 0) for k, v in entrants.items()}
    played, lost_first = set(), {k: [] for k in entrants}
    while any(len(a) > 1 for a in alive.values()):
        matches = []
        for k, a in alive.items():
            a = [a[i] for i in torch.randperm(len(a), generator=generator).tolist()]
            matches += [(k, a[i], a[i + 1]) for i in range(0, len(a) - 1, 2)]
            alive[k] = a[len(a) - len(a) % 2:]  # the bye, if any
        probs = compare([(prompts[k], responses[k][i], responses[k][j]) for k, i, j in matches])
        for (k, i, j), p in zip(matches, probs):
            winner, loser = (i, j) if p >= 0.5 else (j, i)
            if (k, loser) not in played:
                lost_first[k].append(loser)
            played |= {(k, i), (k, j)}
            alive[k].append(winner if keep_winner else loser)
        for k, a in alive.items():
            for i in a:
                survived[k][i] += 1
    return survived, lost_first


def rank_responses(compare, prompts, responses, all_pairs_max=ALL_PAIRS_MAX, seed=0) -> list[list[float]]:
    """Scores for the n responses of each prompt from a pairwise judge, higher = better (see the module docstring).
    compare(list of (prompt, a, b)) -> list of P(a > b). All pairs (win rates in [0, 1]) for n <= all_pairs_max,
    else a tournament: rounds survived in the winners' bracket (>= 0), or -1 - rounds survived in the losers'
    bracket for the responses that lost their first match (so the worst has the unique minimum)."""
    scores = [[0.0] * len(rs) for rs in responses]
    matches = [(k, i, j) for k, rs in enumerate(responses) if len(rs) <= all_pairs_max
               for i in range(len(rs)) for j in range(i + 1, len(rs))]
    probs = compare([(prompts[k], responses[k][i], responses[k][j]) for k, i, j in matches]) if matches else []
    for (k, i, j), p in zip(matches, probs):
        n = len(responses[k])
        scores[k][i] += p / (n - 1)
        scores[k][j] += (1 - p) / (n - 1)
    big = {k: list(range(len(rs))) for k, rs in enumerate(responses) if len(rs) > all_pairs_max}
    if big:
        generator = torch.Generator().manual_seed(seed)
        won, lost_first = _knockout(compare, prompts, responses, big, generator, keep_winner=True)
        lost, _ = _knockout(compare, prompts, responses, lost_first, generator, keep_winner=False)
        for k in big:
            scores[k] = [float(-1 - lost[k][i] if i in lost[k] else won[k][i]) for i in big[k]]
    return scores


def _unflatten(flat, responses) -> list[list[float]]:
    """Cut a flat list into one list per prompt, shaped like `responses`."""
    it = iter(flat)
    return [[next(it) for _ in rs] for rs in responses]


def score_rows(rows, reward_spec, first_row, device, name):
    """rows[i]["rewards"]: the reward source's score of each of the row's responses (the sampler's rows). A NaN or
    infinite one (it would make a tie or a meaningless pair, and is not JSON) stops the run naming the prompt's row
    (first_row + index) and the source."""
    dist.print0(f"{name} scoring {sum(len(r['responses']) for r in rows)} responses with {reward_spec}")
    reward_fn = load_reward_source(reward_spec, device=device)
    rewards = reward_fn([r["prompt"] for r in rows], [r["responses"] for r in rows])
    for r, row_rewards in zip(rows, rewards):
        if not all(math.isfinite(x) for x in row_rewards):
            raise UserError(f"reward source {reward_spec}: non-finite reward {row_rewards} for prompt "
                            f"{first_row + r['index']}: fix the reward source")
        r["rewards"] = list(map(float, row_rewards))


def import_function(spec, what, expected="expected 'module:function'"):
    """The function named by "module:function", imported from sys.path or the working directory (`python
    /elsewhere/iterate.py` puts the script's folder on sys.path, not this one). This runs the user's code."""
    module, sep, name = str(spec).partition(":")
    if not sep or not module or not name:
        raise UserError(f"{what} {spec!r}: {expected}")
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    return getattr(importlib.import_module(module), name)


def reward_kind(spec) -> str:
    """"bt" or "regression" (a reward model folder, one output or K), "pairwise" (any other model folder: a judge) or
    "function" (module:function), as `load_reward_source` reads them."""
    if not os.path.isdir(str(spec)):
        return "function"
    outputs = score_outputs(read_config(spec))
    return "pairwise" if outputs == 0 else "bt" if outputs == 1 else "regression"


def load_reward_source(spec, device="cpu", batch_size=8, max_length=None, all_pairs_max=ALL_PAIRS_MAX, seed=0):
    """spec: a BT or regression reward model folder (architectures end in ForSequenceClassification), a pairwise
    preference model folder (any other checkpoint; its pairwise.json gives template, label tokens and max_length;
    defaults: RLHFlow's template, "A"/"B", no limit), or "module:function" -> fn(prompts, responses:
    list[list[str]]) -> list[list[float]]. A user function gets flat aligned lists (each prompt repeated for each
    of its responses, as given: a string or the whole conversation) and returns one float per response."""
    spec = str(spec)
    if not os.path.isdir(spec):
        user_fn = import_function(spec, "reward source", "not a checkpoint folder and not 'module:function'")

        def score_with_function(prompts, responses):
            flat_prompts = [p for p, rs in zip(prompts, responses) for _ in rs]  # as given: the whole conversation
            flat = [float(x) for x in user_fn(flat_prompts, [r for rs in responses for r in rs])]
            if len(flat) != len(flat_prompts):
                raise UserError(f"reward function {spec} returned {len(flat)} values for {len(flat_prompts)} responses")
            return _unflatten(flat, responses)
        return score_with_function

    tokenizer, config = load_tokenizer(spec), read_config(spec)
    if score_outputs(config):
        reward_model = load_model(spec, kind="reward", device=device).eval()
        K, weights = reward_model.score.out_features, config.get("attribute_weights")  # train_rm.py --kind regression
        if K > 1 and not (isinstance(weights, list) and len(weights) == K and
                          all(type(w) in (int, float) for w in weights)):
            raise UserError(f"{spec}/config.json: a reward model with {K} outputs needs \"attribute_weights\", one "
                            f"number per output, to merge them into one reward; got {weights!r}")
        weights = torch.tensor(weights, dtype=torch.float32) if K > 1 else None

        def score_with_reward_model(prompts, responses):
            sequences = [sum(encode_pair(tokenizer, p, r, whole=True), []) for p, rs in zip(prompts, responses)
                         for r in rs]  # the conversation as its template renders it (tokenizer.encode_pair)
            return _unflatten(score_sequences(reward_model, sequences, batch_size, device, weights), responses)
        return score_with_reward_model

    judge = load_model(spec, kind="causal", device=device).eval()
    config = {"template": PAIRWISE_TEMPLATE, "label_tokens": list(LABEL_TOKENS), "max_length": None}
    if os.path.isfile(os.path.join(spec, PAIRWISE_CONFIG)):  # as trained by train_rm.py
        with open(os.path.join(spec, PAIRWISE_CONFIG)) as f:
            config |= json.load(f)
    label_ids = label_token_ids(tokenizer, config["label_tokens"])

    def compare(comparisons):
        return preference_probs(judge, tokenizer, comparisons, label_ids, batch_size, device,
                                max_length or config["max_length"], config["template"])

    return lambda prompts, responses: rank_responses(compare, prompts, responses, all_pairs_max, seed)
