"""Prompts to token ids, keeping user text as text.

A chat template renders role markers (``<|im_start|>``, ``<|im_end|>``, ...) around each message. Tokenizing the
rendered string as a whole would also turn marker-like text *inside* a message into the real special tokens, so a
user could close their own turn and write the assistant's. Here only the template's own text may produce special
tokens: each message's content is tokenized with special tokens split into plain text (llama.cpp's
``parse_special=false`` for user text). ``raw_special=True`` restores whole-string tokenization.
"""

from __future__ import annotations

from typing import Any, Sequence

from propd.errors import PropdError

Message = dict[str, str]  # {"role": "user" | "assistant" | "system", "content": str}


def _sentinel(i: int) -> str:
    return f"PROPDMSG{i}CONTENTQZX"


def _template_pieces(tok: Any, messages: Sequence[Message]) -> tuple[list[str], list[str]]:
    """The template's text between the messages' contents (n+1 pieces), and the contents as the template renders
    them (a template may trim them)."""
    marked = [dict(m, content=_sentinel(i)) for i, m in enumerate(messages)]
    rendered = tok.apply_chat_template(marked, tokenize=False, add_generation_prompt=True)
    pieces = []
    for i in range(len(messages)):
        before, found, rendered = rendered.partition(_sentinel(i))
        if not found or _sentinel(i) in rendered:
            raise PropdError("the tokenizer's chat template does not render each message's content once; "
                             "pass raw_special=True (--raw-special) to use it as it is")
        pieces.append(before)
    pieces.append(rendered)
    full = tok.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    for transform in (lambda c: c, str.strip):
        contents = [transform(m["content"]) for m in messages]
        if "".join(p + c for p, c in zip(pieces, contents + [""])) == full:
            return pieces, contents
    return pieces, [m["content"] for m in messages]  # an unusual transform: keep the content as the user gave it


def encode_chat(tok: Any, messages: Sequence[Message], raw_special: bool = False) -> list[int]:
    """Token ids of a conversation through the tokenizer's chat template, ending with the assistant's turn."""
    if raw_special:
        text = tok.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        return list(tok(text, add_special_tokens=False)["input_ids"])
    pieces, contents = _template_pieces(tok, messages)
    ids: list[int] = []
    for piece, content in zip(pieces, contents + [None]):
        if piece:
            ids += tok(piece, add_special_tokens=False)["input_ids"]
        if content:
            ids += tok(content, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return ids


def user_turn_start(tok: Any) -> list[int]:
    """Token ids of the chat template's text before a first user message's content (its default system turn, if any,
    and the user's role marker): what a model continues to write a user request itself (Magpie)."""
    pieces, _ = _template_pieces(tok, [{"role": "user", "content": "x"}])
    return list(tok(pieces[0], add_special_tokens=False)["input_ids"])


def encode_plain(tok: Any, text: str, raw_special: bool = False) -> list[int]:
    """Token ids of raw text (no template), with the tokenizer's own BOS/EOS framing; marker-like text stays text
    unless ``raw_special``."""
    if raw_special:
        return list(tok(text)["input_ids"])
    return list(tok(text, split_special_tokens=True)["input_ids"])


def conversation(turns: Sequence[str], answers: Sequence[str]) -> list[Message]:
    """The messages of a multi-turn question: user turn 1, the model's answer 1, ..., user turn n."""
    msgs: list[Message] = []
    for i, turn in enumerate(turns):
        msgs.append({"role": "user", "content": turn})
        if i < len(answers):
            msgs.append({"role": "assistant", "content": answers[i]})
    return msgs
