"""Pair construction on hand-made rewards: each rule, ties skipped, length and truncation penalties applied; the
pairs file keeps the sampled ids and truncation flags, and labels order their own pair."""
import pytest
import torch

from minirlhf.pairs import PAIR_COLUMNS, choose_pairs, make_pair, pair_record, shaped_scores, training_pairs


def test_max_min_picks_best_and_worst():
    assert make_pair([0.1, 0.9, -0.5, 0.3]) == (1, 2)


def test_ties_and_small_gaps_give_no_pair():
    assert make_pair([0.5, 0.5, 0.5]) is None
    assert make_pair([0.50, 0.52, 0.51], min_gap=0.05) is None
    assert make_pair([0.50, 0.60, 0.51], min_gap=0.05) == (1, 0)
    assert make_pair([1.0]) is None


def test_max_random_never_picks_the_best_as_rejected_and_covers_the_others():
    g = torch.Generator().manual_seed(0)
    seen = {make_pair([0.0, 3.0, 1.0, 2.0], rule="max_random", generator=g) for _ in range(200)}
    assert seen == {(1, 0), (1, 2), (1, 3)}


def test_length_penalty_changes_the_pair():
    """Rewards [1.0, 0.9, 0.0], lengths [20, 2, 1], lambda 0.01 -> shaped [0.8, 0.88, -0.01]: best is now 1."""
    scores = shaped_scores([1.0, 0.9, 0.0], [20, 2, 1], [False, False, False], length_penalty=0.01)
    torch.testing.assert_close(scores, torch.tensor([0.8, 0.88, -0.01], dtype=torch.float64))
    assert make_pair(scores, rule="max_min_p", length_penalty=0.01) == (1, 2)
    assert make_pair([1.0, 0.9, 0.0]) == (0, 2)


def test_truncation_penalty():
    """The truncated response (reward 1.0, penalty 2) falls below the one that stopped (0.2)."""
    scores = shaped_scores([1.0, 0.2, 0.5], [8, 3, 4], [True, False, False], truncation_penalty=2.0)
    assert make_pair(scores) == (2, 0)


def test_bad_rule_names():
    with pytest.raises(ValueError, match="unknown pair rule"):
        make_pair([0.0, 1.0], rule="best_worst")
    with pytest.raises(ValueError, match="max_min_p needs"):
        make_pair([0.0, 1.0], rule="max_min_p")


def sample_row(index, rewards, prompt="p"):
    """A sample row as iterate.py's sample() makes it: response i is the text "r<i>" with ids [10 + i, 2 (stop)],
    except that the last response hit the length limit (no stop id)."""
    n = len(rewards)
    ids = [[10 + i, 2] for i in range(n - 1)] + [[10 + n - 1, 11, 12]]
    return dict(index=index, prompt=prompt, prompt_ids=[1, index], responses=[f"r{i}" for i in range(n)],
                response_ids=ids, n_tokens=[len(x) for x in ids], truncated=[False] * (n - 1) + [True],
                rewards=rewards)


def test_training_pairs_carry_the_sampled_ids_and_labels_order_their_pair():
    rows = choose_pairs([sample_row(0, [0.1, 0.9, -0.5]), sample_row(1, [0.3, 0.3, 0.3]),
                         sample_row(2, [0.0, 0.5, 1.0])], "max_min", 0.0, 0.0, 0.0, torch.Generator())
    assert [r["proxy_pair"] for r in rows] == [[1, 2], None, [2, 0]] and rows[0]["chosen"] == "r1"
    pairs = training_pairs(rows)
    assert pairs == [dict(prompt="p", chosen="r1", rejected="r2", prompt_ids=[1, 0], chosen_ids=[11, 2],
                          rejected_ids=[12, 11, 12], chosen_truncated=False, rejected_truncated=True),
                     pair_record(rows[2], 2, 0)]
    # the oracle labelled prompt 1 (tied under the proxy) and reversed prompt 2; a hand-written label adds a pair
    labels = [dict(pair_record(rows[1], 0, 1), index=1), dict(pair_record(rows[2], 0, 2), index=2),
              dict(prompt="q", chosen="a", rejected="b")]
    pairs = training_pairs(rows, labels)
    assert [p["chosen_ids"] for p in pairs] == [[11, 2], [10, 2], [10, 2], None]
    assert pairs[2]["rejected_truncated"] and pairs[3] == dict({c: None for c in PAIR_COLUMNS}, prompt="q",
                                                               chosen="a", rejected="b")
    assert (rows[2]["chosen"], rows[2]["rejected"]) == ("r0", "r2")  # samples.jsonl shows the pair DPO trains on
    assert rows[2]["proxy_pair"] == [2, 0]  # and the proxy's own pick
