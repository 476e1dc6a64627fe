"""The two configurations of an eval: the baseline is the command's own serve flags; the candidate is the
baseline with `key=value` overrides (`--against dtype=bfloat16`), each key a `Settings` field, so any setting the
server has (today's or a later one) can be judged without this module knowing it.
"""

from __future__ import annotations

import difflib

from pydantic import ValidationError

from app.config import Settings


class OverrideError(ValueError):
    """An override that is not `key=value`, names no setting, or holds a value the setting refuses."""


def parse_overrides(items: list[str]) -> dict[str, str]:
    """`["dtype=bfloat16", "max-batch-size=4"]` -> `{"dtype": "bfloat16", "max_batch_size": "4"}` (kebab or
    snake case keys, as the flags are spelled); unknown keys refused with the nearest names."""
    fields = Settings.model_fields
    out: dict[str, str] = {}
    for item in items:
        key, eq, value = item.partition("=")
        name = key.strip().removeprefix("--").replace("-", "_")
        if not eq or not name:
            raise OverrideError(f"--against takes key=value (a setting and its value), got {item!r}")
        if name not in fields:
            near = difflib.get_close_matches(name, list(fields), n=3)
            hint = f"; did you mean {', '.join(near)}?" if near else ""
            raise OverrideError(f"--against {item!r}: there is no setting {name!r}{hint}")
        out[name] = value
    return out


def candidate(baseline: Settings, overrides: dict[str, str]) -> Settings:
    """The baseline with `overrides`, validated as the server would (a bad value or a broken cross-field rule
    is an `OverrideError`, said in pydantic's words)."""
    values = {**baseline.model_dump(), **overrides}
    try:
        return Settings(**values)
    except ValidationError as exc:
        raise OverrideError(f"--against {overrides}: {exc}") from None
