"""Long audio: one file as a single Voxtral request vs. cut at silences into pieces run as one batch.

Builds 10- and 30-minute MP3s (16 kHz mono, what a client would upload: a 30-minute WAV or FLAC is
over the 25 MB limit) by concatenating the tests/data speech clips with 0.3-1.5 s silences.
For each file and mode it starts a fresh server process, sends the file once without streaming
(time to the full transcript, and the server's peak RSS, VmHWM, against its RSS after warm-up),
then with stream=true (time to the first delta and to the done event), each --repeat times, and
a single 30 s piece alone for reference.

The tiny random model never emits EOS, so every piece runs to its token budget
(transcription_min_tokens + transcription_tokens_per_audio_s x seconds): the run time measures
that budget, and it is set small (--tokens-per-s, --min-tokens) so the bench stays short. Both
modes get the same budget per second of audio.

    .venv/bin/python bench/long_audio.py --minutes 10 30 --out bench/RESULTS_long_audio.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from statistics import median
from typing import Any

import httpx
import numpy as np
import soundfile as sf
from procs import free_port, wait_ready  # bench/procs.py

ROOT = Path(__file__).resolve().parents[1]
AUDIO = ROOT / "tests" / "data"
CLIPS = ["jfk.wav", *(f"speech_{code}.wav" for code in ("en", "fr", "de", "es", "it", "pt", "nl", "hi"))]
MODES = {"whole": None, "auto": "auto"}


def build_mp3(minutes: float, seed: int = 0) -> bytes:
    """Speech clips in random order with random silences between them, `minutes` long, as MP3."""
    rng = np.random.default_rng(seed)
    clips = [sf.read(AUDIO / name, dtype="float32")[0] for name in CLIPS]
    parts: list[np.ndarray] = []
    total, target = 0, int(minutes * 60 * 16000)
    while total < target:
        parts += [clips[rng.integers(len(clips))], np.zeros(int(16000 * rng.uniform(0.3, 1.5)), np.float32)]
        total += parts[-2].shape[0] + parts[-1].shape[0]
    with tempfile.NamedTemporaryFile(suffix=".mp3") as f:  # libsndfile's MP3 writer wants a real file
        sf.write(f.name, np.concatenate(parts)[:target], 16000, format="MP3", subtype="MPEG_LAYER_III")
        return Path(f.name).read_bytes()


def proc_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


@contextmanager
def server(args: argparse.Namespace, log: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    port = free_port()
    cmd = [sys.executable, "-m", "app.main", "serve", "--model", "tiny", "--port", str(port), *server_flags(args)]
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, url)
        yield proc, url
    finally:
        proc.terminate()
        proc.wait(30)


def server_flags(args: argparse.Namespace) -> list[str]:
    return [
        "--transcription-tokens-per-audio-s", str(args.tokens_per_s),
        "--transcription-min-tokens", str(args.min_tokens),
        "--max-batch-size", str(args.max_batch_size),
        "--request-timeout-s", "3600",
    ]  # fmt: skip


def transcribe(url: str, data: bytes, chunking: str | None) -> tuple[float, dict[str, Any]]:
    form = {"model": "tiny", "response_format": "verbose_json" if chunking else "json"}
    if chunking:
        form["chunking_strategy"] = chunking
    started = time.perf_counter()
    r = httpx.post(url + "/v1/audio/transcriptions", files={"file": ("long.mp3", data)}, data=form, timeout=3600)
    r.raise_for_status()
    return time.perf_counter() - started, r.json()


def stream(url: str, data: bytes, chunking: str | None) -> tuple[float, float, int]:
    """(seconds to the first delta, seconds to the done event, number of deltas)."""
    form = {"model": "tiny", "stream": "true", **({"chunking_strategy": chunking} if chunking else {})}
    started, first, deltas = time.perf_counter(), float("nan"), 0
    with httpx.stream(
        "POST", url + "/v1/audio/transcriptions", files={"file": ("long.mp3", data)}, data=form, timeout=3600
    ) as r:
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            event = json.loads(line[6:])
            if event.get("type") == "transcript.text.delta":
                deltas += 1
                first = first if deltas > 1 else time.perf_counter() - started
            elif event.get("type") == "transcript.text.done":
                return first, time.perf_counter() - started, deltas
    raise RuntimeError("the stream ended without transcript.text.done")


def measure(args: argparse.Namespace, minutes: float, mode: str, data: bytes, log: Path) -> dict[str, Any]:
    """Peak RSS over the first request; times are medians over --repeat requests to the same server."""
    with server(args, log) as (proc, url):
        base = proc_kib(proc.pid, "VmRSS")
        runs = [transcribe(url, data, MODES[mode])]
        peak = proc_kib(proc.pid, "VmHWM")
        runs += [transcribe(url, data, MODES[mode]) for _ in range(args.repeat - 1)]
        streams = [stream(url, data, MODES[mode]) for _ in range(args.repeat)]
        first_30_s = build_mp3(0.5)  # the same seed: the first 30 s of `data`
        piece = [transcribe(url, first_30_s, None)[0] for _ in range(args.repeat)]
    body = runs[0][1]
    return {
        "minutes": minutes,
        "mode": mode,
        "mp3_mb": len(data) / 1e6,
        "pieces": len(body["segments"]) if "segments" in body else 1,
        "seconds": median(r[0] for r in runs),
        "seconds_range": (min(r[0] for r in runs), max(r[0] for r in runs)),
        "first_delta_s": median(s[0] for s in streams),
        "stream_done_s": median(s[1] for s in streams),
        "one_30s_piece_s": median(piece),
        "base_mib": base / 1024,
        "peak_mib": peak / 1024,
        "growth_mib": (peak - base) / 1024,
    }


def report(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    head = (
        "| audio | mode | pieces | time to full transcript (median, range) | stream: first delta / done "
        "| peak RSS | growth over idle |"
    )
    lines = [head, "|---|---|---|---|---|---|---|"]
    for r in rows:
        low, high = r["seconds_range"]
        lines.append(
            f"| {r['minutes']:g} min ({r['mp3_mb']:.1f} MB mp3) | {r['mode']} | {r['pieces']} "
            f"| {r['seconds']:.1f} s ({low:.1f}-{high:.1f}) | {r['first_delta_s']:.1f} s / {r['stream_done_s']:.1f} s "
            f"| {r['peak_mib']:.0f} MiB | {r['growth_mib']:.0f} MiB |"
        )
    piece = median(r["one_30s_piece_s"] for r in rows)
    command = " ".join(["python", "bench/long_audio.py", *sys.argv[1:]])
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    return "\n".join(
        [
            f"Command: `{command}` ({machine}; server flags: {' '.join(server_flags(args))})",
            "",
            *lines,
            "",
            f"One 30 s piece alone (the first 30 s of the same MP3, one request): {piece:.2f} s (median).",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, nargs="+", default=[10.0, 30.0])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--tokens-per-s", type=float, default=1.0)
    parser.add_argument("--min-tokens", type=int, default=8)
    parser.add_argument("--max-batch-size", type=int, default=96)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    log = Path(tempfile.gettempdir()) / "voxtral-long-audio-bench.log"
    rows = []
    for minutes in args.minutes:
        data = build_mp3(minutes)
        for mode in args.modes:
            rows.append(measure(args, minutes, mode, data, log))
            print(json.dumps(rows[-1]), flush=True)
    text = report(rows, args)
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
