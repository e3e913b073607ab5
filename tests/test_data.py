"""Data: every row format and file type gives the same tokens; bad rows named; truncation; collation; shuffling."""
import json

import datasets
import pandas as pd
import pytest
import torch

from minirlhf.data import (DataError, Pair, Sequence, collate_pairs, collate_sequences, load_dataset_any,
                           epoch_windows, load_preferences, load_sft, micro_batches, tokenize_preferences,
                           write_jsonl)
from minirlhf.tokenizer import encode_pair, encode_prompt

CONTENT = [("what is two plus two?", "four.", "five."), ("name a colour", "blue", "the sky"),
           ("say hi", "hi!", "no.")]


def user(text):
    return [{"role": "user", "content": text}]


def assistant(text):
    return [{"role": "assistant", "content": text}]


FORMATS = {  # the same content in each layout users have
    "standard": lambda p, c, r: dict(prompt=p, chosen=c, rejected=r),
    "conversational": lambda p, c, r: dict(prompt=user(p), chosen=assistant(c), rejected=assistant(r)),
    "implicit": lambda p, c, r: dict(chosen=user(p) + assistant(c), rejected=user(p) + assistant(r)),
    "ultrafeedback": lambda p, c, r: dict(prompt=p, chosen=user(p) + assistant(c), rejected=user(p) + assistant(r)),
}


def write(rows, path):
    """Write rows as .json / .jsonl / .parquet / a save_to_disk folder, chosen by the path's suffix."""
    if path.suffix == ".json":
        json.dump(rows, open(path, "w"))
    elif path.suffix == ".jsonl":
        write_jsonl(path, rows)
    elif path.suffix == ".parquet":
        pd.DataFrame(rows).to_parquet(path)
    else:
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("name", ["rows.json", "rows.jsonl", "rows.parquet", "rows_dir"])
def test_every_format_and_file_type_gives_the_same_tokens(tmp_path, tokenizer, name):
    expected = [Pair(*encode_pair(tokenizer, p, c), encode_pair(tokenizer, p, r)[1]) for p, c, r in CONTENT]
    assert expected[0].prompt_ids == encode_prompt(tokenizer, user(CONTENT[0][0]))
    for fmt, make in FORMATS.items():
        path = write([make(*row) for row in CONTENT], tmp_path / f"{fmt}_{name}")
        pairs, skipped = load_preferences(path, tokenizer)
        assert pairs == expected and skipped == {}, (fmt, name)
        batch = collate_pairs(pairs, pad_id=0)
        assert torch.equal(batch["input_ids"], collate_pairs(expected, pad_id=0)["input_ids"])


def test_implicit_prompt_is_everything_before_the_last_assistant_message(tokenizer):
    history = [{"role": "system", "content": "be kind."}] + user("hi") + assistant("hello") + user("and now?")
    row = dict(chosen=history + assistant("now this."), rejected=history + assistant("no"))
    (pair,), _ = tokenize_preferences([row], tokenizer)
    assert pair.prompt_ids == encode_prompt(tokenizer, history)
    assert pair.chosen_ids == encode_pair(tokenizer, history, "now this.")[1]


def test_column_mapping(tokenizer):
    rows = [dict(question=p, good=c, bad=r) for p, c, r in CONTENT]
    pairs, _ = tokenize_preferences(rows, tokenizer, prompt_column="question", chosen_column="good",
                                    rejected_column="bad")
    assert pairs == tokenize_preferences([FORMATS["standard"](*row) for row in CONTENT], tokenizer)[0]


def test_sft_formats_agree(tmp_path, tokenizer):
    p, c, _ = CONTENT[0]
    expected = Sequence(*encode_pair(tokenizer, p, c))
    earlier = user("first") + assistant("earlier answer")
    rows = {"completion": dict(prompt=p, completion=c), "messages": dict(messages=user(p) + assistant(c)),
            "preference": FORMATS["implicit"](*CONTENT[0])}
    for kind, row in rows.items():
        seqs, _ = load_sft(write([row, row], tmp_path / f"{kind}.jsonl"), tokenizer)
        assert seqs == [expected, expected], kind
    # multi-turn: train on the last assistant turn, the earlier turns (and a trailing user turn) are not trained on
    (seq,), _ = load_sft(write([dict(messages=earlier + user(p) + assistant(c) + user("thanks"))],
                               tmp_path / "multi.jsonl"), tokenizer)
    assert seq == Sequence(*encode_pair(tokenizer, earlier + user(p), c))


GOOD = [FORMATS["standard"](*row) for row in CONTENT[:2]]
BAD = {  # reason -> (bad row, field named in the error)
    "missing": (dict(prompt="a", rejected="b"), "chosen"),
    "empty": (dict(prompt="  ", chosen="a", rejected="b"), "prompt"),
    "wrong_type": (dict(prompt="a", chosen="b", rejected=3), "rejected"),
    "prompt_too_long": (dict(prompt="a" * 40, chosen="b", rejected="c"), "prompt"),
    "identical": (dict(prompt="a", chosen="same", rejected="same"), "rejected"),
    "prompt_mismatch": (dict(chosen=user("a") + assistant("b"), rejected=user("x") + assistant("c")), "rejected"),
}


@pytest.mark.parametrize("reason", list(BAD))
def test_bad_row_error_names_file_row_and_field(tmp_path, tokenizer, reason, capsys):
    row, field = BAD[reason]
    path = write(GOOD + [row], tmp_path / "prefs.jsonl")
    with pytest.raises(DataError, match=f"{path}: row 2: field '{field}'"):
        load_preferences(path, tokenizer, max_prompt_length=30, max_length=60)
    pairs, skipped = load_preferences(path, tokenizer, max_prompt_length=30, max_length=60, skip_bad=True)
    assert len(pairs) == 2 and skipped == {reason: 1}
    assert f"skipped 1 bad rows of 3: {{'{reason}': 1}}" in capsys.readouterr().out


def test_empty_responses_are_preferences_and_are_counted(tmp_path, tokenizer, capsys):
    """The stop token alone is an answer: "" (or an empty assistant message) is a valid chosen or rejected response,
    its ids are just EOS, and the data summary counts them; a missing field or a non-string stays a bad row."""
    rows = [dict(prompt="a", chosen="", rejected="b"), dict(prompt="c", chosen="d", rejected=""),
            dict(prompt=user("e"), chosen=assistant(""), rejected=assistant("f"))]
    pairs, skipped = load_preferences(write(rows, tmp_path / "empty.jsonl"), tokenizer)
    assert skipped == {} and len(pairs) == 3
    eos = tokenizer.eos_token_id
    assert pairs[0].chosen_ids == [eos] and pairs[1].rejected_ids == [eos] and pairs[2].chosen_ids == [eos]
    assert pairs[0].rejected_ids == encode_pair(tokenizer, "a", "b")[1]
    assert "3 empty responses" in capsys.readouterr().out
    for bad, field in [(dict(prompt="a", rejected=""), "chosen"), (dict(prompt="a", chosen=None, rejected=""), "chosen"),
                       (dict(prompt="a", chosen="", rejected=0), "rejected")]:
        with pytest.raises(DataError, match=f"row 0: field '{field}'"):
            tokenize_preferences([bad], tokenizer)
    with pytest.raises(DataError, match="field 'rejected': identical"):  # "" vs "" carries no preference
        tokenize_preferences([dict(prompt="a", chosen="", rejected="")], tokenizer)



def test_rows_with_sampled_ids_train_on_those_ids(tmp_path, tokenizer):
    """A row with prompt_ids / chosen_ids / rejected_ids (iterate.py's pairs) trains on them, even where text
    re-encodes differently ("t", "h" sampled apart; BPE merges them into "th") or a cut-off answer has no stop
    token; a text row is tokenised as before, and a text row marked truncated loses its stop token."""
    eos, t, h = tokenizer.eos_token_id, *tokenizer.convert_tokens_to_ids(["t", "h"])
    prompt_ids = encode_prompt(tokenizer, "say the")
    chosen_ids, rejected_ids = [t, h, eos], [h, t]  # "th" stopped; "ht" cut off by the length limit
    assert encode_pair(tokenizer, "say the", "th")[1] != chosen_ids  # the re-encoding merges them
    rows = [dict(prompt="say the", chosen="th", rejected="ht", prompt_ids=prompt_ids, chosen_ids=chosen_ids,
                 rejected_ids=rejected_ids, chosen_truncated=False, rejected_truncated=True),
            dict(prompt="say the", chosen="the", rejected="th", prompt_ids=None, chosen_ids=None, rejected_ids=None,
                 chosen_truncated=None, rejected_truncated=True)]  # a text row (a label written by hand)
    pairs, skipped = load_preferences(write(rows, tmp_path / "pairs.jsonl"), tokenizer)
    assert skipped == {} and pairs[0] == Pair(prompt_ids, chosen_ids, rejected_ids)
    assert pairs[1] == Pair(prompt_ids, encode_pair(tokenizer, "say the", "the")[1],
                            encode_pair(tokenizer, "say the", "th")[1][:-1])
    cut, _ = tokenize_preferences(rows[:1], tokenizer, max_length=len(prompt_ids) + 2)  # the truncation rule holds
    assert (cut[0].chosen_ids, cut[0].rejected_ids) == ([t, h], [h, t])
    stale = dict(rows[0], chosen="the")  # text edited after sampling: its ids no longer say it
    with pytest.raises(DataError, match="row 0: field 'chosen_ids': the ids do not decode to the 'chosen' text"):
        tokenize_preferences([stale], tokenizer)
    with pytest.raises(DataError, match="row 0: field 'rejected_ids': expected a non-empty list of token ids"):
        tokenize_preferences([dict(rows[0], rejected_ids=[])], tokenizer)


def test_special_token_strings_in_data_stay_text(tokenizer):
    """"<|eos|>" written inside a response is text (here unknown characters), not a stop token that would end the
    response early and leave what follows it as the template's trailing text."""
    pairs, _ = tokenize_preferences([dict(prompt="hi <|eos|>", chosen="a<|eos|>b", rejected="c")], tokenizer)
    eos = tokenizer.eos_token_id
    assert pairs[0].chosen_ids.count(eos) == 1 and pairs[0].chosen_ids[-1] == eos
    assert pairs[0].prompt_ids.count(eos) == 1  # the template's end of the user turn
    assert tokenizer.decode(pairs[0].chosen_ids[:-1], skip_special_tokens=True).startswith("a")

def test_skip_counts_every_reason_and_all_bad_is_an_error(tokenizer):
    pairs, skipped = tokenize_preferences(GOOD + [row for row, _ in BAD.values()], tokenizer, max_prompt_length=30,
                                          skip_bad=True)
    assert len(pairs) == 2 and skipped == {reason: 1 for reason in BAD}
    with pytest.raises(DataError, match="no usable rows"):
        tokenize_preferences([BAD["empty"][0]], tokenizer, skip_bad=True)


def test_template_prefix_problem_and_missing_template(tokenizer, tmp_path):
    template = ("{% for m in messages %}{% if m['role'] == 'assistant' %}<|assistant|> {{ m['content'] }}"
                "{% else %}<|user|>\n{{ m['content'] }}\n{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    with pytest.raises(DataError, match="row 0: field 'chosen': chat template is not prefix-consistent"):
        tokenize_preferences(GOOD, tokenizer, chat_template=template)
    tokenizer_without = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    tokenizer_without.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        tokenize_preferences(GOOD, tokenizer_without, skip_bad=True)  # a tokenizer problem, never a skipped row


def test_truncation_rule(tokenizer):
    rows = [dict(prompt="hi", chosen="a long answer that will be cut", rejected="ok")]
    (full,), _ = tokenize_preferences(rows, tokenizer)
    P = len(full.prompt_ids)
    (pair,), _ = tokenize_preferences(rows, tokenizer, max_length=P + 5, max_prompt_length=P)
    assert pair.prompt_ids == full.prompt_ids and pair.chosen_ids == full.chosen_ids[:5]  # cut from the right
    assert pair.chosen_ids[-1] != tokenizer.eos_token_id and pair.rejected_ids == full.rejected_ids  # short: kept
    with pytest.raises(DataError, match=f"prompt is {P} tokens > max_prompt_length {P - 1}"):
        tokenize_preferences(rows, tokenizer, max_length=P + 5, max_prompt_length=P - 1)
    with pytest.raises(ValueError, match="must be < max_length"):
        tokenize_preferences(rows, tokenizer, max_length=P, max_prompt_length=P)


def test_prompt_with_no_room_for_a_response_is_a_bad_row(tokenizer):
    """Without max_prompt_length, a prompt of P >= max_length tokens is a bad row (it used to be sliced with
    max_length - P <= 0, keeping no response or the wrong tokens); Pair.row names the source row of each pair."""
    rows = [dict(prompt="hi " * 30, chosen="a b", rejected="c"), dict(prompt="hi", chosen="a b", rejected="c")]
    (full, _), _ = tokenize_preferences(rows, tokenizer)
    P = len(full.prompt_ids)
    for max_length in (P - 3, P):
        with pytest.raises(DataError, match=f"row 0: field 'prompt': prompt is {P} tokens, no room for a response "
                                            f"in max_length {max_length}"):
            tokenize_preferences(rows, tokenizer, max_length=max_length)
        pairs, skipped = tokenize_preferences(rows, tokenizer, max_length=max_length, skip_bad=True)
        assert skipped == {"prompt_too_long": 1} and [pair.row for pair in pairs] == [1]
    (pair, _), _ = tokenize_preferences(rows, tokenizer, max_length=P + 1)  # room for one token: kept, cut to it
    assert pair.chosen_ids == full.chosen_ids[:1] and pair.rejected_ids == full.rejected_ids[:1] and pair.row == 0

def test_collate_pairs_right_pads_and_masks_only_response_tokens():
    pairs = [Pair([5, 6, 7], [8, 2], [9, 9, 9, 2]), Pair([5], [3, 4, 2], [2])]
    batch = collate_pairs(pairs, pad_id=0)
    assert {k: v.shape for k, v in batch.items()} == {k: (4, 7) for k in ("input_ids", "attention_mask", "loss_mask")}
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 2, 0, 0], [5, 3, 4, 2, 0, 0, 0],      # chosen rows [0:B]
                                           [5, 6, 7, 9, 9, 9, 2], [5, 2, 0, 0, 0, 0, 0]]      # rejected rows [B:2B]
    assert batch["attention_mask"].tolist() == [[1] * 5 + [0] * 2, [1] * 4 + [0] * 3, [1] * 7, [1] * 2 + [0] * 5]
    assert batch["loss_mask"].tolist() == [[0, 0, 0, 1, 1, 0, 0], [0, 1, 1, 1, 0, 0, 0],
                                           [0, 0, 0, 1, 1, 1, 1], [0, 1, 0, 0, 0, 0, 0]]
    single = collate_sequences([Sequence([5, 6], [7, 2])], pad_id=0)
    assert single["input_ids"].tolist() == [[5, 6, 7, 2]] and single["loss_mask"].tolist() == [[0, 0, 1, 1]]
    assert all(v.dtype == torch.long for v in batch.values())


def test_epoch_windows_keep_every_example_and_shard_like_one_process():
    n, B, A, W = 19, 2, 2, 3  # windows of 12 pairs: 12 + a short last one of 7
    windows = epoch_windows(n, B * A * W, seed=1, epoch=4)
    assert windows == epoch_windows(n, B * A * W, seed=1, epoch=4) != epoch_windows(n, B * A * W, seed=1, epoch=5)
    assert windows != epoch_windows(n, B * A * W, seed=2, epoch=4)
    assert [len(w) for w in windows] == [12, 7] and sorted(sum(windows, [])) == list(range(n))  # nothing dropped
    for window in windows:
        per_rank = [micro_batches(window, B, r, W) for r in range(W)]
        assert all(len(m) == A for m in per_rank)  # every rank runs as many forwards (FSDP's collectives)
        for k in range(A):  # micro-step k over all ranks = window[k*B*W:(k+1)*B*W], in rank order
            assert sum((per_rank[r][k] for r in range(W)), []) == window[k * B * W:(k + 1) * B * W]
    assert micro_batches(windows[1], B, 1, W)[1] == [] == micro_batches(windows[1], B, 2, W)[1]  # short window


def test_write_jsonl_round_trip(tmp_path):
    write_jsonl(tmp_path / "x.jsonl", [{"a": 1}, {"a": 2}])
    assert load_dataset_any(tmp_path / "x.jsonl")["a"] == [1, 2] and list(tmp_path.iterdir()) == [tmp_path / "x.jsonl"]
