"""A tekken tokenizer as plain data: the bytes of every token id, the special ids, the call syntax.

What parsing, detokenizing and grammar compiling read of the tokenizer, built once per model in one pass
over the vocabulary (`from_tekken`); nothing else in the server reads tokenizer internals.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

Syntax = Literal["json", "v11", "v13"]
"""How the tokenizer writes a tool call (app/model/text/toolcalls.py shows the layouts)."""


@dataclass(frozen=True)
class TokenVocab:
    """What parsing and constraining need of a tekken tokenizer: the bytes of every token id."""

    pieces: tuple[bytes, ...]
    """Bytes of each regular token; b"" for special tokens."""
    special_names: dict[int, str]
    eos_id: int
    bos_id: int
    syntax: Syntax
    tool_calls_id: int | None
    args_id: int | None
    call_id_id: int | None
    encode: Callable[[str], list[int]]

    @classmethod
    def from_tekken(cls, tekken: Any) -> TokenVocab:
        from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy

        n_special = int(tekken.num_special_tokens)
        keep = SpecialTokenPolicy.KEEP
        names = {i: tekken.id_to_byte_piece(i, keep).decode("utf-8") for i in range(n_special)}
        pieces = tuple(b"" if i < n_special else bytes(tekken.id_to_byte_piece(i)) for i in range(tekken.n_words))
        return cls(
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

    @property
    def size(self) -> int:
        return len(self.pieces)

    @property
    def can_call(self) -> bool:
        """The tokenizer has the markers its call syntax needs."""
        return self.tool_calls_id is not None and (self.syntax == "json" or self.args_id is not None)

    def is_special(self, token: int) -> bool:
        return token in self.special_names

    def text(self, ids: Sequence[int], keep_special: bool = False) -> str:
        """Like the tokenizer's decode; `keep_special` writes markers as their names ("[TOOL_CALLS]")."""
        return self.bytes_of(ids, keep_special).decode("utf-8", errors="replace")

    def piece(self, token: int) -> bytes:
        """One token's bytes; a marker's name ("[TOOL_CALLS]") for a special token."""
        return self._bytes(token, True)

    def bytes_of(self, ids: Sequence[int], keep_special: bool = False) -> bytes:
        return b"".join(self._bytes(t, keep_special) for t in ids)

    def _bytes(self, token: int, keep_special: bool) -> bytes:
        if token in self.special_names:
            return self.special_names[token].encode() if keep_special else b""
        return self.pieces[token] if 0 <= token < len(self.pieces) else b""


def syntax_of(version: str) -> Syntax:
    number = int(version.lstrip("v") or 0)
    return "json" if number < 11 else "v11" if number < 13 else "v13"


def _special(names: dict[int, str], name: str) -> int | None:
    return next((i for i, n in names.items() if n == name), None)
