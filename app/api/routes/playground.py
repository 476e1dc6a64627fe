"""The browser playground: `GET /` serves its page, `/playground/*` its script, styles and audio worklet.

Plain files shipped inside the `app` package (no build step, nothing fetched from elsewhere), so the page works
offline and behind a firewall. The page itself needs no key: it calls /v1/* like any client, with the key the
user types (kept in the tab's sessionStorage).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import FileResponse
from starlette.responses import Response
from starlette.staticfiles import StaticFiles

FILES = Path(__file__).resolve().parents[2] / "playground"
"""app/playground/: index.html, style.css, app.js and the AudioWorklet module."""

HEADERS = {
    # Everything from this origin only: the page cannot load or send anything elsewhere, whatever a transcript
    # contains. 'self' covers the same-origin WebSocket; blob: is the recorded audio's player.
    "Content-Security-Policy": (
        "default-src 'self'; media-src 'self' blob:; img-src 'self' data:; object-src 'none'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidate (ETag): after an upgrade no tab runs a stale script
}


class _Files(StaticFiles):
    """StaticFiles whose answers carry the page's caching and sniffing headers."""

    def file_response(self, *args: Any, **kwargs: Any) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers.update({k: HEADERS[k] for k in ("X-Content-Type-Options", "Cache-Control")})
        return response


def install(app: FastAPI) -> None:
    """Mount the page's files; `/` answers with the page itself."""

    async def page() -> FileResponse:
        return FileResponse(FILES / "index.html", media_type="text/html; charset=utf-8", headers=HEADERS)

    app.add_api_route(
        "/",
        page,
        methods=["GET"],
        summary="The browser playground",
        description="An HTML page that transcribes, asks and streams live audio through /v1 (README: playground).",
        response_class=FileResponse,
        responses={200: {"content": {"text/html": {}}, "description": "The playground page"}},
        tags=["playground"],
    )
    app.add_api_route("/", page, methods=["HEAD"], include_in_schema=False)
    app.mount("/playground", _Files(directory=FILES), name="playground")
