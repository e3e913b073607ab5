"""Prompt and response tokenisation through the checkpoint's chat template, in one place.

Every prompt (a string is one user message, or a list of {"role", "content"} messages) is templated and the text
tokenised with add_special_tokens=False (templates write their own BOS). A (prompt, response) pair is the whole
conversation templated, the prompt's tokens (with the generation prompt) checked to be a prefix, and the rest the
response, cut after its last EOS (ChatML adds "\\n" after it) or given one: the token generation stops on. A
reward model reads the conversation as rendered (`whole=True`). Special-token strings in message content stay
text ("<|im_end|>" in a response would end the turn early and train on what follows): `_encode_content_as_text`.
"""
import os
import re

import jinja2
import transformers

from minirlhf.rundir import UserError


def load_tokenizer(path):
    """AutoTokenizer of a local checkpoint folder, with its chat template; remote code is never run."""
    if not os.path.isdir(path):
        raise UserError(f"{path}: no such folder (expected a checkpoint folder with config.json and the tokenizer)")
    return transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=False)


def pad_token_id(tokenizer) -> int:
    """Pad id for collation (pad positions are masked, so EOS is a safe stand-in when there is no pad token)."""
    return tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id


def as_messages(prompt) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def check_chat_template(tokenizer, chat_template=None):
    """A clear error when there is no template to apply (`chat_template` overrides the tokenizer's)."""
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise UserError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template: pass "
                        "--chat-template FILE (a Jinja template; in Python, chat_template=) or use a checkpoint "
                        "whose tokenizer has one")


def apply_template(tokenizer, messages, add_generation_prompt, chat_template=None) -> list[int]:
    """Render `messages` with the chat template and tokenise; special-token strings in the content stay text."""
    check_chat_template(tokenizer, chat_template)
    def render(msgs):
        try:
            return tokenizer.apply_chat_template(msgs, chat_template=chat_template, tokenize=False,
                                                 add_generation_prompt=add_generation_prompt)
        except jinja2.TemplateError as e:  # e.g. a role the template does not know: a row problem (ValueError)
            raise ValueError(f"chat template: {e} (roles {[m.get('role') for m in msgs]})") from None
    specials = sorted({t.content for t in tokenizer.added_tokens_decoder.values() if t.special}, key=len, reverse=True)
    if any(s in m["content"] for m in messages if isinstance(m.get("content"), str) for s in specials):
        return _encode_content_as_text(tokenizer, messages, render, specials)
    return tokenizer(render(messages), add_special_tokens=False)["input_ids"]


def _encode_content_as_text(tokenizer, messages, render, specials) -> list[int]:
    """The rendered conversation's ids, special-token strings in message content as text: private-use placeholders
    while rendering (every special string left is the template's own), the text cut there as the tokenizer cuts, and
    each piece, strings back, tokenised with split_special_tokens=True. ValueError where either step changes them."""
    pattern = re.compile("|".join(map(re.escape, specials)))
    found = []  # found[k]: the special string placeholder k stands for
    def hide(match):
        found.append(match.group())
        return f"\ue000{len(found) - 1}\ue001"
    masked = render([{**m, "content": pattern.sub(hide, m["content"])} if isinstance(m.get("content"), str) else m
                     for m in messages])
    def unhide(text):
        return re.sub("\ue000(\\d+)\ue001", lambda m: found[int(m.group(1))], text)
    where = next(f"{m.get('role')!r} message content" for m in messages
                 if isinstance(m.get("content"), str) and pattern.search(m["content"]))
    if unhide(masked) != render(messages):
        raise ValueError(f"the chat template changes {where} holding the special token {found[0]!r}; it cannot be "
                         "kept as text: remove it from the data")
    pieces = pattern.split(masked)  # text, special, text, ..., text: the specials are the template's
    template_specials = tokenizer.convert_tokens_to_ids(pattern.findall(masked))
    def encode(unhide_content):
        ids = []
        for i, piece in enumerate(pieces):
            ids += tokenizer(unhide_content(piece), add_special_tokens=False,
                             split_special_tokens=True)["input_ids"] if piece else []
            ids += template_specials[i:i + 1]
        return ids
    if encode(lambda piece: piece) != tokenizer(masked, add_special_tokens=False)["input_ids"]:
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} does not tokenise text cut at its "
                         f"special tokens as it tokenises it whole (e.g. a SentencePiece prefix space); {where} "
                         f"holding the special token {found[0]!r} cannot be kept as text: remove it from the data")
    return encode(unhide)


def encode_prompt(tokenizer, prompt, chat_template=None) -> list[int]:
    """Token ids of `prompt` (str or messages) followed by the template's generation prompt."""
    return apply_template(tokenizer, as_messages(prompt), True, chat_template)


def encode_pair(tokenizer, prompt, response, chat_template=None, whole=False) -> tuple[list[int], list[int]]:
    """(prompt_ids, response_ids) of the templated conversation, the response (str or assistant messages) cut after
    its last EOS (as generated), or with `whole` all the template renders (ChatML's "\n" after it: as RMs read it)."""
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
    if whole:
        return prompt_ids, response_ids
    if eos is None:
        raise UserError("tokenizer has no eos_token: responses could not end with an end-of-turn token")
    if eos in response_ids:
        return prompt_ids, response_ids[:len(response_ids) - response_ids[::-1].index(eos)]
    return prompt_ids, response_ids + [eos]


def decode_response(tokenizer, ids) -> str:
    """Response text without special tokens (EOS, padding, role markers)."""
    return tokenizer.decode(ids, skip_special_tokens=True)
