"""Turn n scored responses of one prompt into one (chosen, rejected) pair: step 4 of online iterative DPO.

Dong et al. 2024 (Sec. 3.2) pick the best and worst of n samples, the largest reward gap. Rules (RLHFlow's names):
`max_min` (the paper's), `max_random` (best vs a random other), `max_min_p` (max_min needing length_penalty > 0),
ranking r - length_penalty * tokens - truncation_penalty * [cut off]; a gap <= `min_gap` (a tie) gives no pair.
"""
import torch


def shaped_scores(rewards, lengths, truncated, length_penalty=0.0, truncation_penalty=0.0):
    """(n,) rewards, response lengths in tokens, truncated flags -> (n,) fp64 scores used for ranking."""
    rewards, lengths, truncated = (torch.as_tensor(x, dtype=torch.float64) for x in (rewards, lengths, truncated))
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
    return None if scores[best] - scores[other] <= min_gap else (best, other)


# A pairs file row: the text, and beside it what the policy produced (data.py trains on the ids when present)
PAIR_COLUMNS = ("prompt", "chosen", "rejected", "prompt_ids", "chosen_ids", "rejected_ids", "chosen_truncated",
                "rejected_truncated")


def pair_record(row, a, b) -> dict:
    """The preference row of responses a (chosen) and b (rejected) of a sample row, with the sampled ids and
    truncated flags when present: DPO trains on exactly the tokens produced, a cut-off response stays cut off."""
    ids, cut = row.get("response_ids"), row.get("truncated")
    return dict(prompt=row["prompt"], chosen=row["responses"][a], rejected=row["responses"][b],
                prompt_ids=row.get("prompt_ids"), chosen_ids=ids and ids[a], rejected_ids=ids and ids[b],
                chosen_truncated=cut and cut[a], rejected_truncated=cut and cut[b])


def choose_pairs(rows, rule, min_gap, length_penalty, truncation_penalty, generator):
    """Step 4 for each sample row: row["proxy_pair"] = [chosen, rejected] indices (or None), and their text."""
    for r in rows:
        scores = shaped_scores(r["rewards"], r["n_tokens"], r["truncated"], length_penalty, truncation_penalty)
        pair = make_pair(scores, rule, min_gap, generator, length_penalty)
        r.update(proxy_pair=pair and list(pair), chosen=pair and r["responses"][pair[0]],
                 rejected=pair and r["responses"][pair[1]])
    return rows


def training_pairs(rows, labels=()) -> list[dict]:
    """The iteration's pairs file (every PAIR_COLUMNS column, None where unknown): each row's proxy pair, except
    where a label (`index` naming its sample row) orders the pair instead; a label naming no row is its own pair."""
    by_index, labelled, extra = {r["index"]: r for r in rows}, {}, []
    for label in labels:
        record = {c: label.get(c) for c in PAIR_COLUMNS}
        if (r := by_index.get(label.get("index"))) is not None and r["prompt"] == label["prompt"]:
            labelled[r["index"]] = record
            r.update(chosen=label["chosen"], rejected=label["rejected"])
        else:
            extra.append(record)
    return [labelled.get(r["index"]) or pair_record(r, *r["proxy_pair"]) for r in rows
            if r["index"] in labelled or r["proxy_pair"]] + extra
