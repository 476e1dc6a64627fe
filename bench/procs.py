"""What the benchmarks share to run a server (or a process group) beside them: a free port, and the wait for
a server's readiness."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import httpx


def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(
    proc: subprocess.Popen[bytes], url: str, log: Path | None = None, *, path: str = "/ready", timeout_s: float = 300
) -> None:
    """Return once `url + path` answers 200 (a server listens while it loads). SystemExit, with the tail of
    `log`, when `proc` exits first or `timeout_s` passes (then `proc` is killed)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + path, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"the server exited during start-up{_tail(log)}")
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"the server was not ready within {timeout_s:g} s{_tail(log)}")


def _tail(log: Path | None) -> str:
    return "" if log is None or not log.exists() else f"; its log ends:\n{log.read_text()[-5000:]}"
