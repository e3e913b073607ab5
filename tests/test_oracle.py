"""The preference oracle: labels are Bernoulli draws of what it returns, bad returns name the function and row,
the pair shown is the reward model's best vs worst (or a random two), and the built-in oracle is the task's
annotators."""
import math

import pytest
import torch

from minirlhf import oracle, task


def test_labels_follow_the_returned_probabilities():
    g = torch.Generator().manual_seed(0)
    n = 20000
    labels = oracle.label_pairs(lambda p, a, b: [0.0, 1.0, 0.3] * (len(p) // 3), ["x"] * (3 * n), ["a"] * (3 * n),
                                ["b"] * (3 * n), g)
    assert not any(labels[0::3]) and all(labels[1::3])  # hard labels are obeyed exactly
    rate = sum(labels[2::3]) / n
    assert abs(rate - 0.3) < 4 * math.sqrt(0.3 * 0.7 / n), rate


def test_builtin_oracle_is_the_task_annotators():
    fn = oracle.load_oracle("builtin")
    prompt = "c j f h o p"
    a, b = "c f h j o p", "c f h"
    assert fn([prompt, prompt], [a, b], [b, a]) == [task.preference_prob(prompt, a, b),
                                                    task.preference_prob(prompt, b, a)]
    assert fn([prompt], [a], [b])[0] > 0.99  # three missing letters out of six: the annotators almost never err


@pytest.mark.parametrize("case, returned, match", [
    (0, "[0.5]", "returned 1 values for 2 pairs"),
    (1, "[0.5, float('nan')]", ": row 1: P\\(a preferred\\) must be in \\[0, 1\\], got nan"),
    (2, "[1.5, 0.5]", ": row 0: P\\(a preferred\\) must be in \\[0, 1\\], got 1.5"),
    (3, "[0.5, -0.1]", ": row 1: .* got -0.1"),
    (4, "[0.5, 'yes']", ": row 1: expected a probability, got 'yes'"),
])
def test_a_bad_return_names_the_function_and_the_row(tmp_path, monkeypatch, case, returned, match):
    (tmp_path / f"judge_mod{case}.py").write_text(f"def judge(prompts, a, b):\n    return {returned}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = oracle.load_oracle(f"judge_mod{case}:judge")
    with pytest.raises(ValueError, match=f"oracle judge_mod{case}:judge ?" + match):
        oracle.label_pairs(fn, ["x", "y"], ["a", "b"], ["c", "d"], torch.Generator(), f"judge_mod{case}:judge")


def test_module_function_is_importable_from_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "cwd_judge.py").write_text("def judge(prompts, a, b):\n    return [1.0] * len(prompts)\n")
    monkeypatch.chdir(tmp_path)
    assert oracle.load_oracle("cwd_judge:judge")(["x"], ["a"], ["b"]) == [1.0]
    with pytest.raises(ValueError, match="expected 'builtin' or 'module:function'"):
        oracle.load_oracle("no_colon")


def test_pick_label_pair_shows_best_vs_worst_distinct_texts():
    g = torch.Generator().manual_seed(0)
    # the worst score belongs to a copy of the best text: the next worst distinct text is shown instead
    assert oracle.pick_label_pair([0.9, 0.1, -1.0, 0.5], ["a b", "c", "a b", "d"], "max_min", g) == (0, 1)
    assert oracle.pick_label_pair([0.3, 0.3], ["same", "same"], "max_min", g) is None
    assert oracle.pick_label_pair([0.3, 0.1], ["", "a"], "max_min", g) == (0, 1)  # an empty answer is an answer
    for rule in ("random", "max_min", "max_random"):  # one sample: nothing to compare, for every rule alike
        assert oracle.pick_label_pair([0.3], ["a"], rule, g) is None
    seen, none = set(), 0
    texts = ["a", "b", "c", "a"]
    for _ in range(600):  # random: two of the samples uniformly, so a repeated text is shown as often as sampled
        pair = oracle.pick_label_pair([0, 0, 0, 0], texts, "random", g)
        if pair is None:
            none += 1  # only the pair (0, 3): the same text twice
            continue
        assert texts[pair[0]] != texts[pair[1]]
        seen.add(frozenset(pair))
    assert len(seen) == 5 and abs(none / 600 - 1 / 6) < 0.06
    for _ in range(50):  # max_random: the best, and any other distinct text
        best, other = oracle.pick_label_pair([0.9, 0.1, -1.0, 0.5], ["a b", "c", "a b", "d"], "max_random", g)
        assert best == 0 and other in (1, 3)


def test_ask_oracle_writes_the_sampled_ids_of_the_pair_it_labels(tmp_path):
    """Label rows carry the ids and truncation flags of the two responses, in the oracle's order, so DPO trains
    on a labelled pair's sampled tokens too; the reward model's agreement is recorded."""
    rows = [dict(index=7, prompt="x", prompt_ids=[1, 5], responses=["a", "b"], response_ids=[[20, 2], [21, 22]],
                 truncated=[False, True], rewards=[0.0, 1.0])]
    path, labels, agreed = oracle.ask_oracle(lambda p, a, b: [float(x == "a") for x in a], rows, 1, "max_min",
                                             str(tmp_path / "labels.jsonl"), seed=0)
    assert labels == [dict(prompt="x", chosen="a", rejected="b", prompt_ids=[1, 5], chosen_ids=[20, 2],
                           rejected_ids=[21, 22], chosen_truncated=False, rejected_truncated=True, index=7,
                           reward_model_agreed=False)] and agreed == 0.0
