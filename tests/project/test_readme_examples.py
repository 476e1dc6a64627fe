"""Every ```bash and ```python block of the README runs as written against a live server, so it cannot drift.

The server is the session's real app on a free port with the tiny model (`server` in tests/conftest.py), as
`make serve` runs it: model id `tiny`, no API key. Each block runs from the repository root, so the paths it
names are the clone's own files; its one change is the server's address: `http://127.0.0.1:8000` (or
`localhost:8000`) becomes the test server's base URL. A block passes when it exits 0 and prints something that
is not an error (JSON output must not be OpenAI's `{"error": ...}`, which curl prints with exit code 0).

A block that must not run here (it installs, starts a server, needs a GPU or Docker) carries a visible marker on
the line above its fence, `<!-- not run: why -->`; it is reported as skipped with that reason (pytest's -ra). An
unmarked bash block that installs or starts something (pip, make, docker, voxtral-server, ...) fails unrun.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.server import RunningServer

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCUMENTED_URLS = ("http://127.0.0.1:8000", "http://localhost:8000")
NOT_RUN = re.compile(r"^\s*<!--\s*not run:\s*(?P<why>.+?)\s*-->\s*$")
# Commands that install, build or start servers: a block using one must carry a `not run` marker, so an unmarked
# one fails here before it can change the machine running the tests.
SETS_UP = re.compile(
    r"(?:^|&&|\|\||;|\|)\s*(?:sudo\s+)?(?:\S+/)?"
    r"(?:pip3?|python3?(?:\.\d+)? -m (?:pip|venv)|make|docker|kubectl|apt-get|apt|voxtral-server)\b",
    re.M,
)
FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>bash|python)\s*$")
TIMEOUT_S = 120


@dataclass(frozen=True)
class Block:
    """One fenced block: its language, first line number (1-based, the fence's), code and skip reason."""

    lang: str
    line: int
    code: str
    not_run: str | None

    @property
    def label(self) -> str:
        return f"README.md:{self.line}:{self.lang}"


def blocks(text: str) -> list[Block]:
    """The bash and python blocks in order, each with the `not run` reason of the line above its fence."""
    lines = text.splitlines()
    found: list[Block] = []
    at = 0
    while at < len(lines):
        fence = FENCE.match(lines[at])
        if fence is None:
            at += 1
            continue
        end = next(i for i in range(at + 1, len(lines)) if lines[i].strip().startswith("```"))
        marker = NOT_RUN.match(lines[at - 1]) if at > 0 else None
        code = "\n".join(line.removeprefix(fence["indent"]) for line in lines[at + 1 : end]) + "\n"
        found.append(Block(fence["lang"], at + 1, code, marker["why"] if marker else None))
        at = end + 1
    return found


BLOCKS = blocks(README.read_text(encoding="utf-8"))


def run(block: Block, base_url: str) -> subprocess.CompletedProcess[str]:
    code = block.code
    for url in DOCUMENTED_URLS:
        code = code.replace(url, base_url)
    command = [sys.executable, "-c", code] if block.lang == "python" else ["bash", "-eo", "pipefail", "-c", code]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)


def assert_sane(block: Block, result: subprocess.CompletedProcess[str]) -> None:
    said = f"{block.label} exited {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    assert result.returncode == 0, said
    assert result.stdout.strip(), f"{block.label} printed nothing\n{said}"
    try:
        answer = json.loads(result.stdout)
    except ValueError:
        return  # plain text (a transcript): any is fine from random weights
    assert not (isinstance(answer, dict) and "error" in answer), said


@pytest.mark.parametrize("block", BLOCKS, ids=[b.label for b in BLOCKS])
def test_readme_block_runs(block: Block, server: RunningServer) -> None:
    if block.not_run is not None:
        pytest.skip(f"{block.label} marked not run: {block.not_run}")
    if block.lang == "bash" and (setup := SETS_UP.search(block.code)):
        pytest.fail(f"{block.label} runs {setup[0].strip()!r}: put `<!-- not run: why -->` above its fence")
    if block.lang == "bash" and re.search(r"\bcurl\b", block.code) and shutil.which("curl") is None:
        pytest.skip(f"{block.label} uses curl, which is not installed")
    assert_sane(block, run(block, server.base_url))


def test_the_readme_has_examples_that_run() -> None:
    """Guards the extractor: the quick start's curl and SDK calls and the realtime client are found and run."""
    runnable = [b for b in BLOCKS if b.not_run is None]
    assert {b.lang for b in runnable} == {"bash", "python"}
    assert len(runnable) >= 3
    assert any("realtime.connect" in b.code for b in runnable)


def test_every_not_run_marker_sits_above_a_block() -> None:
    """A marker one line off would silently run (or stop skipping) a block: each must be right above a fence."""
    markers = sum(1 for line in README.read_text(encoding="utf-8").splitlines() if NOT_RUN.match(line))
    assert markers == sum(1 for b in BLOCKS if b.not_run is not None)
