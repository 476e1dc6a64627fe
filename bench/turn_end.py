"""CPU cost of semantic_vad's turn-end model (Smart Turn v3, `app.turn_end`) per question asked, i.e. per
pause of a speaker: the features (Whisper log-mel of the last 8 s) and the int8 network on one onnxruntime
thread, alone and in batches as `SharedTurnEnd` gathers sessions' pauses. Each figure is the median of
`--rounds` runs, in CPU milliseconds of this process (`time.process_time`) per clip.

    python bench/turn_end.py
    python bench/turn_end.py --rounds 3 --batches 1,4
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app import turn_end  # noqa: E402


def cpu_ms(fn: object, clips: list[np.ndarray], rounds: int) -> float:
    """Median CPU ms per clip of `fn(clips)`."""
    times = []
    for _ in range(rounds):
        start = time.process_time()
        fn(clips)  # type: ignore[operator]
        times.append((time.process_time() - start) * 1000 / len(clips))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--batches", default="1,4,16")
    args = parser.parse_args()
    jfk = sf.read(ROOT / "tests" / "data" / "jfk.wav", dtype="float32")[0]
    started = time.perf_counter()
    turn_end.probabilities([jfk])  # loads the model
    print(f"load + first call: {(time.perf_counter() - started) * 1000:.0f} ms wall")
    clip = jfk[: int(8.5 * 16000)]
    features = cpu_ms(lambda clips: [turn_end.features(c) for c in clips], [clip], args.rounds)
    print(f"features alone: {features:.1f} CPU ms per clip")
    for batch in (int(b) for b in args.batches.split(",")):
        total = cpu_ms(turn_end.probabilities, [clip] * batch, args.rounds)
        print(f"batch of {batch:2d}: {total:.1f} CPU ms per clip (features + network)")


if __name__ == "__main__":
    main()
