"""The preference oracle queried during the loop: online labels that follow the policy.

Dong et al. 2024 (Algorithm 1) and Xiong et al. 2024 (online iterative GSHF, Sec. 3) query the oracle P(a > b | x)
on the current policy's samples (the RLHF Workflow paper's proxy reward model stands in, as labels are expensive).
`iterate.py --labels-per-iteration K` shows it one pair for K prompts per iteration, refitting the reward model.
An oracle is f(prompts, responses_a, responses_b) -> [P(a preferred to b)] (0/1 for a hard judge), a label one
seeded Bernoulli draw (like a noisy human): "builtin" (the task's annotators) or "module:function" (an LLM judge,
a labelling tool). The pair shown (`--label-pair`): `max_min`, the reward model's best vs worst (DPO's pair);
`max_random`, its best vs a random other; `random`, two of the samples (the built-in default: it measured best,
since the reward model's picks aim the labels at its own errors and DPO prefers on-policy pairs; README).
"""
import math
import os

import torch

from minirlhf import dist, task
from minirlhf.data import load_dataset_any, write_jsonl
from minirlhf.pairs import pair_record
from minirlhf.rewards import import_function
from minirlhf.rundir import UserError

LABEL_PAIRS = ("max_min", "max_random", "random")


def load_oracle(spec):
    """'builtin' (the task's annotators) or 'module:function' -> f(prompts, responses_a, responses_b)."""
    if spec == "builtin":
        return lambda prompts, a, b: [task.preference_prob(p, x, y) for p, x, y in zip(prompts, a, b)]
    return import_function(spec, "oracle", "expected 'builtin' or 'module:function'")


def label_pairs(oracle, prompts, responses_a, responses_b, generator, name="oracle") -> list[bool]:
    """Ask the oracle once for all triples -> True where a is preferred; a bad return names `name` and the row."""
    probs = list(oracle(list(prompts), list(responses_a), list(responses_b)))
    if len(probs) != len(prompts):
        raise UserError(f"oracle {name} returned {len(probs)} values for {len(prompts)} pairs")
    labels = []
    for i, p in enumerate(probs):
        try:
            p = float(p)
        except (TypeError, ValueError):
            raise UserError(f"oracle {name}: row {i}: expected a probability, got {p!r}") from None
        if not (math.isfinite(p) and 0.0 <= p <= 1.0):
            raise UserError(f"oracle {name}: row {i}: P(a preferred) must be in [0, 1], got {p}")
        labels.append(bool(torch.rand((), generator=generator, dtype=torch.float64).item() < p))
    return labels


def pick_label_pair(scores, responses, rule, generator):
    """Indices (a, b) of the two responses to show (`scores`: the reward model's), None if they are the same text."""
    if rule == "random":  # two of the i.i.d. samples, so the pair is distributed as the policy's own
        pair = torch.randperm(len(responses), generator=generator)[:2].tolist()
        return None if len(pair) < 2 or responses[pair[0]] == responses[pair[1]] else tuple(pair)
    distinct = {r: i for i, r in enumerate(responses)}
    if len(distinct) < 2:
        return None
    scores = torch.as_tensor(scores, dtype=torch.float64)
    best = int(scores.argmax())
    others = [i for i in distinct.values() if responses[i] != responses[best]]
    if rule == "max_random":
        return best, others[int(torch.randint(len(others), (), generator=generator))]
    return best, min(others, key=lambda i: scores[i])


def ask_oracle(oracle, rows, k, rule, path, seed, name="oracle"):
    """One pair for each of the first K rows with two distinct responses, labelled on rank 0 into `path` -> (path,
    its rows, reward model-oracle agreement). The file is the record: a rerun asks nothing twice, a user may fill it."""
    if not os.path.exists(path) and dist.is_main():
        generator, shown = torch.Generator().manual_seed(seed), []
        for r in rows:
            if (pair := pick_label_pair(r["rewards"], r["responses"], rule, generator)) is not None:
                shown.append((r, *pair))
            if len(shown) == k:
                break
        a_wins = label_pairs(oracle, [r["prompt"] for r, _, _ in shown], [r["responses"][a] for r, a, _ in shown],
                             [r["responses"][b] for r, _, b in shown], generator, name)
        write_jsonl(path, [dict(pair_record(r, a, b) if w else pair_record(r, b, a), index=r["index"],
                                reward_model_agreed=(r["rewards"][a] > r["rewards"][b]) == w)
                           for (r, a, b), w in zip(shown, a_wins)])
    dist.barrier()
    labels = list(load_dataset_any(path))
    agreed = [r["reward_model_agreed"] for r in labels if r.get("reward_model_agreed") is not None]
    return path, labels, sum(agreed) / len(agreed) if agreed else None
