"""CPU cost of the speech detector (Silero VAD, `app.vad`) against the audio's length.

Files: `split_at_silences` (what `chunking_strategy` runs in a prep thread) on speech with pauses and
white noise (tests/data/jfk.wav tiled, 10 dB SNR) of several lengths. Streams: `VadStream.push` fed
100 ms at a time, as a realtime session feeds it. Each figure is the median of `--rounds` runs, in CPU
seconds of this process (`time.process_time`) per second of audio.

    python bench/vad.py
    python bench/vad.py --lengths 10,60 --rounds 1 --out ''
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app import vad  # noqa: E402
from app.chunking import VadOptions, split_at_silences  # noqa: E402


def audio_of(seconds: float) -> np.ndarray:
    clip = sf.read(ROOT / "tests" / "data" / "jfk.wav", dtype="float32")[0]
    one = np.concatenate([clip, np.zeros(32000, np.float32)])
    tiled = np.tile(one, int(seconds * 16000 // one.shape[0]) + 1)[: int(seconds * 16000)]
    noise = np.random.default_rng(0).standard_normal(tiled.shape[0]) * np.sqrt(np.mean(clip**2) / 10)
    return (tiled + noise).astype(np.float32)


def cpu(fn: object, *args: object) -> float:
    started = time.process_time()
    fn(*args)  # type: ignore[operator]
    return time.process_time() - started


def stream(audio: np.ndarray) -> None:
    detector = vad.VadStream()
    for at in range(0, audio.shape[0], 1600):
        detector.push(audio[at : at + 1600])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="10,60,300,1800")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "bench" / "RESULTS.md"))
    args = parser.parse_args()
    vad.network()
    rows = [
        "| audio s | file: CPU s (median) | file: CPU s per audio s | stream: CPU s per audio s |",
        "| --- | --- | --- | --- |",
    ]
    for seconds in [float(x) for x in args.lengths.split(",")]:
        audio = audio_of(seconds)
        files = [cpu(split_at_silences, audio, VadOptions()) for _ in range(args.rounds)]
        streamed = [cpu(stream, audio[: int(min(seconds, 60) * 16000)]) for _ in range(args.rounds)]
        per_stream = statistics.median(streamed) / min(seconds, 60)
        file_cpu = statistics.median(files)
        rows.append(f"| {seconds:g} | {file_cpu:.3f} | {file_cpu / seconds:.4f} | {per_stream:.4f} |")
    load = os.getloadavg()[0]
    command = " ".join(["python bench/vad.py", *sys.argv[1:]])
    header = f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, `{command}`, load average {load:.2f}"
    print(header + "\n\n" + "\n".join(rows))
    if args.out:
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(f"\n{header}\n\n" + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
