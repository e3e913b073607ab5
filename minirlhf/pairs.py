"""Turn n scored responses of one prompt into one (chosen, rejected) pair: step 4 of online iterative DPO.

Dong et al. 2024 (Sec. 3.2, "best-of-n vs worst-of-n") pick the highest- and lowest-reward responses of the
n samples, which gives the largest reward gap per prompt. The rules follow RLHFlow/Online-RLHF's names:
- `max_min`: best vs worst (the paper's default);
- `max_random`: best vs a uniformly random other response;
- `max_min_p`: best vs worst after the length penalty, `max_min` that insists on `length_penalty > 0`.
Every rule ranks the shaped score  r - length_penalty * tokens - truncation_penalty * [hit the length limit].
A prompt whose chosen and rejected shaped scores differ by `min_gap` or less gives no pair (ties carry no
preference).
"""
import torch


def shaped_scores(rewards, lengths, truncated, length_penalty=0.0, truncation_penalty=0.0):
    """(n,) rewards, response lengths in tokens, truncated flags -> (n,) fp64 scores used for ranking."""
    rewards = torch.as_tensor(rewards, dtype=torch.float64)
    lengths = torch.as_tensor(lengths, dtype=torch.float64)
    truncated = torch.as_tensor(truncated, dtype=torch.float64)
    return rewards - length_penalty * lengths - truncation_penalty * truncated


def make_pair(scores, rule="max_min", min_gap=0.0, generator=None, length_penalty=0.0):
    """Indices (chosen, rejected) into the n responses, or None when no pair clears `min_gap`."""
    scores = torch.as_tensor(scores, dtype=torch.float64)
    if rule == "max_min_p" and length_penalty <= 0:
        raise ValueError("pair rule max_min_p needs --length-penalty > 0")
    if len(scores) < 2:
        return None
    best = int(scores.argmax())
    if rule in ("max_min", "max_min_p"):
        other = int(scores.argmin())
    elif rule == "max_random":
        others = [i for i in range(len(scores)) if i != best]
        other = others[int(torch.randint(len(others), (1,), generator=generator))]
    else:
        raise ValueError(f"unknown pair rule {rule!r}: choose max_min, max_random or max_min_p")
    if scores[best] - scores[other] <= min_gap:
        return None
    return best, other
