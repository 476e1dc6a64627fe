"""Plain values that cross the model's facade: the vocabulary as data, and what a chat output must look like.

A leaf of `app.model`: it imports no other model module, so the serving layer may name these types
while it reaches the model's two halves only through `app.model.runtime`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

MAX_PARALLEL_CALLS = 8
"""Most calls in one turn when parallel calls are allowed; bounds a model that would call forever."""

Syntax = Literal["json", "v11", "v13"]
"""How the tokenizer writes a tool call (app/model/text/toolcalls.py shows the layouts)."""


@dataclass(frozen=True)
class TokenVocab:
    """A tekken tokenizer as plain data: the bytes of every token id, the special ids, the call syntax.
    Built once per model by app/model/text/vocabulary.py; nothing else reads tokenizer internals."""

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


@dataclass(frozen=True)
class FunctionSpec:
    name: str
    parameters: dict[str, Any]


@dataclass(frozen=True)
class OutputSpec:
    """What the output of one chat request must look like."""

    functions: tuple[FunctionSpec, ...] = ()
    tool_mode: Literal["none", "auto", "required"] = "none"
    """auto: free text, but a call, once started, is well formed; required: only calls."""
    max_calls: int = 1
    json_schema: dict[str, Any] | None = None
    """response_format: the content is one JSON value matching this schema."""
