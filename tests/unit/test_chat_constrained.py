"""Grammar-constrained decoding: whatever a model picks among the allowed tokens, the output is a call to an
allowed function with schema-valid arguments (or schema-valid JSON content), then EOS."""

from __future__ import annotations

import json
import random
from typing import Any

import jsonschema
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from app.errors import GrammarError
from app.model.compute.masks import unpack
from app.model.text.callstream import chat_output
from app.model.text.constrained import Constrainer, TriggeredConstraint
from app.model.values import MAX_PARALLEL_CALLS, FunctionSpec, OutputSpec
from tests.support.tekken_vocab import VERSIONS, text_ids, vocab

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
        "unit": {"enum": ["C", "F"]},
    },
    "required": ["city", "unit"],
}
ROUTE = {
    "type": "object",
    "properties": {
        "stops": {"type": "array", "items": {"type": "string", "enum": ["a", "b"]}, "minItems": 1, "maxItems": 3},
        "fast": {"type": "boolean"},
        "via": {
            "anyOf": [
                {"type": "null"},
                {"type": "object", "properties": {"x": {"type": "number"}}, "additionalProperties": False},
            ]
        },
    },
    "required": ["stops", "fast"],
}
FUNCTIONS = (FunctionSpec("get_weather", WEATHER), FunctionSpec("plan_route", ROUTE))
SCHEMAS = {f.name: f.parameters for f in FUNCTIONS}


def constrainer(version: str) -> Constrainer:
    return _CONSTRAINERS.setdefault(version, Constrainer(vocab(version)))


_CONSTRAINERS: dict[str, Constrainer] = {}


def walk(constraint: Any, rng: random.Random, eos: int, limit: int = 3000) -> list[int]:
    """A model that picks uniformly among the allowed tokens (EOS, when allowed, half the time)."""
    ids: list[int] = []
    for _ in range(limit):
        mask = constraint.allowed()
        allowed = mask.nonzero().view(-1).tolist()
        token = eos if eos in allowed and rng.random() < 0.5 else rng.choice(allowed)
        constraint.advance(token)
        if token == eos:
            return ids
        ids.append(token)
    raise AssertionError(f"no EOS after {limit} tokens")


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(VERSIONS), st.integers(0, 2**32), st.booleans())
def test_required_always_gives_valid_calls(version: str, seed: int, parallel: bool) -> None:
    spec = OutputSpec(FUNCTIONS, "required", MAX_PARALLEL_CALLS if parallel else 1)
    factory = constrainer(version).factory(spec)
    assert factory is not None
    ids = walk(factory(), random.Random(seed), vocab(version).eos_id)
    output = chat_output(ids, "stop", vocab(version), SCHEMAS.keys(), ())
    assert output.finish_reason == "tool_calls" and output.content is None, vocab(version).text(ids, True)
    assert 1 <= len(output.calls) <= (MAX_PARALLEL_CALLS if parallel else 1)
    for call in output.calls:
        jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])


@pytest.mark.parametrize("version", VERSIONS)
def test_named_function_is_forced_to_its_prefix(version: str) -> None:
    v = vocab(version)
    constraint = constrainer(version).factory(OutputSpec(FUNCTIONS[1:], "required"))()  # type: ignore[misc]
    forced = []
    while int(constraint.allowed().sum()) == 1:
        forced.append(int(constraint.allowed().nonzero()[0]))
        constraint.advance(forced[-1])
    assert forced[0] == v.tool_calls_id and "plan_route" in v.text(forced)
    ids = forced + walk(constraint, random.Random(1), v.eos_id)
    assert [c.name for c in chat_output(ids, "stop", v, {"plan_route"}, ()).calls] == ["plan_route"]


def test_after_the_last_call_only_eos_is_allowed() -> None:
    v = vocab("v11")
    constraint = constrainer("v11").factory(OutputSpec(FUNCTIONS[1:], "required"))()  # type: ignore[misc]
    for token in [9, *text_ids("v11", "plan_route"), 32, *text_ids("v11", '{"stops": ["a"], "fast": true}')]:
        assert constraint.allowed()[token]
        constraint.advance(token)
    assert constraint.allowed().nonzero().view(-1).tolist() == [v.eos_id]


def test_special_tokens_never_inside_arguments() -> None:
    v = vocab("v11")
    constraint = constrainer("v11").factory(OutputSpec(FUNCTIONS[:1], "required"))()  # type: ignore[misc]
    for token in [9, *text_ids("v11", "get_weather"), 32, *text_ids("v11", '{"city": "Pa')]:
        constraint.advance(token)
    allowed = constraint.allowed()
    assert not any(allowed[i] for i in v.special_names)
    assert allowed[text_ids("v11", "r")[0]]


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(VERSIONS), st.integers(0, 2**32))
def test_json_schema_content_always_validates(version: str, seed: int) -> None:
    v = vocab(version)
    constraint = constrainer(version).factory(OutputSpec(json_schema=ROUTE))()  # type: ignore[misc]
    ids = walk(constraint, random.Random(seed), v.eos_id)
    jsonschema.validate(json.loads(v.text(ids)), ROUTE)


def test_auto_is_free_until_the_model_starts_a_call() -> None:
    v = vocab("v11")
    factory = constrainer("v11").factory(OutputSpec(FUNCTIONS, "auto", MAX_PARALLEL_CALLS))
    assert factory is not None
    constraint = factory()
    assert isinstance(constraint, TriggeredConstraint)
    for token in text_ids("v11", "Sure, "):
        assert constraint.allowed() is None
        constraint.advance(token)
    constraint.advance(v.tool_calls_id)  # type: ignore[arg-type]
    mask = constraint.allowed()
    assert mask is not None and not mask[v.eos_id] and mask[text_ids("v11", "get_weather")[0]]


def test_auto_with_json_format_is_json_or_calls() -> None:
    v = vocab("v13")
    constraint = constrainer("v13").factory(OutputSpec(FUNCTIONS, "auto", 1, {"type": "object"}))()  # type: ignore[misc]
    allowed = set(constraint.allowed().nonzero().view(-1).tolist())
    assert v.tool_calls_id in allowed and text_ids("v13", "{")[0] in allowed and v.eos_id not in allowed


def test_required_calls_win_over_a_json_format() -> None:
    v = vocab("v11")
    constraint = constrainer("v11").factory(OutputSpec(FUNCTIONS, "required", 1, {"type": "object"}))()  # type: ignore[misc]
    assert constraint.allowed().nonzero().view(-1).tolist() == [v.tool_calls_id]


def test_nothing_to_constrain() -> None:
    assert constrainer("v11").factory(OutputSpec()) is None
    assert constrainer("v11").factory(OutputSpec(FUNCTIONS, "none")) is None


@pytest.mark.parametrize(
    "schema",
    [{"type": "objekt"}, {"type": "string", "pattern": "(("}, {"$ref": "#/nowhere"}],
)
def test_schemas_llguidance_refuses_raise_grammar_error(schema: dict[str, Any]) -> None:
    with pytest.raises(GrammarError):
        constrainer("v11").factory(OutputSpec(json_schema=schema))


def test_mask_is_padded_to_the_models_vocabulary() -> None:
    """A model whose logits are wider than its tokenizer: the ids past the tokenizer are never allowed."""
    factory = constrainer("v11").factory(OutputSpec(json_schema={"type": "object"}))
    assert factory is not None
    matcher = factory().matcher
    bits = torch.from_numpy(np.frombuffer(matcher.compute_bitmask(), dtype=np.int32).copy()).unsqueeze(0)
    mask = unpack(bits, 3072)
    assert mask.shape == (1, 3072) and mask.dtype == torch.bool and not mask[0, 3000:].any()
    assert torch.equal(mask[0, :3000], factory().allowed())  # type: ignore[attr-defined]
