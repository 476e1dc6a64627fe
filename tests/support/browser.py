"""A real Chromium (Debian's `chromium` package) under Playwright for the playground tests: a microphone fed
from a WAV made here, every request the page makes recorded, screenshots saved where the README says.

No browser is downloaded (`playwright install` needs the network): the tests use the system's Chromium and
skip, saying why, where it is missing; in CI (`CI=true`) a missing Chromium fails instead, as `.ci/run`
installs it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest

from tests.support.audio_fixtures import jfk_samples, wav

SCREENSHOTS = Path(__file__).resolve().parents[1] / "artifacts" / "screenshots"
"""Screenshots of each task at phone and desktop width (git-ignored; CI keeps them as artefacts)."""
WIDTHS = {"phone": (390, 844), "desktop": (1280, 800)}
CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)


def require_chromium() -> str:
    if CHROMIUM is None:
        reason = "Chromium is not installed (apt-get install chromium): the playground's browser tests need it"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI: {reason}")
        pytest.skip(reason)
    return CHROMIUM


def speech_wav(path: Path) -> Path:
    """JFK's sentence between silences: the fake microphone loops it, so live sessions hear utterances that
    start and stop (server VAD needs the silence) and recordings hold speech."""
    silence = np.zeros(16000, np.float32)
    wav_bytes = wav(np.concatenate([silence, jfk_samples(), silence, silence]))
    path.write_bytes(wav_bytes)
    return path


@contextmanager
def chromium(microphone: Path) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    args = [
        "--use-fake-ui-for-media-stream",  # grant the microphone without a prompt
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={microphone}",
        "--autoplay-policy=no-user-gesture-required",
    ]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=require_chromium(), args=args, headless=True)
        try:
            yield browser
        finally:
            browser.close()


class Page:
    """One tab on the playground; `requests` holds every URL it asked for, `foreign` those off the origin."""

    def __init__(self, browser: Any, base_url: str, width: str = "desktop") -> None:
        w, h = WIDTHS[width]
        self.context = browser.new_context(viewport={"width": w, "height": h}, base_url=base_url)
        self.context.grant_permissions(["microphone"], origin=base_url)
        self.origin = urlsplit(base_url)[:2]
        self.requests: list[str] = []
        self.page = self.context.new_page()
        self.page.on("request", lambda request: self.requests.append(request.url))
        self.page.on("websocket", lambda ws: self.requests.append(ws.url))
        self.console: list[str] = []
        self.page.on("pageerror", lambda error: self.console.append(str(error)))
        self.page.goto(base_url)

    @property
    def foreign(self) -> list[str]:
        def same_origin(url: str) -> bool:
            scheme, netloc = urlsplit(url)[:2]
            return (netloc == self.origin[1] and scheme in ("http", "ws")) or scheme in ("blob", "data")

        return [url for url in self.requests if not same_origin(url)]

    def screenshot(self, name: str) -> None:
        """The page at both widths (the viewport changes; the state stays)."""
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        for width, (w, h) in WIDTHS.items():
            self.page.set_viewport_size({"width": w, "height": h})
            self.page.screenshot(path=SCREENSHOTS / f"{name}-{width}.png", full_page=True)
            overflow = self.page.evaluate("document.documentElement.scrollWidth")
            assert overflow <= w, f"{name}: the page is {overflow} px wide in a {w} px window (sideways scrolling)"
        self.page.set_viewport_size(dict(zip(("width", "height"), WIDTHS["desktop"], strict=True)))

    def close(self) -> None:
        self.context.close()
