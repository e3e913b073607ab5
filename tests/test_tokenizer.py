"""Chat-template tokenisation: prompts with the generation prompt, prefix-consistent pairs, EOS, clear errors."""
import pytest

from conftest import build_test_tokenizer
from minirlhf.tokenizer import decode_response, encode_pair, encode_prompt, load_tokenizer, pad_token_id


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_string_prompt_is_one_user_message_with_generation_prompt(tokenizer):
    expected = ids(tokenizer, "<|bos|><|user|>\nhi there<|eos|>\n<|assistant|>\n")
    assert expected[:2] == [tokenizer.bos_token_id, tokenizer.convert_tokens_to_ids("<|user|>")]  # BOS only once
    assert encode_prompt(tokenizer, "hi there") == expected
    assert encode_prompt(tokenizer, [{"role": "user", "content": "hi there"}]) == expected


def test_pair_is_prefix_split_of_the_conversation_and_ends_with_eos(tokenizer):
    messages = [{"role": "system", "content": "be brief."}, {"role": "user", "content": "hi"}]
    prompt_ids, response_ids = encode_pair(tokenizer, messages, "the answer")
    full = ids(tokenizer, "<|bos|><|system|>\nbe brief.<|eos|>\n<|user|>\nhi<|eos|>\n"
                          "<|assistant|>\nthe answer<|eos|>\n")
    assert prompt_ids == encode_prompt(tokenizer, messages)
    assert prompt_ids + response_ids == full[:-1]  # the template's "\n" after the end-of-turn token is cut
    assert response_ids[-1] == tokenizer.eos_token_id and response_ids.count(tokenizer.eos_token_id) == 1
    assert decode_response(tokenizer, response_ids) == "the answer"
    assert encode_pair(tokenizer, "hi", [{"role": "assistant", "content": "yo"}]) == encode_pair(tokenizer, "hi", "yo")


def test_eos_appended_when_template_writes_none(tmp_path):
    template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    tok = build_test_tokenizer(tmp_path, chat_template=template)
    prompt_ids, response_ids = encode_pair(tok, "hi", "yo")
    assert response_ids == ids(tok, "yo") + [tok.eos_token_id]


def test_missing_chat_template_is_a_clear_error_and_override_works(tmp_path):
    build_test_tokenizer(tmp_path, chat_template=None)
    tok = load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="no chat template.*chat_template="):
        encode_prompt(tok, "hi")
    with pytest.raises(ValueError, match="no chat template"):
        encode_pair(tok, "hi", "yo")
    assert encode_prompt(tok, "hi", chat_template="{{ messages[0]['content'] }}!") == ids(tok, "hi!")


def test_template_that_breaks_the_prefix_is_named(tokenizer):
    template = ("{% for m in messages %}{% if m['role'] == 'assistant' %}<|assistant|> {{ m['content'] }}<|eos|>"
                "{% else %}<|user|>\n{{ m['content'] }}<|eos|>\n{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    with pytest.raises(ValueError, match="not prefix-consistent.*first difference at token 7"):
        encode_pair(tokenizer, "hi", "yo", chat_template=template)


def test_load_tokenizer_keeps_template_and_special_ids(tokenizer_dir, tokenizer):
    tok = load_tokenizer(tokenizer_dir)
    assert tok.chat_template == tokenizer.chat_template
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2) and pad_token_id(tok) == 0
    assert decode_response(tok, [0, 5] + ids(tok, "ok") + [2, 0]) == "ok"
