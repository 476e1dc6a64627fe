"""Grammar-constrained decoding with llguidance: forced tool calls and JSON-schema output.

A request's output spec becomes one llguidance grammar (Lark for the Mistral call markers, JSON
schemas for the arguments or the content). The grammar is compiled once into a template matcher,
cached by its text; each row gets a cheap copy in the worker thread. Per step a row pays one mask
computation in llguidance (Rust, over a token trie) and one byte -> bool conversion. Special tokens
exist in llguidance only as `<[id]>`, so they can never appear inside JSON. Once the grammar is
complete the only token left is EOS, so a constrained row stops by itself. Object properties come
out in the order the schema lists them (llguidance's rule), so schemas are passed on unsorted.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from functools import cached_property
from typing import Any

import numpy as np
import torch

from app.errors import GrammarError, first_line
from app.model.text.closing import Closer, ClosingPolicy
from app.model.values import OutputSpec, TokenVocab
from app.types import Constraint

log = logging.getLogger(__name__)

_CACHE_SIZE = 64
_ENCODED_SIZE = 4096
_JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
"""Python's json.dumps layout, which Mistral's tokenizer renders arguments with: in distribution."""
_OPEN_KEYWORDS = ("additionalProperties", "patternProperties", "unevaluatedProperties", "allOf", "anyOf", "oneOf")


class GrammarConstraint:
    """One row's matcher: the sampler fills its mask (with every other row's) and applies it."""

    def __init__(self, matcher: Any, vocab_size: int, closer: Closer | None = None) -> None:
        self._matcher = matcher
        self._size = vocab_size
        self._closer = closer

    @property
    def matcher(self) -> Any:
        return self._matcher

    @property
    def vocab_size(self) -> int:
        return self._size

    def allowed(self) -> torch.Tensor:
        """This row's mask alone, as booleans (tests; the sampler fills masks in batches). A matcher in
        its error state (which sampling from its masks cannot reach) allows only EOS, ending the row."""
        bits = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8)
        return torch.from_numpy(np.unpackbits(bits, bitorder="little")[: self._size].astype(np.bool_))

    @property
    def eos(self) -> int:
        assert self._closer is not None
        return self._closer.policy.eos

    def shortest(self) -> int | None:
        """Tokens (EOS included) the closing walk takes from here."""
        return self._closer.policy.distance(self._matcher) if self._closer is not None else None

    def settle(self, token: int, remaining: int) -> int:
        if self._closer is None or self._matcher.is_stopped():
            return token
        return self._closer.settle(self._matcher, token, remaining)

    def advance(self, token: int) -> None:
        if not self._matcher.consume_token(token):
            if self._closer is not None:
                self._closer.forget()
            log.warning(
                "constrained row took a token its grammar refuses: %s",
                first_line(self._matcher.get_error(), "unknown error"),
            )


class TriggeredConstraint:
    """Free text until `trigger` ([TOOL_CALLS]) is sampled; from there on, the inner grammar.

    The free part costs nothing per step (no mask), so `tool_choice=auto` only pays once a call starts.
    """

    def __init__(self, trigger: int, start: Callable[[], GrammarConstraint], vocab_size: int) -> None:
        self._trigger = trigger
        self._start = start
        self._inner: GrammarConstraint | None = None
        self._size = vocab_size

    @property
    def matcher(self) -> Any:
        return self._inner.matcher if self._inner is not None else None

    @property
    def vocab_size(self) -> int:
        return self._size

    def allowed(self) -> torch.Tensor | None:
        return self._inner.allowed() if self._inner is not None else None

    def settle(self, token: int, remaining: int) -> int:
        """A call the remaining tokens cannot complete is not started: the turn ends (EOS) instead."""
        if self._inner is not None:
            return self._inner.settle(token, remaining)
        if token != self._trigger:
            return token
        inner = self._start()
        shortest = inner.shortest()
        if shortest is None or shortest > remaining:
            return inner.eos
        self._inner = inner
        return token

    def advance(self, token: int) -> None:
        if self._inner is None and token == self._trigger:  # (settle made it already, in the sampler)
            self._inner = self._start()
        if self._inner is not None:
            self._inner.advance(token)


class Constrainer:
    """Compiles output specs into per-row constraint factories for one tokenizer."""

    def __init__(self, vocab: TokenVocab) -> None:
        self.vocab = vocab
        self._lock = threading.Lock()
        self._templates: OrderedDict[str, Any] = OrderedDict()

    @cached_property
    def tokenizer(self) -> Any:
        import llguidance

        return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Wrapper(self.vocab)))

    def factory(self, spec: OutputSpec) -> Callable[[], Constraint] | None:
        """None when the spec constrains nothing. Raises GrammarError for a schema llguidance refuses."""
        calls = bool(spec.functions) and spec.tool_mode != "none" and self.vocab.can_call
        if not calls:
            spec = OutputSpec(json_schema=spec.json_schema)
        elif spec.tool_mode == "required":  # calls only: response_format has no say
            spec = OutputSpec(spec.functions, "required", spec.max_calls)
        if spec.tool_mode == "none" and spec.json_schema is None:
            return None
        # auto without a format: free text until a call starts; lenient, as the model decides anyway
        free_text = spec.tool_mode == "auto" and spec.json_schema is None
        template = self._template(build_grammar(spec, self.vocab, lenient=free_text))
        size, policy = self.vocab.size, self.policy

        def start() -> GrammarConstraint:
            return GrammarConstraint(template.deep_copy(), size, Closer(policy))

        trigger = self.vocab.tool_calls_id
        if free_text and trigger is not None:
            return lambda: TriggeredConstraint(trigger, start, size)
        return start

    @cached_property
    def policy(self) -> ClosingPolicy:
        return ClosingPolicy(self.vocab)

    def shortest(self, spec: OutputSpec) -> int | None:
        """Fewest tokens (EOS included) a forced output of `spec` is guaranteed to complete in; None when
        the output is not forced (free text may end at once). Raises GrammarError as `factory` does."""
        forced = spec.json_schema is not None or (spec.tool_mode == "required" and bool(spec.functions))
        factory = self.factory(spec) if forced else None
        if factory is None:
            return None
        constraint = factory()
        if not isinstance(constraint, GrammarConstraint):
            return None
        return self.policy.distance(constraint.matcher)

    def _template(self, grammar: str) -> Any:
        with self._lock:
            if grammar in self._templates:
                self._templates.move_to_end(grammar)
                return self._templates[grammar]
        import llguidance

        tokenizer = self.tokenizer
        try:
            is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
            template = None if is_error else llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        except (ValueError, RuntimeError) as exc:
            is_error, messages = True, [str(exc)]
        if template is None or is_error:
            raise GrammarError(
                first_line(messages[0], "unknown error") if messages else "the schema could not be compiled"
            )
        with self._lock:
            self._templates[grammar] = template
            while len(self._templates) > _CACHE_SIZE:
                self._templates.popitem(last=False)
        return template


class _Wrapper:
    """The shape `llguidance.TokenizerWrapper` reads: token bytes, specials, EOS and an encoder."""

    def __init__(self, vocab: TokenVocab) -> None:
        self.eos_token_id = vocab.eos_id
        self.bos_token_id = vocab.bos_id
        self.tokens = [
            vocab.special_names[i].encode() if vocab.is_special(i) else p for i, p in enumerate(vocab.pieces)
        ]
        self.special_token_ids = sorted(vocab.special_names)
        self._encode = vocab.encode
        self._encoded: OrderedDict[str | bytes, tuple[int, ...]] = OrderedDict()

    def __call__(self, text: str | bytes) -> list[int]:
        """Remembered: llguidance tokenizes the same forced bytes (`"}`, `, "`) at every closing walk's step."""
        ids = self._encoded.get(text)
        if ids is None:
            ids = tuple(self._encode(text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text))
            self._encoded[text] = ids
            if len(self._encoded) > _ENCODED_SIZE:
                self._encoded.popitem(last=False)
        return list(ids)


# -- grammars ----------------------------------------------------------------------------------------
def build_grammar(spec: OutputSpec, vocab: TokenVocab, lenient: bool = False) -> str:
    """llguidance's JSON grammar list: one Lark grammar plus one JSON-schema grammar per schema."""
    schemas: dict[str, dict[str, Any]] = {}
    lines: list[str] = []
    starts: list[str] = []
    if spec.json_schema is not None:
        schemas["content"] = spec.json_schema
        lines.append("content: @content")
        starts.append("content")
    if spec.functions and spec.tool_mode != "none":
        for i, function in enumerate(spec.functions):
            schemas[f"args{i}"] = function.parameters
        lines.extend(_call_rules(spec, vocab))
        starts.append("calls")
    lark = "\n".join([f"start: {' | '.join(starts)}", *lines])
    entries: list[dict[str, Any]] = [{"lark_grammar": lark}]
    entries += [{"name": name, "json_schema": _styled(schema, lenient)} for name, schema in schemas.items()]
    return json.dumps({"grammars": entries})


def _call_rules(spec: OutputSpec, vocab: TokenVocab) -> list[str]:
    assert vocab.tool_calls_id is not None
    marker = f"<[{vocab.tool_calls_id}]>"
    lines = ["CALL_ID: /[a-zA-Z0-9]{9}/", "call: " + " | ".join(f"f{i}" for i in range(len(spec.functions)))]
    if vocab.syntax == "json":
        items = _repeat("call", spec.max_calls, sep='", "')
        lines.append(f'calls: {marker} "[" {items} "]"')
        for i, function in enumerate(spec.functions):
            head = json.dumps(f'{{"name": "{function.name}", "arguments": ')
            tail = '(", \\"id\\": \\"" CALL_ID "\\"")? "}"'
            lines.append(f"f{i}: {head} @args{i} {tail}")
        return lines
    lines.append(f"calls: {_repeat('one_call', spec.max_calls)}")
    lines.append(f"one_call: {marker} call")
    call_id = f"(<[{vocab.call_id_id}]> CALL_ID)? " if vocab.syntax == "v11" and vocab.call_id_id is not None else ""
    for i, function in enumerate(spec.functions):
        lines.append(f"f{i}: {json.dumps(function.name)} {call_id}<[{vocab.args_id}]> @args{i}")
    return lines


def _repeat(rule: str, most: int, sep: str = "") -> str:
    """`rule` one to `most` times: rule (sep rule (sep rule)?)?"""
    glue = f"{sep} " if sep else ""
    text = rule
    for _ in range(most - 1):
        text = f"{rule} ({glue}{text})?"
    return text


def _styled(schema: dict[str, Any], lenient: bool) -> dict[str, Any]:
    """The schema with Python's JSON layout, and closed to undeclared properties where it names them:
    the output still validates against the original, and a weak model cannot ramble on in extra keys."""
    styled = dict(schema)
    if styled.get("type") == "object" and "properties" in styled and not any(k in styled for k in _OPEN_KEYWORDS):
        styled["additionalProperties"] = False
    styled["x-guidance"] = {**_JSON_STYLE, "lenient": lenient}
    return styled
