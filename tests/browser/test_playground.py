"""The playground at GET /, in a real Chromium: transcribe an upload in every format and a recording from the
(fake) microphone, ask about the audio, live transcription over the realtime socket, the server's own error
for a wrong key, and no request off the server's origin. The tiny model's words are noise: the tests check
that the page shows what the server sent, in the right structure, not what was said."""

from __future__ import annotations

import base64
import fnmatch
import json
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import expect

from app.model.compute.loader import LoadedModel, load_model
from app.wiring import create_app
from tests.support.audio_fixtures import DATA
from tests.support.browser import Page, chromium, require_chromium, speech_wav
from tests.support.server import RunningServer, free_port, make_settings, serve

KEY = "sk-playground-test"
CLIP = DATA / "jfk.wav"
MEDIA = {"text": "text/event-stream", "srt": "text/plain", "vtt": "text/vtt", "verbose_json": "application/json"}
TIMEOUT_MS = 120_000  # a busy 2-core CI machine; Playwright waits on the page's state, this is only the limit
expect.set_options(timeout=30_000)  # the default 5 s is short for a page sharing 2 cores with the model


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    require_chromium()
    with chromium(speech_wav(tmp_path_factory.mktemp("microphone") / "speech.wav")) as running:
        yield running


@pytest.fixture(scope="module")
def keyed(loaded: LoadedModel, tiny_dir: Path) -> Iterator[RunningServer]:
    with serve(loaded, tiny_dir, api_keys=[KEY], max_batch_size=8) as running:
        yield running


@pytest.fixture
def page(browser: Any, server: RunningServer) -> Iterator[Page]:
    tab = Page(browser, server.base_url)
    expect(tab.page.locator("#server-status")).to_have_text("Model: tiny", timeout=TIMEOUT_MS)
    yield tab
    assert tab.foreign == [], "the page asked for something off the server's origin"
    assert tab.console == [], "the page's script threw"
    tab.close()


def region(tab: Page, name: str) -> Any:
    return tab.page.get_by_role("region", name=name, exact=True)


def choose_clip(tab: Page) -> None:
    tab.page.get_by_label("Audio file", exact=True).set_input_files(CLIP)
    expect(tab.page.locator("#audio-info")).to_contain_text("jfk.wav")


def run_task(tab: Page, button: str, status: str) -> Any:
    """Press the task's button and wait for its status to say done; returns the server's response."""
    path = "/v1/audio/transcriptions" if button == "Transcribe" else "/v1/chat/completions"
    with tab.page.expect_response(lambda r: r.url.endswith(path), timeout=TIMEOUT_MS) as answer:
        tab.page.get_by_role("button", name=button, exact=True).click()
    expect(tab.page.locator(status)).to_contain_text("Done in", timeout=TIMEOUT_MS)
    return answer.value


# -- serving the page ---------------------------------------------------------------------------------------


def test_page_and_its_files_load_without_a_key_and_with_their_content_types(keyed: RunningServer) -> None:
    with keyed.http() as http:
        page = http.get("/")
        assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
        assert "default-src 'self'" in page.headers["content-security-policy"]
        assert http.head("/").status_code == 200
        for name, media in [("app.js", "javascript"), ("pcm-worklet.js", "javascript"), ("style.css", "text/css")]:
            asset = http.get(f"/playground/{name}")
            assert asset.status_code == 200 and media in asset.headers["content-type"], name
            assert asset.headers["cache-control"] == "no-cache" and asset.headers["x-content-type-options"] == "nosniff"
            etag = asset.headers["etag"]  # revalidation is cheap: an unchanged file is a 304
            assert http.get(f"/playground/{name}", headers={"If-None-Match": etag}).status_code == 304
        assert http.get("/playground/missing.js").status_code == 404
        assert http.get("/v1/models").status_code == 401  # the API behind it still needs the key
    srcs = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    # Relative URLs only: the page works under a proxy's path prefix as well as at the root.
    assert srcs and all(s.startswith("playground/") or s.startswith("data:") for s in srcs), srcs


def test_every_file_of_the_page_ships_in_the_package() -> None:
    """setuptools installs only the files package-data names: one it misses would be a 404 once installed."""
    root = Path(__file__).resolve().parents[2]
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["app"]
    files = [p.relative_to(root / "app").as_posix() for p in (root / "app" / "playground").iterdir()]
    assert {"playground/index.html", "playground/app.js", "playground/pcm-worklet.js"} <= set(files)
    assert [f for f in files if not any(fnmatch.fnmatch(f, g) for g in globs)] == []


def test_no_playground_turns_it_off(loaded: LoadedModel, tiny_dir: Path) -> None:
    with serve(loaded, tiny_dir, playground=False) as running, running.http() as http:
        assert http.get("/").status_code == 404
        assert http.get("/playground/app.js").status_code == 404
        assert http.get("/v1/models").status_code == 200


def test_the_page_says_the_demo_model_has_random_weights(page: Page) -> None:
    banner = page.page.get_by_role("note")
    expect(banner).to_be_visible()
    expect(banner).to_contain_text("random weights")
    page.screenshot("random-weights-banner")


# -- the three tasks ----------------------------------------------------------------------------------------


def test_transcribe_an_upload_in_every_format(page: Page) -> None:
    choose_clip(page)
    page.page.get_by_label("Language", exact=True).select_option("en")
    out = region(page, "Transcript")
    before = [out.bounding_box(), page.page.get_by_role("button", name="Transcribe").bounding_box()]
    for fmt in ["text", "srt", "vtt", "verbose_json"]:
        page.page.get_by_label("Format", exact=True).select_option(fmt)
        response = run_task(page, "Transcribe", "#transcribe-status")
        # Chromium does not expose a multipart body holding a file: what was sent shows in what came back.
        assert response.status == 200 and response.headers["content-type"].startswith(MEDIA[fmt])
        body = response.text()
        if fmt == "text":  # streamed: the page shows the deltas joined, which the done event repeats
            done = [json.loads(line[5:]) for line in body.splitlines() if line.startswith("data:")][-1]
            assert done["type"] == "transcript.text.done"
            expect(out.locator("p")).to_have_text(done["text"] or "(no speech recognised)")
        elif fmt == "verbose_json":
            verbose = json.loads(body)
            assert verbose["language"] == "english" and verbose["duration"] == pytest.approx(11.0, abs=0.1)
            segments = verbose["segments"]
            expect(out.locator(".segments li")).to_have_count(len(segments))
            assert len(segments) >= 1
            first = out.locator(".segments li .time").first.inner_text()
            assert re.fullmatch(r"\d\d:\d\d\.\d\d – \d\d:\d\d\.\d\d", first), first
        else:
            expect(out.locator("pre")).to_have_text(body, use_inner_text=True)
            assert body.startswith("WEBVTT") if fmt == "vtt" else re.match(r"(1\n\d\d:\d\d:\d\d,\d{3} --> |$)", body)
        after = [out.bounding_box(), page.page.get_by_role("button", name="Transcribe").bounding_box()]
        assert after == before, "the transcript moved the page: its region must keep its size and place"
        page.screenshot(f"transcribe-{fmt}")


def test_record_from_the_microphone_then_transcribe(page: Page) -> None:
    record = page.page.get_by_role("button", name="Record", exact=True)
    record.click()
    expect(record).to_have_attribute("aria-pressed", "true")
    expect(page.page.locator("#audio-info")).to_contain_text("Recording 2 s", timeout=TIMEOUT_MS)
    record.click()
    info = page.page.locator("#audio-info")
    expect(info).to_contain_text("recording.wav", timeout=TIMEOUT_MS)
    seconds = float(re.search(r"([\d.]+) s$", info.inner_text()).group(1))  # type: ignore[union-attr]
    assert seconds >= 1.5, info.inner_text()
    page.page.get_by_label("Format", exact=True).select_option("verbose_json")
    response = run_task(page, "Transcribe", "#transcribe-status")
    assert response.status == 200  # the server decoded the page's WAV to as many seconds as it recorded
    assert json.loads(response.text())["duration"] == pytest.approx(seconds, abs=0.05)
    expect(region(page, "Transcript").locator(".segments li").first).to_be_visible()
    page.screenshot("record")


def test_ask_about_the_audio_from_the_keyboard(page: Page) -> None:
    choose_clip(page)
    keys = page.page.keyboard
    page.page.get_by_role("tab", name="Transcribe").focus()
    keys.press("ArrowRight")  # WAI-ARIA tabs: arrows move between them
    ask_tab = page.page.get_by_role("tab", name="Ask")
    expect(ask_tab).to_be_focused()
    expect(ask_tab).to_have_attribute("aria-selected", "true")
    question = page.page.get_by_role("textbox", name="Question", exact=True)
    for _ in range(16):  # Tab walks the audio controls (the player has several), then reaches the question
        keys.press("Tab")
        if question.evaluate("e => e === document.activeElement"):
            break
    expect(question).to_be_focused()
    assert question.evaluate("e => getComputedStyle(e).outlineStyle") == "solid"  # a visible focus ring
    keys.type("What is said here?")
    page.page.get_by_label("Max tokens").fill("24")  # the random model never stops by itself
    with page.page.expect_response(lambda r: r.url.endswith("/v1/chat/completions"), timeout=TIMEOUT_MS) as answer:
        question.press("Enter")  # Enter in the question asks
    expect(page.page.locator("#ask-status")).to_contain_text("Done in", timeout=TIMEOUT_MS)
    response = answer.value
    request = json.loads(response.request.post_data)
    audio, text = request["messages"][0]["content"]
    assert request["stream"] is True and request["max_completion_tokens"] == 24
    assert text == {"type": "text", "text": "What is said here?"}
    assert audio["input_audio"]["format"] == "wav" and base64.b64decode(audio["input_audio"]["data"])[:4] == b"RIFF"
    chunks = [line[6:] for line in response.text().splitlines() if line.startswith("data: ")]
    assert chunks[-1] == "[DONE]"
    said = "".join((json.loads(c)["choices"] or [{}])[0].get("delta", {}).get("content") or "" for c in chunks[:-1])
    expect(region(page, "Answer").locator("p")).to_have_text(said or "(empty answer)")
    page.screenshot("ask")


def test_stop_ends_a_running_answer_and_the_next_one_works(page: Page) -> None:
    choose_clip(page)
    page.page.get_by_role("tab", name="Ask").click()
    page.page.get_by_label("Max tokens").fill("4096")  # minutes of noise from the random model: long enough
    page.page.get_by_role("button", name="Ask", exact=True).click()
    expect(region(page, "Answer").locator("p")).not_to_have_text("", timeout=TIMEOUT_MS)  # streaming has begun
    page.page.get_by_role("button", name="Stop", exact=True).click()
    expect(page.page.locator("#ask-status")).to_have_text("Stopped.")
    expect(page.page.get_by_role("button", name="Stop", exact=True)).to_be_hidden()
    expect(region(page, "Error")).to_be_hidden()
    page.page.get_by_label("Max tokens").fill("4")
    run_task(page, "Ask", "#ask-status")


def test_live_transcription_of_the_microphone(page: Page) -> None:
    page.page.get_by_role("tab", name="Live").click()
    expect(page.page.get_by_label("Audio file", exact=True)).to_be_hidden()
    frames: list[dict[str, Any]] = []
    page.page.on("websocket", lambda ws: ws.on("framereceived", lambda payload: frames.append(json.loads(payload))))
    page.page.get_by_role("button", name="Start live", exact=True).click()
    live = region(page, "Live transcript")
    expect(live.locator(".utterance.completed").first).to_be_attached(timeout=TIMEOUT_MS)
    page.screenshot("live")
    page.page.get_by_role("button", name="Stop live", exact=True).click()
    expect(page.page.get_by_role("button", name="Start live", exact=True)).to_be_enabled(timeout=TIMEOUT_MS)
    completed = [f for f in frames if f["type"] == "conversation.item.input_audio_transcription.completed"]
    assert frames[0]["type"] == "session.created" and completed
    first = live.locator(".utterance.completed").first
    assert first.get_attribute("data-item-id") == completed[0]["item_id"]
    expect(first).to_have_text(completed[0]["transcript"] or "(no words)")
    started = [f for f in frames if f["type"] == "input_audio_buffer.speech_started"]
    start_s = next(f["audio_start_ms"] for f in started if f["item_id"] == completed[0]["item_id"]) / 1000
    minutes = int(start_s // 60)
    expect(live.locator(".live-row .time").first).to_have_text(f"{minutes:02d}:{start_s - minutes * 60:05.2f}")
    expect(region(page, "Error")).to_be_hidden()


@pytest.fixture(scope="module")
def realtime(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    cache = tmp_path_factory.mktemp("realtime-cache")
    with serve(load_model(make_settings(cache, model="tiny-realtime")), cache, model="tiny-realtime") as running:
        yield running


def test_live_shows_a_realtime_models_deltas_before_the_commit(browser: Any, realtime: RunningServer) -> None:
    """With a Voxtral Realtime model the line fills while the speaker talks: text on the page, marked
    streaming, before the server commits the utterance (server VAD: at the end of speech); final on
    `.completed`, the deltas' text its prefix."""
    tab = Page(browser, realtime.base_url)
    expect(tab.page.locator("#server-status")).to_have_text("Model: tiny-realtime", timeout=TIMEOUT_MS)
    tab.page.get_by_role("tab", name="Live").click()
    frames: list[dict[str, Any]] = []
    tab.page.on("websocket", lambda ws: ws.on("framereceived", lambda payload: frames.append(json.loads(payload))))
    tab.page.get_by_role("button", name="Start live", exact=True).click()
    live = region(tab, "Live transcript")
    expect(live.locator(".utterance.streaming:not(.completed)").first).not_to_be_empty(timeout=TIMEOUT_MS)
    item, shown = tab.page.evaluate(
        "() => { const line = document.querySelector('#live-transcript .utterance.streaming');"
        " return [line.dataset.itemId, line.textContent]; }"
    )
    seen = [f["type"] for f in frames if f.get("item_id") == item]
    assert "conversation.item.input_audio_transcription.delta" in seen
    assert "input_audio_buffer.committed" not in seen, "the text was shown only after the commit"
    final = live.locator(f'.utterance.completed[data-item-id="{item}"]')
    expect(final).to_be_attached(timeout=TIMEOUT_MS)
    tab.page.get_by_role("button", name="Stop live", exact=True).click()
    expect(tab.page.get_by_role("button", name="Start live", exact=True)).to_be_enabled(timeout=TIMEOUT_MS)
    transcript = next(f["transcript"] for f in frames if f["type"].endswith(".completed") and f["item_id"] == item)
    deltas = "".join(f["delta"] for f in frames if f["type"].endswith(".delta") and f["item_id"] == item)
    assert transcript == deltas and transcript.startswith(shown) and shown
    expect(final).to_have_text(transcript)
    expect(region(tab, "Error")).to_be_hidden()
    assert tab.foreign == [] and tab.console == []
    tab.close()


# -- keys, errors and the origin ----------------------------------------------------------------------------


def server_message(server: RunningServer, key: str) -> str:
    response = httpx.get(server.base_url + "/v1/models", headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 401
    return str(response.json()["error"]["message"])


def test_a_wrong_key_shows_the_servers_error_and_the_right_one_is_kept_in_session_storage(
    browser: Any, keyed: RunningServer
) -> None:
    tab = Page(browser, keyed.base_url)
    page, error = tab.page, region(tab, "Error")
    expect(page.get_by_label("API key")).to_be_visible()  # asked for at once: the server needs one
    page.get_by_label("API key").fill("sk-wrong")
    page.get_by_role("button", name="Use key").click()
    expect(error).to_have_text(server_message(keyed, "sk-wrong"))
    choose_clip(tab)
    page.get_by_role("button", name="Transcribe", exact=True).click()  # the task's own request: the same error
    expect(page.locator("#transcribe-status")).to_contain_text("Failed")
    expect(error).to_have_text(server_message(keyed, "sk-wrong"))
    tab.screenshot("wrong-key")
    page.get_by_role("tab", name="Live").click()
    page.get_by_role("button", name="Start live", exact=True).click()  # a refused upgrade, told in words
    expect(page.locator("#live-status")).to_have_text("Not started.", timeout=TIMEOUT_MS)
    expect(error).to_have_text(server_message(keyed, "sk-wrong"))
    page.get_by_label("API key").fill(KEY)
    page.get_by_role("button", name="Use key").click()
    expect(page.locator("#server-status")).to_have_text("Model: tiny")
    expect(error).to_be_hidden()
    assert page.evaluate("sessionStorage.getItem('voxtral.apiKey')") == KEY
    assert page.evaluate("localStorage.length") == 0 and tab.context.cookies() == []
    assert tab.foreign == []
    tab.close()


def test_an_upload_the_server_cannot_decode_shows_its_message(page: Page, server: RunningServer) -> None:
    junk = b"these are notes, not audio\n" * 40
    files = {"file": ("notes.wav", junk, "audio/wav")}
    expected = httpx.post(server.base_url + "/v1/audio/transcriptions", data={"model": "tiny"}, files=files)
    assert expected.status_code == 400
    page.page.get_by_label("Audio file", exact=True).set_input_files(
        {"name": "notes.wav", "mimeType": "audio/wav", "buffer": junk}
    )
    page.page.get_by_role("button", name="Transcribe", exact=True).click()
    expect(region(page, "Error")).to_have_text(expected.json()["error"]["message"], timeout=TIMEOUT_MS)
    expect(page.page.locator("#transcribe-status")).to_contain_text("Failed")
    page.page.get_by_role("tab", name="Ask").click()
    page.page.get_by_role("button", name="Ask", exact=True).click()  # the browser cannot decode it either: said so
    expect(region(page, "Error")).to_contain_text("cannot decode")


def test_every_request_stays_on_the_servers_origin(browser: Any, server: RunningServer) -> None:
    """All tasks once, with the browser told to refuse anything off the origin (so a stray fetch would also
    show up as a failure on the page)."""
    tab = Page(browser, server.base_url)
    refused: list[str] = []

    def guard(route: Any) -> None:
        if route.request.url.startswith(server.base_url) or route.request.url.startswith(("blob:", "data:")):
            return route.continue_()
        refused.append(route.request.url)
        return route.abort()

    tab.context.route("**/*", guard)
    tab.page.reload()
    choose_clip(tab)
    run_task(tab, "Transcribe", "#transcribe-status")
    tab.page.get_by_role("tab", name="Ask").click()
    tab.page.get_by_label("Max tokens").fill("8")
    run_task(tab, "Ask", "#ask-status")
    assert refused == [] and tab.foreign == []
    assert {urlpath(u) for u in tab.requests} >= {"/", "/playground/app.js", "/v1/models", "/v1/chat/completions"}
    tab.close()


def test_the_page_works_under_a_proxys_path_prefix(browser: Any, loaded: LoadedModel, tiny_dir: Path) -> None:
    """A reverse proxy serving the server at /voxtral/ (stripping the prefix): every URL of the page is relative."""
    app = create_app(make_settings(tiny_dir), loaded)

    async def proxy(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            assert scope["path"].startswith("/voxtral/"), scope["path"]  # nothing may escape the prefix
            scope = {**scope, "path": scope["path"][len("/voxtral") :], "raw_path": None}
        await app(scope, receive, send)

    with RunningServer(proxy, free_port(), ready_path="/voxtral/ready") as running:
        tab = Page(browser, running.base_url + "/voxtral/")
        expect(tab.page.locator("#server-status")).to_have_text("Model: tiny")
        choose_clip(tab)
        run_task(tab, "Transcribe", "#transcribe-status")
        tab.page.get_by_role("tab", name="Live").click()
        tab.page.get_by_role("button", name="Start live", exact=True).click()
        live_row = region(tab, "Live transcript").locator(".live-row").first
        expect(live_row).to_be_attached(timeout=TIMEOUT_MS)  # the session heard speech: its events came back
        tab.page.get_by_role("button", name="Stop live", exact=True).click()
        expect(tab.page.get_by_role("button", name="Start live", exact=True)).to_be_enabled(timeout=TIMEOUT_MS)
        assert any(u.startswith("ws://") and "/voxtral/v1/realtime?" in u for u in tab.requests), tab.requests
        assert tab.foreign == [] and tab.console == []
        tab.close()


def urlpath(url: str) -> str:
    return httpx.URL(url).path
