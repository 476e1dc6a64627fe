"""OpenAI's published OpenAPI document as JSON Schemas, so tests can hold raw bodies and SSE events to it.

The spec is not part of the repository (3 MB, OpenAI's to publish): its path comes from the
environment variable named by `SPEC_ENV`. Where it is unset or missing, tests that need it are
skipped with that name in the reason; CI sets it, and fails where it cannot (see .ci/run).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

SPEC_ENV = "OPENAI_OPENAPI_SPEC"
"""Not VOXTRAL_*: conftest scrubs those from every test's environment."""


@functools.cache
def _load(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        spec: dict[str, Any] = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    return {"components": {"schemas": json_schema(spec["components"]["schemas"])}}


def load_spec() -> dict[str, Any]:
    """The spec's components as JSON Schema, or a skip that says how to provide it."""
    path = os.environ.get(SPEC_ENV, "")
    if not path or not Path(path).is_file():
        pytest.skip(f"set {SPEC_ENV} to the path of OpenAI's openapi.yaml to check bodies against it")
    return _load(path)


def json_schema(node: Any) -> Any:
    """OpenAPI's `nullable: true` (3.0's "or null", still used in this 3.1 document) as JSON Schema."""
    if isinstance(node, list):
        return [json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: json_schema(value) for key, value in node.items() if key != "nullable"}
    if not node.get("nullable"):
        return out
    if "enum" in out and None not in out["enum"]:
        out["enum"] = [*out["enum"], None]
    if isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
        return out
    return {"anyOf": [out, {"type": "null"}]}


def check(spec: dict[str, Any], name: str, instance: Any) -> None:
    """Validate against components/schemas/<name>, resolving $refs inside the spec."""
    schema = {"$ref": f"#/components/schemas/{name}", "components": spec["components"]}
    jsonschema.Draft202012Validator(schema).validate(instance)
