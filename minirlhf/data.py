"""Preference and SFT data: loading, row formats, tokenisation, truncation, collation and sharded shuffling.

Row formats (TRL's column layouts; column names are flags of the scripts):
  standard        prompt, chosen, rejected are strings (unlike TRL, templated: one user, one assistant message)
  conversational  prompt is a list of {"role", "content"} messages (or a string); chosen / rejected are lists
                  of assistant messages
  implicit prompt chosen and rejected are whole conversations (RLHFlow, UltraFeedback-binarized): the prompt is
                  every message before the last assistant message, the same in both; anything after the last
                  assistant message is dropped and a prompt column, if present, is ignored
Rating rows (HelpSteer2): prompt, response and one number per attribute, a missing or null one unrated (MISSING).
SFT rows: prompt/completion, a `messages` conversation (its last assistant turn), or a preference row (chosen).
All go through the chat template (minirlhf.tokenizer): the same content gives the same ids in every format.
Sampled rows (iterate.py's) carry `<column>_ids` beside the text, the tokens as the sampler saw and produced them,
and train on those, not on re-encoded text; `<response column>_truncated` on a text row: no stop token.

Truncation: a prompt longer than max_prompt_length, or leaving no room for a response under max_length, makes a
bad row (cutting a prompt changes the task); responses are cut from the right (losing their EOS). Bad rows
(missing field, empty prompt, wrong type, prompt too long, chosen identical to rejected, prompts that differ or
break the template's prefix property) raise DataError naming the file, row and field; with skip_bad=True they are
skipped and counted per reason. Scripts with their own row checks use split_row and BadRow.
"""
import json
import os
from collections import Counter
from dataclasses import dataclass, field

import datasets
import torch

from minirlhf.dist import print0
from minirlhf.rundir import UserError, atomic_write_text
from minirlhf.tokenizer import as_messages, check_chat_template, decode_response, encode_pair, encode_prompt


class DataError(UserError):
    """A bad data row: the message names the file, the row index and the field."""


@dataclass
class Pair:  # one preference example; chosen_ids / rejected_ids hold the response tokens only
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    row: int = field(default=-1, compare=False)  # index of the source row, to match per-row columns after skips


@dataclass
class Sequence:  # one SFT / scoring example
    prompt_ids: list[int]
    response_ids: list[int]


def load_dataset_any(path, split="train") -> datasets.Dataset:
    """A .json / .jsonl / .parquet file, a Dataset.save_to_disk folder, a folder of data files, or "hub:NAME" for
    `datasets.load_dataset(NAME, split=split)`: the Hub is reached only when asked for by that prefix.
    A file that does not load is read again to say which line is bad (JSON) or that it is not parquet."""
    path = str(path)
    datasets.disable_progress_bars()  # one bar per small file would drown the training logs
    if path.startswith("hub:"):
        return datasets.load_dataset(path[4:], split=split)
    if not os.path.exists(path):
        raise DataError(f"{path}: not found locally (for a dataset on the Hugging Face Hub, write hub:{path})")
    if any(os.path.exists(os.path.join(path, f)) for f in ("state.json", "dataset_dict.json")):
        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict) and split not in ds:
            raise DataError(f"{path}: no split {split!r}; its splits are {list(ds)}: name one with --train-split "
                            "(or --eval-split for --eval-data)")
        return ds[split] if isinstance(ds, datasets.DatasetDict) else ds
    ext = os.path.splitext(path)[1]
    if ext not in (".json", ".jsonl", ".parquet"):
        return datasets.load_dataset(path, split=split)  # a local folder of data files
    if not os.path.isfile(path):
        raise DataError(f"{path}: is a folder, not a {ext} file")
    if ext != ".parquet":
        _check_json(path, ext)  # cheap next to tokenisation, and it names the bad line
    try:
        ds = datasets.load_dataset("parquet" if ext == ".parquet" else "json", data_files=path, split="train")
    except Exception as e:  # pyarrow and datasets name neither the file nor the row
        raise DataError(f"{path}: could not be read as {ext[1:]}: {type(e).__name__}: {str(e)[:200]}") from None
    if not len(ds):
        raise DataError(f"{path}: no rows")
    return ds


def _check_json(path, ext):
    """Every line of a .jsonl (or the whole .json) is UTF-8 JSON holding objects, and there is at least one."""
    with open(path, "rb") as f:
        raw = f.read()
    where, items = "file", []
    try:
        if ext == ".json":
            whole = json.loads(raw.decode("utf-8"))
            numbered = ((f"item {i}", x) for i, x in enumerate(whole if isinstance(whole, list) else [whole]))
        else:  # parsed one line at a time, so the first bad line is the one named
            numbered = ((f"line {i + 1}", line) for i, line in enumerate(raw.split(b"\n")) if line.strip())
        for where, item in numbered:
            items.append(item if ext == ".json" else json.loads(item.decode("utf-8")))
            if not isinstance(items[-1], dict):
                raise ValueError(f"a JSON {type(items[-1]).__name__}, expected an object {{column: value}}")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: {where}: not UTF-8 text (byte {e.start}: {e.object[e.start:e.start + 1]!r})") \
            from None
    except ValueError as e:
        raise DataError(f"{path}: {where}: {e}") from None
    if not items:
        raise DataError(f"{path}: no rows (the file is empty or blank)")


def load_prompts(path, column, reference_column=None):
    """The prompts of a dataset file (strings or chat messages); a missing or empty prompt names its row. With
    reference_column: (prompts, reference responses); a whole conversation there gives the prompt too."""
    rows = load_dataset_any(path)
    if column not in rows.column_names and reference_column not in rows.column_names:
        raise ValueError(f"{path}: no column {column!r} (columns: {rows.column_names}); set --prompt-column")
    split = []
    for i, row in enumerate(rows):
        try:
            split.append(split_row(row, column, [reference_column] if reference_column else []))
        except BadRow as bad:
            raise bad.error(path, i) from None
    prompts = [prompt for prompt, _ in split]
    return (prompts, [r[0] for _, r in split]) if reference_column else prompts


def write_jsonl(path, rows):
    """Write rows as JSON lines atomically (readers never see half a file); NaN and Infinity are refused."""
    atomic_write_text(path, "".join(json.dumps(row, allow_nan=False) + "\n" for row in rows))


class BadRow(Exception):
    """BadRow(reason, field, message): a bad row found while reading it; callers count skips per reason or, with
    .error(source, i), raise the DataError naming the file, row and field."""

    def error(self, source, i):
        _, column, message = self.args
        return DataError(f"{source}: row {i}: field {column!r}: {message}")


def _field(row, column, allow_empty=False):
    """row[column] as a string or a list of {"role", "content"} messages, else BadRow. allow_empty: a response
    may be "" (or messages with empty content): the policy said nothing but the stop token, a real answer."""
    value = row.get(column)
    if value is None:
        have = "" if column in row else f" (row has columns {sorted(row)})"
        raise BadRow("missing", column, f"missing{have}")
    if isinstance(value, str):
        if not value.strip() and not allow_empty:
            raise BadRow("empty", column, "empty string")
        return value
    if not isinstance(value, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in value):
        raise BadRow("wrong_type", column, f"expected a string or a list of {{'role', 'content'}} string messages, "
                                           f"got {type(value).__name__}: {str(value)[:80]}")
    if not value or (not allow_empty and any(not m["content"].strip() for m in value)):
        raise BadRow("empty", column, "empty message list or message content")
    return [{"role": m["role"], "content": m["content"]} for m in value]  # drop extra keys arrow adds


def split_row(row, prompt_column, response_columns):
    """(prompt, [response per column]) in any supported row format, prompt = str or messages; else BadRow."""
    responses = [_field(row, c, allow_empty=True) for c in response_columns]
    if not any(isinstance(r, list) and any(m["role"] != "assistant" for m in r) for r in responses):
        return _field(row, prompt_column), responses
    prompts = []  # implicit prompt: whole conversations, split before the last assistant message
    for j, (column, conversation) in enumerate(zip(response_columns, responses)):
        roles = [m["role"] for m in conversation] if isinstance(conversation, list) else []
        if "assistant" not in roles:
            raise BadRow("wrong_type", column, "expected a conversation with an assistant message like the other "
                                               "response column")
        k = len(roles) - 1 - roles[::-1].index("assistant")
        prompts.append(conversation[:k])
        responses[j] = conversation[k:k + 1]
    if not prompts[0]:
        raise BadRow("empty", response_columns[0], "conversation has no messages before its last assistant message")
    if any(p != prompts[0] for p in prompts[1:]):
        raise BadRow("prompt_mismatch", response_columns[1], "conversation does not share the prompt (messages before "
                                                             f"the last assistant message) of {response_columns[0]}")
    return prompts[0], responses


def _sampled_ids(row, tokenizer, prompt_column, response_columns, responses):
    """[(prompt_ids, response_ids) per response column] from the row's id columns, or None for a text row (one
    without all of them). BadRow when the ids are not a list of token ids or a response's do not decode to its
    text (text edited after sampling, or ids of another tokenizer)."""
    columns = [prompt_column, *response_columns]
    ids = [row.get(f"{c}_ids") for c in columns]
    if any(x is None for x in ids):
        return None
    for c, x in zip(columns, ids):
        if not isinstance(x, list) or not x or not all(isinstance(i, int) and i >= 0 for i in x):
            raise BadRow("wrong_type", f"{c}_ids", f"expected a non-empty list of token ids, got {str(x)[:80]}")
    for c, x, text in zip(response_columns, ids[1:], responses):
        if not isinstance(text, str) or decode_response(tokenizer, x) != text:
            raise BadRow("ids_mismatch", f"{c}_ids", f"the ids do not decode to the {c!r} text "
                                                     f"({decode_response(tokenizer, x)[:40]!r} vs {str(text)[:40]!r})")
    return [(ids[0], x) for x in ids[1:]]


def _tokenize_rows(rows, tokenizer, prompt_column, response_columns, max_length, max_prompt_length, chat_template,
                   skip_bad, source, whole=False):
    """[(row index, prompt_ids, [response_ids per column])] with the truncation rule applied, and skip counts.
    whole (a reward model's rows): each conversation exactly as the template renders it, from the text."""
    if max_length is not None and max_prompt_length is not None and max_prompt_length >= max_length:
        raise UserError(f"max_prompt_length ({max_prompt_length}) must be < max_length ({max_length})")
    check_chat_template(tokenizer, chat_template)  # a tokenizer problem, not a row problem: fail before row 0
    out, skipped, i, n_empty = [], Counter(), -1, 0  # i: the last row index (-1: no rows at all)
    for i, row in enumerate(rows):
        try:
            prompt, responses = split_row(row, prompt_column, response_columns)
            n_empty += sum(r == "" or (isinstance(r, list) and not "".join(m["content"] for m in r)) for r in responses)
            encoded = [] if whole else _sampled_ids(row, tokenizer, prompt_column, response_columns, responses) or []
            for column, response in zip(response_columns, [] if encoded else responses):
                try:
                    prompt_ids, response_ids = encode_pair(tokenizer, prompt, response, chat_template, whole)
                except ValueError as e:
                    raise BadRow("template", column, str(e))
                cut = row.get(f"{column}_truncated") is True and not whole  # the policy did not stop: no stop
                encoded.append((prompt_ids, response_ids[:-1] if cut else response_ids))
            prompt_ids = encoded[0][0]
            if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
                raise BadRow("prompt_too_long", prompt_column,
                             f"prompt is {len(prompt_ids)} tokens > max_prompt_length {max_prompt_length}")
            if max_length is not None and len(prompt_ids) >= max_length:
                raise BadRow("prompt_too_long", prompt_column, f"prompt is {len(prompt_ids)} tokens, no room for a "
                                                               f"response in max_length {max_length}")
            limit = None if max_length is None else max_length - len(prompt_ids)  # >= 1: checked above
            responses = [ids[:limit] for _, ids in encoded]
            if len(responses) == 2 and responses[0] == responses[1]:
                raise BadRow("identical", response_columns[1], f"identical to {response_columns[0]}" + (
                    "" if encoded[0][1] == encoded[1][1] else f" once cut to max_length {max_length}"))
        except BadRow as bad:
            if not skip_bad:
                raise bad.error(source, i) from None
            skipped[bad.args[0]] += 1
            continue
        out.append((i, prompt_ids, responses))
    if n_empty:  # valid rows, but a user should know they are there
        print0(f"{source}: {n_empty} empty responses (the stop token alone)")
    report_skipped(source, skipped, i + 1, len(out))
    return out, dict(skipped)


def check_prompts(prompts, tokenizer, max_prompt_length, source, column="prompt"):
    """Online prompts, checked before any sampling: each has a user message (what a reward function reads), and
    at most max_prompt_length tokens (None: no limit), the limit beyond which DPO would drop its pair."""
    for i, prompt in enumerate(prompts):
        roles = [m["role"] for m in as_messages(prompt)]
        if "user" not in roles:
            raise DataError(f"{source}: row {i}: field {column!r}: no user message (roles {roles})")
        if max_prompt_length and (n := len(encode_prompt(tokenizer, prompt))) > max_prompt_length:
            raise DataError(f"{source}: row {i}: field {column!r}: prompt is {n} tokens > {max_prompt_length}, the "
                            "DPO prompt limit (--max-length / 4): raise --max-length or drop the row")


def report_skipped(source, skipped, n_rows, n_kept):
    """Print the skipped rows per reason (rank 0); no usable row at all is an error."""
    if skipped:
        print0(f"{source}: skipped {sum(skipped.values())} bad rows of {n_rows}: {dict(skipped)}")
    if not n_kept:
        raise DataError(f"{source}: no usable rows")


def tokenize_preferences(rows, tokenizer, prompt_column="prompt", chosen_column="chosen", rejected_column="rejected",
                         max_length=None, max_prompt_length=None, chat_template=None, skip_bad=False,
                         source="<rows>", whole=False) -> tuple[list[Pair], dict[str, int]]:
    """Rows (any iterable of dicts, e.g. a datasets.Dataset) -> (pairs, skipped rows per reason); `whole`: the
    responses as a reward model reads them (tokenizer.encode_pair)."""
    out, skipped = _tokenize_rows(rows, tokenizer, prompt_column, [chosen_column, rejected_column], max_length,
                                  max_prompt_length, chat_template, skip_bad, source, whole)
    return [Pair(p, c, r, i) for i, p, (c, r) in out], skipped


MISSING = -100.0  # the label of an unrated attribute (NeMo-Aligner's loss_mask_val)


def tokenize_ratings(rows, tokenizer, prompt_column, response_column, attributes, value_range, max_length=None,
                     max_prompt_length=None, skip_bad=False, source="<rows>") -> list[tuple[Sequence, list[float]]]:
    """Rating rows -> [(the conversation as a reward model reads it, [rating per attribute or MISSING])]."""
    if missing := [a for a in attributes if a not in rows.column_names]:  # a misspelt one: every row unrated
        raise DataError(f"{source}: no rating column(s) {missing} (columns: {rows.column_names}); set --attributes")
    out, skipped = _tokenize_rows(rows, tokenizer, prompt_column, [response_column], max_length, max_prompt_length,
                                  None, skip_bad, source, whole=True)
    (lo, hi), examples, bad = value_range, [], Counter()
    for i, prompt_ids, (response_ids,) in out:
        labels = [rows[i][a] for a in attributes]
        wrong = [(a, v) for a, v in zip(attributes, labels)  # a bool is not a rating; NaN fails the range
                 if v is not None and (type(v) not in (int, float) or not lo <= v <= hi)]
        if wrong and not skip_bad:
            raise DataError(f"{source}: row {i}: field {wrong[0][0]!r}: expected a number in [{lo}, {hi}] or null "
                            f"(unrated), got {wrong[0][1]!r}")
        bad["rating"] += bool(wrong)
        if not wrong:
            examples.append((Sequence(prompt_ids, response_ids), [MISSING if v is None else float(v) for v in labels]))
    report_skipped(source, +bad, len(out), len(examples))
    return examples


def load_preferences(path, tokenizer, split="train", **kwargs) -> tuple[list[Pair], dict[str, int]]:
    """load_dataset_any + tokenize_preferences; errors name `path`."""
    return tokenize_preferences(load_dataset_any(path, split), tokenizer, source=str(path), **kwargs)


def load_sft(path, tokenizer, split="train", prompt_column="prompt", completion_column="completion",
             messages_column="messages", chosen_column="chosen", max_length=None, max_prompt_length=None,
             chat_template=None, skip_bad=False) -> tuple[list[Sequence], dict[str, int]]:
    """SFT rows of a dataset file -> (sequences, skipped). The format is chosen from the first row's columns:
    `messages_column`, else `completion_column`, else `chosen_column` (a preference row: train on chosen)."""
    rows = load_dataset_any(path, split)
    first = rows[0] if len(rows) else {}
    column = next((c for c in (messages_column, completion_column, chosen_column) if c in first), completion_column)
    out, skipped = _tokenize_rows(rows, tokenizer, prompt_column, [column], max_length, max_prompt_length,
                                  chat_template, skip_bad, str(path))
    return [Sequence(p, r) for _, p, (r,) in out], skipped


def collate_sequences(examples, pad_id) -> dict[str, torch.Tensor]:
    """Right-padded batch of Sequence-like examples (.prompt_ids, .response_ids) -> input_ids, attention_mask,
    loss_mask, each (B, T) long; loss_mask[b, t] = 1 iff token t is a response token."""
    T = max(len(e.prompt_ids) + len(e.response_ids) for e in examples)
    input_ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(len(examples), T, dtype=torch.long)
    loss_mask = torch.zeros(len(examples), T, dtype=torch.long)
    for b, e in enumerate(examples):
        n_prompt, n = len(e.prompt_ids), len(e.prompt_ids) + len(e.response_ids)
        input_ids[b, :n] = torch.tensor(e.prompt_ids + e.response_ids, dtype=torch.long)
        attention_mask[b, :n] = 1
        loss_mask[b, n_prompt:n] = 1
    return dict(input_ids=input_ids, attention_mask=attention_mask, loss_mask=loss_mask)


def collate_pairs(examples, pad_id) -> dict[str, torch.Tensor]:
    """B pairs -> (2B, T) batch: rows [0:B] are prompt+chosen, rows [B:2B] prompt+rejected (one forward pass)."""
    return collate_sequences([Sequence(e.prompt_ids, e.chosen_ids) for e in examples] +
                             [Sequence(e.prompt_ids, e.rejected_ids) for e in examples], pad_id)


def epoch_windows(n, window_size, seed, epoch) -> list[list[int]]:
    """One epoch's optimizer-step windows of example indices, for both trainers: a permutation of range(n)
    seeded by (seed, epoch), cut into windows of batch_size x grad_accum x world_size; the last one may be short
    (nothing is dropped), and the permutation changes every epoch."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    return [perm[s:s + window_size] for s in range(0, n, window_size)]


def micro_batches(window, batch_size, rank, world_size) -> list[list[int]]:
    """This rank's micro-batches of a window: micro-step k covers window[k*B*W:(k+1)*B*W] and rank r takes its
    slice [r*B:(r+1)*B], so the union over ranks is what one process with batch B*W sees. In a short window a
    rank's slice may be empty: it then runs a zero-weight forward to keep FSDP's collectives in step."""
    return [window[s + rank * batch_size:s + (rank + 1) * batch_size]
            for s in range(0, len(window), batch_size * world_size)]
