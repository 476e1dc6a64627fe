"""Bearer-key authentication: which routes it guards, the 401 shape, key files, and what never leaks."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import openai
import pytest

from app.api import auth
from app.api.auth import ApiKeyFileError, load_api_keys
from app.model.compute.loader import LoadedModel
from app.wiring import create_app
from tests.support.access_log import AccessLog
from tests.support.checks import assert_openai_error
from tests.support.server import make_settings, serve

KEYS = ["sk-first-key-0001", "sk-second-key-0002", "sk-third-key-0003"]


@pytest.fixture(scope="module")
def guarded(loaded: LoadedModel, tiny_dir: Path) -> Any:
    with serve(loaded, tiny_dir, api_keys=KEYS) as running:
        yield running


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_v1_routes_need_a_valid_key(guarded: Any) -> None:
    with guarded.http() as http:
        missing = assert_openai_error(http.get("/v1/models"), 401)
        wrong = assert_openai_error(http.get("/v1/models", headers=bearer("sk-nope")), 401)
        unknown_route = assert_openai_error(http.get("/v1/nothing-here"), 401)
        no_scheme = assert_openai_error(http.get("/v1/models", headers={"Authorization": KEYS[0]}), 401)
        for error in (missing, wrong, unknown_route, no_scheme):
            assert error["code"] == "invalid_api_key"
            assert error["type"] == "authentication_error"
        assert http.get("/v1/models", headers=bearer("sk-nope")).headers["www-authenticate"] == "Bearer"
        for key in KEYS:
            assert http.get("/v1/models", headers=bearer(key)).status_code == 200
        assert http.get("/v1/models", headers={"Authorization": f"bearer  {KEYS[1]}"}).status_code == 200


def test_refused_before_the_body_is_read(guarded: Any) -> None:
    with guarded.http() as http:
        response = http.post("/v1/chat/completions", content=b"{not json", headers=bearer("sk-nope"))
    assert assert_openai_error(response, 401)["code"] == "invalid_api_key"


def test_probes_and_metrics_stay_open(guarded: Any) -> None:
    with guarded.http() as http:
        for path in ("/health", "/ready", "/metrics"):
            assert http.get(path).status_code == 200, path


def test_metrics_require_key_closes_metrics_only(loaded: LoadedModel, tiny_dir: Path) -> None:
    with serve(loaded, tiny_dir, api_keys=KEYS, metrics_require_key=True) as running, running.http() as http:
        assert_openai_error(http.get("/metrics"), 401)
        assert http.get("/metrics", headers=bearer(KEYS[2])).status_code == 200
        assert http.get("/ready").status_code == 200


def test_openai_sdk_sees_an_authentication_error(guarded: Any) -> None:
    import openai as sdk

    bad = sdk.OpenAI(base_url=guarded.base_url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        bad.models.list()
    assert caught.value.code == "invalid_api_key"
    good = sdk.OpenAI(base_url=guarded.base_url + "/v1", api_key=KEYS[0], max_retries=0)
    assert [m.id for m in good.models.list().data]


def test_every_key_is_compared_with_no_early_exit(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = auth.hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    middleware = auth.ApiKeyAuth(app=None, keys=KEYS)  # type: ignore[arg-type]
    assert middleware._valid(KEYS[0].encode())  # matches the first key...
    assert len(calls) == len(KEYS)  # ...and still compares with all of them
    assert not middleware._valid(b"sk-first-key-000")
    assert len(calls) == 2 * len(KEYS)


def test_key_file_with_comments_and_blank_lines(tmp_path: Path, tiny_dir: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("# rotated 2025-01\n\nsk-from-file-1\n   sk-from-file-2  \n# sk-commented-out\n")
    settings = make_settings(tiny_dir, api_keys=["sk-flag"], api_key_file=path)
    assert load_api_keys(settings) == ["sk-flag", "sk-from-file-1", "sk-from-file-2"]


def test_key_file_serves(loaded: LoadedModel, tiny_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("sk-only-in-file\n")
    with serve(loaded, tiny_dir, api_key_file=path) as running, running.http() as http:
        assert http.get("/v1/models", headers=bearer("sk-only-in-file")).status_code == 200
        assert http.get("/v1/models").status_code == 401


@pytest.mark.parametrize("content", [None, "", "# only a comment\n\n"])
def test_missing_or_empty_key_file_refuses_to_start(tmp_path: Path, tiny_dir: Path, content: str | None) -> None:
    path = tmp_path / "keys"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ApiKeyFileError):
        load_api_keys(make_settings(tiny_dir, api_key_file=path))


def test_bad_key_file_exits_2_before_loading_the_model(tmp_path: Path) -> None:
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "app.main", "serve", "--api-key-file", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2 and "api-key-file" in done.stderr


@pytest.mark.parametrize(("host", "warned"), [("0.0.0.0", True), ("::", True), ("127.0.0.1", False), ("::1", False)])
def test_open_server_on_a_public_address_warns(
    loaded: LoadedModel, tiny_dir: Path, caplog: pytest.LogCaptureFixture, host: str, warned: bool
) -> None:
    caplog.set_level(logging.WARNING, logger="app.api.auth")
    create_app(make_settings(tiny_dir, host=host), loaded)
    assert any("No API key configured" in r.getMessage() for r in caplog.records) is warned
    caplog.clear()
    create_app(make_settings(tiny_dir, host=host, api_keys=["k"]), loaded)
    assert not caplog.records


def test_keys_never_reach_logs_or_repr(guarded: Any, tiny_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    access = AccessLog()
    logging.getLogger("voxtral.access").addHandler(access)
    try:
        with guarded.http() as http:
            http.get("/v1/models", headers=bearer(KEYS[0]))
            http.get("/v1/models", headers=bearer("sk-attacker-guess-42"))
        access.lines(2)
    finally:
        logging.getLogger("voxtral.access").removeHandler(access)
    text = "\n".join(f"{r.getMessage()} {getattr(r, 'fields', '')}" for r in caplog.records)
    assert "/v1/models" in text  # the access lines were captured...
    assert KEYS[0] not in text and "sk-attacker-guess-42" not in text  # ...without any key
    assert KEYS[0] not in repr(make_settings(tiny_dir, api_keys=KEYS))
