"""Shared test fixtures: a small real `transformers` tokenizer with a chat template, built locally (no download).

Fixtures (session-scoped, built once; do not mutate them - copy with `load_tokenizer(tokenizer_dir)` first):
  tokenizer_dir  folder written by `save_pretrained` (pass it wherever a checkpoint's tokenizer path is expected)
  tokenizer      `transformers.PreTrainedTokenizerFast` loaded back from `tokenizer_dir` with AutoTokenizer

The tokenizer is character-level BPE with a few merges (so merges can cross template/content boundaries, as in
real BPE), lower-cases its input, and has fewer than 97 ids with pad=0, bos=1, eos=2 like tests/tiny.py's
models, so `save_tiny(path, family)` models accept its ids. The chat template is Qwen/ChatML-like:
  <|bos|><|user|>\nhi<|eos|>\n<|assistant|>\nyo<|eos|>\n
"""
import string

import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, normalizers

SPECIAL = ["<|pad|>", "<|bos|>", "<|eos|>", "<|unk|>", "<|user|>", "<|assistant|>", "<|system|>"]
CHARS = list(string.ascii_lowercase + string.digits + " .,!?'-:;()+=*/\n")
MERGES = [("t", "h"), ("th", "e"), ("i", "n"), ("e", " "), ("a", "n")]
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|eos|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def build_test_tokenizer(path, chat_template=CHAT_TEMPLATE):
    """Build the test tokenizer, `save_pretrained` it to `path`, return the `PreTrainedTokenizerFast`."""
    vocab = {t: i for i, t in enumerate(SPECIAL + CHARS + ["".join(m) for m in MERGES])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=MERGES, unk_token="<|unk|>"))
    backend.normalizer = normalizers.Lowercase()
    backend.decoder = decoders.Fuse()  # no pre-tokenizer: spaces and newlines are ordinary characters
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>",
        unk_token="<|unk|>", additional_special_tokens=SPECIAL[4:], chat_template=chat_template)
    tok.save_pretrained(path)
    return tok


# Two real-world template families for special-token tests: ChatML (Qwen) and Llama 3 (its content | trim).
# Their tokenizers add the characters of the special strings, so a literal "<|im_end|>" can be tokenised as text.
CHAT_STYLES = {
    "chatml": dict(special=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], bos=None, eos="<|im_end|>",
                   pad="<|endoftext|>", template=(
                       "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
                       "'<|im_end|>' + '\\n' }}{% endfor %}"
                       "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")),
    "llama3": dict(special=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                            "<|eot_id|>"], bos="<|begin_of_text|>", eos="<|eot_id|>", pad="<|end_of_text|>", template=(
                       "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + "
                       "'<|end_header_id|>\\n\\n' + m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
                       "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
                       "{% endif %}")),
}


def build_chat_tokenizer(path, style):
    """A character-level BPE like build_test_tokenizer's (plus the characters "<|>_") with the special tokens and
    chat template of CHAT_STYLES[style], saved to `path` -> the `PreTrainedTokenizerFast`."""
    s = CHAT_STYLES[style]
    vocab = {t: i for i, t in enumerate(s["special"] + ["<unk>"] + CHARS + list("<|>_") + ["".join(m) for m in MERGES])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=MERGES, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.decoder = decoders.Fuse()
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=s["bos"], eos_token=s["eos"], pad_token=s["pad"], unk_token="<unk>",
        additional_special_tokens=[t for t in s["special"] if t not in (s["bos"], s["eos"], s["pad"])],
        chat_template=s["template"])
    tok.save_pretrained(path)
    return tok


def pytest_collection_modifyitems(items):
    """Tests marked gpu need CUDA: skipped, saying so, without it (benchmarks/gpu.sh runs them on a GPU)."""
    if not torch.cuda.is_available():
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU; benchmarks/gpu.sh runs it on one"))


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    build_test_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    return transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
