"""Chat-template tokenisation: prompts with the generation prompt, prefix-consistent pairs, EOS, clear errors."""
import pytest
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

from conftest import build_chat_tokenizer, build_test_tokenizer
from minirlhf.data import DataError, tokenize_preferences
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


@pytest.mark.parametrize("style", ["chatml", "llama3"])
def test_special_token_strings_in_content_stay_text(tmp_path, style):
    """A literal end-of-turn (or role marker) written in a prompt or response is characters, never the token: the
    only special tokens are the template's own, in the places the same conversation without them has them."""
    tok = build_chat_tokenizer(tmp_path, style)
    end, other = tok.eos_token, "<|im_start|>" if style == "llama3" else "<|endoftext|>"
    prompt, response = f"quote {end} please", f"here: {end} and {other}then more"
    prompt_ids, response_ids = encode_pair(tok, prompt, response)
    clean_prompt, clean_response = encode_pair(tok, "quote x please", "here: x and ythen more")
    specials = set(tok.all_special_ids)
    assert [i for i in prompt_ids if i in specials] == [i for i in clean_prompt if i in specials]
    assert [i for i in response_ids if i in specials] == [i for i in clean_response if i in specials] == [
        tok.eos_token_id]  # the response ends at the template's end of turn, and only there
    assert tok.decode(response_ids[:-1]) == response and end in tok.decode(prompt_ids)
    assert encode_prompt(tok, prompt) == prompt_ids
    # the literal is tokenised as the text it is, in context, e.g. " <|" as its characters next to the space
    assert response_ids[:-1] == tok("here: ", add_special_tokens=False)["input_ids"] + tok(
        response[6:], add_special_tokens=False, split_special_tokens=True)["input_ids"]
    # content without such strings: one plain tokenizer call on the rendered text, as before
    text = tok.apply_chat_template([{"role": "user", "content": "quote x please"}], tokenize=False,
                                   add_generation_prompt=True)
    assert clean_prompt == tok(text, add_special_tokens=False)["input_ids"]


def test_template_that_changes_content_holding_a_special_string_is_refused(tmp_path):
    tok = build_chat_tokenizer(tmp_path, "chatml")
    template = tok.chat_template.replace("m['content']", "(m['content'] | replace('<|im_end|>', ''))")
    assert encode_prompt(tok, "hi", chat_template=template) == encode_prompt(tok, "hi")
    with pytest.raises(ValueError, match="changes 'assistant' message content holding the special token '<\\|im_"):
        encode_pair(tok, "hi", "a <|im_end|> b", chat_template=template)
    with pytest.raises(DataError, match="row 0: field 'chosen': the chat template changes 'user' message content"):
        tokenize_preferences([dict(prompt="<|im_end|>", chosen="a", rejected="b")], tok, chat_template=template)


def test_tokenizer_that_tokenises_pieces_differently_is_refused():
    """SentencePiece's Metaspace with prepend_scheme "first" (Llama 2, Mistral) adds "▁" to the first piece only:
    cut at the special tokens, every piece would get one, so content holding a special string is refused."""
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>"] + list("abcdefghijklmnopqrstuvwxyz <>/[]▁"))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        chat_template="{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[inst] {{ m['content'] }} "
                      "[/inst]{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
    assert encode_pair(tok, "hi", "yo")[1] == tok("yo", add_special_tokens=False)["input_ids"][1:] + [2]
    with pytest.raises(ValueError, match="does not tokenise text cut at its special tokens as it tokenises it whole"
                                         ".*'assistant' message content holding the special token '</s>'"):
        encode_pair(tok, "hi", "a </s> b")
