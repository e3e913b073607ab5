"""Pair construction on hand-made rewards: each rule, ties skipped, length and truncation penalties applied."""
import pytest
import torch

from minirlhf.pairs import make_pair, shaped_scores


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
