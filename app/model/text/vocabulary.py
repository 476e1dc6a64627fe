"""A tekken tokenizer read into a `TokenVocab`: one pass over the vocabulary, once per model.

What parsing, detokenizing and grammar compiling read of the tokenizer comes from here; nothing else in the
server reads tokenizer internals.
"""

from __future__ import annotations

from typing import Any

from app.model.values import Syntax, TokenVocab


def read_vocab(tekken: Any) -> TokenVocab:
    """The bytes of every token id, the special ids and the call syntax of a tekken tokenizer."""
    from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy

    n_special = int(tekken.num_special_tokens)
    keep = SpecialTokenPolicy.KEEP
    names = {i: tekken.id_to_byte_piece(i, keep).decode("utf-8") for i in range(n_special)}
    pieces = tuple(b"" if i < n_special else bytes(tekken.id_to_byte_piece(i)) for i in range(tekken.n_words))
    return TokenVocab(
        pieces=pieces,
        special_names=names,
        eos_id=int(tekken.eos_id),
        bos_id=int(tekken.bos_id),
        syntax=syntax_of(str(tekken.version.value)),
        tool_calls_id=_special(names, "[TOOL_CALLS]"),
        args_id=_special(names, "[ARGS]"),
        call_id_id=_special(names, "[CALL_ID]"),
        encode=lambda text: list(tekken.encode(text, bos=False, eos=False)),
    )


def syntax_of(version: str) -> Syntax:
    number = int(version.lstrip("v") or 0)
    return "json" if number < 11 else "v11" if number < 13 else "v13"


def _special(names: dict[int, str], name: str) -> int | None:
    return next((i for i, n in names.items() if n == name), None)
