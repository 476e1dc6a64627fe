"""The README stays true: its settings table is what the code has, its endpoint table what /openapi.json
lists, and it gives the two set-up commands."""

from __future__ import annotations

import re
from pathlib import Path

from app.config import Settings, settings_markdown
from app.wiring import create_app

README = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")


def test_settings_table_matches_the_code() -> None:
    block = README.split("<!-- settings:start -->")[1].split("<!-- settings:end -->")[0].strip()
    assert block == settings_markdown(), "regenerate with: python -m app.config"


def test_two_setup_commands_are_documented() -> None:
    assert "make serve" in README and "make test" in README


def readme_endpoints() -> set[tuple[str, str]]:
    """(method, path) of every row of the README's endpoint table, path parameters written `{}`."""
    table = README.split("## Endpoints")[1].split("\n### ")[0]
    rows = [line.split("|")[1] for line in table.splitlines() if line.startswith("| `")]
    found = {m.groups() for row in rows for m in re.finditer(r"`(GET|POST|PUT|DELETE|PATCH) (/[^`]*)`", row)}
    return {(method, re.sub(r"\{[^}]*\}", "{}", path)) for method, path in found}


def test_the_endpoint_table_and_openapi_json_list_the_same_routes() -> None:
    document = create_app(Settings(model="tiny")).openapi()  # the document /openapi.json serves; no model loaded
    served = {
        (method.upper(), re.sub(r"\{[^}]*\}", "{}", path))
        for path, operations in document["paths"].items()
        for method in operations
    }
    assert readme_endpoints() == served
