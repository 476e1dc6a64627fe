"""Audio refused before it is decoded: what an over-budget request costs the server before its 400.

Each case is a request whose audio is cheap on the wire and large once decoded (minutes of FLAC silence),
sent --repeat times to a fresh server of the tree under test (--src, default this one; its own process).
Before each send the server's peak RSS is reset (/proc/PID/clear_refs); the bench reports the median time
to the answer and the largest rise of the peak RSS (VmHWM) over the RSS before the request.

    .venv/bin/python bench/decode_budget.py
    .venv/bin/python bench/decode_budget.py --src /tmp/baseline   # a `git archive` of another commit
"""

from __future__ import annotations

import argparse
import base64
import io
import sys
import time
from pathlib import Path
from statistics import median
from typing import Any

import httpx
import numpy as np
import soundfile as sf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from long_audio import proc_kib, server


def silent_flac(minutes: float) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, np.zeros(int(16000 * 60 * minutes), np.float32), 16000, format="FLAC")
    return buffer.getvalue()


def chat_body(parts: int, minutes: float) -> dict[str, Any]:
    data = base64.b64encode(silent_flac(minutes)).decode()
    audio = {"type": "input_audio", "input_audio": {"data": data, "format": "flac"}}
    return {"model": "tiny", "max_tokens": 1, "messages": [{"role": "user", "content": [audio] * parts}]}


def send_chat(url: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=600)


def send_transcription(url: str, data: bytes) -> httpx.Response:
    files = {"file": ("long.flac", data)}
    return httpx.post(url + "/v1/audio/transcriptions", files=files, data={"model": "tiny"}, timeout=600)


def cases() -> dict[str, tuple[Any, Any]]:
    return {
        "chat, 9 parts x 40 min (over the part count)": (send_chat, chat_body(9, 40)),
        "chat, 8 parts x 40 min (320 min, over 40)": (send_chat, chat_body(8, 40)),
        "chat, 2 parts x 40 min (80 min, over 40)": (send_chat, chat_body(2, 40)),
        "transcription, 40 min FLAC (over 30)": (send_transcription, silent_flac(40)),
    }


def measure(proc_pid: int, url: str, send: Any, payload: Any, repeat: int) -> tuple[float, float, str]:
    """(median seconds, largest peak-RSS rise in MB, the answer's status and code)."""
    times, rises, answer = [], [], ""
    for _ in range(repeat):
        Path(f"/proc/{proc_pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
        before = proc_kib(proc_pid, "VmRSS")
        started = time.perf_counter()
        response = send(url, payload)
        times.append(time.perf_counter() - started)
        rises.append((proc_kib(proc_pid, "VmHWM") - before) / 1024)
        error = response.json().get("error") or {}
        answer = f"{response.status_code} {error.get('code')} {error.get('param')}"
    return median(times), max(rises), answer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    import long_audio

    long_audio.ROOT = args.src.resolve()
    flags = argparse.Namespace(tokens_per_s=1, min_tokens=1, max_batch_size=4)
    log = Path("/tmp/decode_budget.log")
    print(f"| request ({args.src}) | answer | median time | peak RSS rise |")
    print("| --- | --- | --- | --- |")
    for name, (send, payload) in cases().items():
        with server(flags, log) as (proc, url):  # a fresh server each: no memory freed by an earlier case
            seconds, rise, answer = measure(proc.pid, url, send, payload, args.repeat)
        print(f"| {name} | {answer} | {seconds:.3f} s | {rise:.0f} MB |", flush=True)


if __name__ == "__main__":
    main()
