"""Every user mistake ends with one message naming the file and row, the field or the path, and no traceback:
scripts run main() inside rundir.user_errors(), which turns a UserError into SystemExit(message)."""
import json
import os

import pytest

import train_dpo
import train_rm
from minirlhf import checkpoint, data, rundir, task
from minirlhf.checkpoint import load_model, save_model
from tiny import save_tiny


@pytest.fixture(scope="module")
def d(tmp_path_factory, tokenizer):
    d = tmp_path_factory.mktemp("errors")
    save_tiny(d / "model", "llama3")
    tokenizer.save_pretrained(d / "model")
    return d


def dpo(d, data_path, *extra):
    train_dpo.main(["--model", str(d / "model"), "--train-data", str(data_path), "--output-dir", str(d / "out"),
                    "--max-length", "64", "--batch-size", "2", "--grad-accum", "1", *map(str, extra)])


def write(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def good_row(**kw):
    return json.dumps(dict(prompt="hi", chosen="a b", rejected="c d") | kw) + "\n"


def bad_shards(d, index):
    ckpt = d / "shards"
    save_tiny(ckpt, "llama3")
    os.remove(ckpt / "model.safetensors")
    write(ckpt / "model.safetensors.index.json", json.dumps(index))
    return load_model(ckpt)


def broken_weights(d, content):
    save_tiny(d / "broken", "llama3")
    write(d / "broken" / "model.safetensors", content)
    return load_model(d / "broken")


def disk_full(d, monkeypatch):
    def no_space(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(checkpoint, "save_file", no_space)
    save_model(load_model(d / "model"), d / "full")


def unknown_role(d):
    rows = [{"prompt": [{"role": "user", "content": "a b"}], "chosen": "c", "rejected": "d"},
            {"prompt": [{"role": "robot", "content": "a b"}], "chosen": "c", "rejected": "d"}]
    data.tokenize_preferences(rows, task.build_tokenizer(), source="task.jsonl")


def nan_margin(d):
    path = write(d / "margins.jsonl", good_row(m=1.0) + good_row(m=float("nan")))
    train_rm.main(["--model", str(d / "model"), "--train-data", str(path), "--output-dir", str(d / "rm"),
                   "--margin-column", "m", "--max-length", "64"])


def split_missing(d):
    import datasets
    datasets.DatasetDict({"validation": datasets.Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}]),
                          "test": datasets.Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}])}
                         ).save_to_disk(str(d / "dict"))
    dpo(d, d / "dict")


def no_template():
    tokenizer = task.build_tokenizer()
    tokenizer.chat_template = None
    data.tokenize_preferences([{"prompt": "a", "chosen": "b", "rejected": "c"}], tokenizer)


CASES = {  # kind -> (what triggers it, what the message must say)
    "DatasetDict without the split": (lambda d, m: split_missing(d),
                                      r"dict: no split 'train'; its splits are \['validation', 'test'\]: "
                                      r".*--train-split"),
    "tokenizer without a chat template": (lambda d, m: no_template(), r"no chat template: pass --chat-template FILE"),
    "malformed JSON line": (lambda d, m: dpo(d, write(d / "a.jsonl", good_row() + "{oops\n")), r"a.jsonl: line 2: "),
    "non-UTF-8 bytes": (lambda d, m: dpo(d, write(d / "b.jsonl", good_row().encode() + b'{"prompt": "\xff"}\n')),
                        r"b.jsonl: line 2: not UTF-8"),
    "empty file": (lambda d, m: dpo(d, write(d / "c.jsonl", "")), r"c.jsonl: no rows"),
    "blank lines": (lambda d, m: dpo(d, write(d / "e.jsonl", "\n \n\n")), r"e.jsonl: no rows"),
    "folder named x.jsonl": (lambda d, m: dpo(d, (d / "x.jsonl").mkdir() or d / "x.jsonl"), r"x.jsonl: is a folder"),
    "not parquet": (lambda d, m: dpo(d, write(d / "f.parquet", "not parquet")), r"f.parquet: could not be read as "
                                                                                  r"parquet"),
    "JSON array with a non-object": (lambda d, m: dpo(d, write(d / "g.json", '[{"prompt": "hi"}, 3]')),
                                     r"g.json: item 1: a JSON int, expected an object"),
    "unknown chat role": (lambda d, m: unknown_role(d), r"task.jsonl: row 1: field 'chosen': chat template: .*robot"),
    "NaN margin": (lambda d, m: nan_margin(d), r"margins.jsonl: row 1: field 'm': expected a finite number, got nan"),
    "prompt without a user turn": (lambda d, m: data.check_prompts(["hi", [{"role": "system", "content": "x"}]], None,
                                                                   None, "p.jsonl"), r"p.jsonl: row 1: field 'prompt'"),
    "missing model folder": (lambda d, m: dpo(d, write(d / "h.jsonl", good_row()), "--model", d / "missing"),
                             r"missing: no such folder"),
    "truncated safetensors": (lambda d, m: broken_weights(d, (d / "model" / "model.safetensors").read_bytes()[:300]),
                              r"broken/model.safetensors: not a readable safetensors file"),
    "empty safetensors": (lambda d, m: broken_weights(d, b""), r"broken/model.safetensors: not a readable"),
    "disk full on save": (lambda d, m: disk_full(d, m), r"full: could not write: No space left on device"),
    "index without weight_map": (lambda d, m: bad_shards(d, {"metadata": {}}),
                                 r"shards/model.safetensors.index.json: no \"weight_map\""),
    "shard path outside the folder": (lambda d, m: bad_shards(d, {"weight_map": {"a": "../model/model.safetensors"}}),
                                      r"index.json: shard path\(s\) outside the checkpoint folder"),
    "label smoothing with ipo": (lambda d, m: dpo(d, d / "i.jsonl", "--loss", "ipo", "--label-smoothing", 0.1),
                                 r"--label-smoothing 0.1: .*needs --loss dpo \(got ipo\)"),
    "label smoothing >= 0.5": (lambda d, m: dpo(d, d / "i.jsonl", "--label-smoothing", 0.5),
                               r"--label-smoothing 0.5: .*in \[0, 0.5\)"),
    "missing chat template file": (lambda d, m: dpo(d, d / "h.jsonl", "--chat-template", d / "none.jinja"),
                                   r"none.jinja: no such file"),
    "hub-like name not found locally": (lambda d, m: data.load_dataset_any("someorg/somedata"),
                                        r"someorg/somedata: not found locally .*hub:someorg/somedata"),
}


@pytest.mark.parametrize("kind", list(CASES))
def test_user_mistakes_end_with_a_message_naming_where(d, kind, monkeypatch):
    trigger, match = CASES[kind]
    with pytest.raises(SystemExit) as e, rundir.user_errors():
        trigger(d, monkeypatch)
    assert e.value.code.startswith("error: ")
    assert __import__("re").search(match, e.value.code), e.value.code


@pytest.mark.parametrize("flag", ["--batch-size", "--grad-accum"])
def test_counts_of_zero_are_refused_by_the_parser(d, flag, capsys):
    with pytest.raises(SystemExit):
        train_dpo.build_parser().parse_args(["--model", "m", "--train-data", "t", "--output-dir", "o", flag, "0"])
    assert f"argument {flag}: must be a whole number >= 1, got 0" in capsys.readouterr().err
