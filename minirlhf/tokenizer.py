"""Prompt and response tokenisation through the checkpoint's chat template, in one place.

Every prompt, string or list of {"role", "content"} messages, is templated; a string prompt is one user message.
Rendered text is tokenised with add_special_tokens=False because chat templates write their own BOS.
A (prompt, response) pair is tokenised by templating the whole conversation, checking that the prompt's tokens
(with the generation prompt) are a prefix of it, and keeping the rest as the response. The response is cut just
after its last EOS (the end-of-turn token; templates such as ChatML add "\\n" after it) or, if the template
wrote none, gets EOS appended, so every response ends with the token generation stops on.
"""
import os

import jinja2
import transformers

from minirlhf.rundir import UserError


def load_tokenizer(path):
    """AutoTokenizer with the checkpoint's chat template; remote code is never run. `path` is a local folder (a
    missing one is said to be missing, not taken for a Hub repo id)."""
    if not os.path.isdir(path):
        raise UserError(f"{path}: no such folder (expected a checkpoint folder with config.json and the tokenizer)")
    return transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=False)


def pad_token_id(tokenizer) -> int:
    """Pad id for collation (pad positions are masked, so EOS is a safe stand-in when there is no pad token)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def as_messages(prompt) -> list[dict]:
    """A string prompt becomes a single user message; a message list is returned as a list."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def check_chat_template(tokenizer, chat_template=None):
    """Raise a clear error when there is no template to apply (`chat_template` overrides the tokenizer's)."""
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise UserError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template: pass "
                        "chat_template= (a Jinja string) or use a checkpoint whose tokenizer has one")


def apply_template(tokenizer, messages, add_generation_prompt, chat_template=None) -> list[int]:
    """Render `messages` with the chat template (`chat_template` overrides the tokenizer's) and tokenise."""
    check_chat_template(tokenizer, chat_template)
    try:
        text = tokenizer.apply_chat_template(messages, chat_template=chat_template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except jinja2.TemplateError as e:  # e.g. a role the template does not know: a row problem (ValueError)
        raise ValueError(f"chat template: {e} (roles {[m.get('role') for m in messages]})") from None
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_prompt(tokenizer, prompt, chat_template=None) -> list[int]:
    """Token ids of `prompt` (str or messages) followed by the template's generation prompt."""
    return apply_template(tokenizer, as_messages(prompt), True, chat_template)


def encode_pair(tokenizer, prompt, response, chat_template=None) -> tuple[list[int], list[int]]:
    """(prompt_ids, response_ids) such that prompt_ids + response_ids is the templated conversation.

    `response` is a string (one assistant message) or a list of assistant messages.
    """
    messages = as_messages(prompt)
    response = [{"role": "assistant", "content": response}] if isinstance(response, str) else list(response)
    prompt_ids = encode_prompt(tokenizer, messages, chat_template)
    full_ids = apply_template(tokenizer, messages + response, False, chat_template)
    if full_ids[:len(prompt_ids)] != prompt_ids:
        i = next((i for i, (a, b) in enumerate(zip(prompt_ids, full_ids)) if a != b), len(full_ids))
        raise ValueError(f"chat template is not prefix-consistent: the prompt's tokens (with the generation prompt)"
                         f" are not a prefix of the prompt+response tokens; first difference at token {i}: "
                         f"{tokenizer.decode(prompt_ids[i:i + 8])!r} vs {tokenizer.decode(full_ids[i:i + 8])!r}")
    response_ids, eos = full_ids[len(prompt_ids):], tokenizer.eos_token_id
    if eos is None:
        raise UserError("tokenizer has no eos_token: responses could not end with an end-of-turn token")
    if eos in response_ids:
        return prompt_ids, response_ids[:len(response_ids) - response_ids[::-1].index(eos)]
    return prompt_ids, response_ids + [eos]


def decode_response(tokenizer, ids) -> str:
    """Response text without special tokens (EOS, padding, role markers)."""
    return tokenizer.decode(ids, skip_special_tokens=True)
