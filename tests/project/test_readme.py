"""The README stays true: its settings table is what the code has, and it gives the two set-up commands."""

from __future__ import annotations

from pathlib import Path

from app.config import settings_markdown

README = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")


def test_settings_table_matches_the_code() -> None:
    block = README.split("<!-- settings:start -->")[1].split("<!-- settings:end -->")[0].strip()
    assert block == settings_markdown(), "regenerate with: python -m app.config"


def test_two_setup_commands_are_documented() -> None:
    assert "make serve" in README and "make test" in README
