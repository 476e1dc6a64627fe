"""`voxtral-server eval` end to end on the tiny model (CPU): jfk in two containers with reference texts written
here, two configurations loaded one after the other through the server's transcription path."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.audio import SAMPLE_RATE
from app.main import cli
from tests.support.audio_fixtures import DATA, jfk_samples, wav

JFK = "And so, my fellow Americans, ask not what your country can do for you; ask what you can do for your country."


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    for suffix in ("wav", "flac"):
        shutil.copy(DATA / f"jfk.{suffix}", tmp_path / f"jfk_{suffix}.{suffix}")
        (tmp_path / f"jfk_{suffix}.txt").write_text(JFK)
    return tmp_path


def run_eval(capsys: pytest.CaptureFixture[str], corpus: Path, cache: Path, *flags: str) -> dict[str, Any]:
    assert cli(["eval", str(corpus), "--cache-dir", str(cache), "--json", *flags]) == 0
    report: dict[str, Any] = json.loads(capsys.readouterr().out)
    return report


def lcs(a: list[int], b: list[int]) -> int:
    """The longest common subsequence: no alignment pairs more equal positions."""
    row = [0] * (len(b) + 1)
    for x in a:
        prev = 0
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], prev + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def test_identical_configurations_agree_fully(capsys: pytest.CaptureFixture[str], corpus: Path, tiny_dir: Path) -> None:
    report = run_eval(capsys, corpus, tiny_dir, "--against", "dtype=float32")  # auto is float32 on a CPU
    assert report["files"] == 2 and report["agreement"]["pooled"] == 1.0
    assert report["agreement"]["identical_files"] == 2 and report["agreement"]["mean_first_divergence"] is None
    assert report["candidate"]["wer"] == report["baseline"]["wer"] and report["wer_difference"] == 0.0
    assert all(f["baseline"]["token_ids"] for f in report["per_file"])  # it did generate


def test_a_differing_configuration_and_a_hand_check(
    capsys: pytest.CaptureFixture[str], corpus: Path, tiny_dir: Path
) -> None:
    """bfloat16 against float32 on random weights: greedy tokens change (issue 30), so agreement < 1."""
    report = run_eval(capsys, corpus, tiny_dir, "--against", "dtype=bfloat16")
    assert report["agreement"]["pooled"] < 1.0
    hits = length = 0
    for f in report["per_file"]:
        a, b, agreement = f["baseline"]["token_ids"], f["candidate"]["token_ids"], f["agreement"]
        assert agreement["length"] == max(len(a), len(b)) and agreement["hits"] <= lcs(a, b)
        first = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        assert agreement["first_divergence"] == (None if a == b else first)
        hits, length = hits + agreement["hits"], length + agreement["length"]
    assert report["agreement"]["pooled"] == hits / length
    for run in ("baseline", "candidate"):
        s = report[run]
        assert s["reference_words"] == 2 * 22  # both files' normalised reference, 22 words each
        assert s["wer"] == (s["substitutions"] + s["deletions"] + s["insertions"]) / s["reference_words"]
        assert s["insertions"] == sum(f[run]["insertions"] for f in report["per_file"])
    assert report["wer_difference"] == report["candidate"]["wer"] - report["baseline"]["wer"]


def test_text_output_names_each_figure(capsys: pytest.CaptureFixture[str], corpus: Path, tiny_dir: Path) -> None:
    assert cli(["eval", str(corpus), "--cache-dir", str(tiny_dir)]) == 0
    out = capsys.readouterr().out
    assert "files: 2, reference words (normalised): 44" in out and "baseline" in out
    assert "token agreement" not in out  # one configuration: nothing to agree with


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--against", "dtpye=bfloat16"], "no setting 'dtpye'; did you mean dtype"),
        (["--against", "dtype=int3"], "dtype"),
        (["--max-batch-size", "0"], "max_batch_size"),
    ],
)
def test_bad_configurations_are_refused_before_loading(
    capsys: pytest.CaptureFixture[str], corpus: Path, args: list[str], message: str
) -> None:
    assert cli(["eval", str(corpus), *args]) == 2
    assert message in capsys.readouterr().err


def test_a_directory_without_pairs_is_refused(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert cli(["eval", str(tmp_path)]) == 2
    assert "no audio with a reference text" in capsys.readouterr().err


def test_a_file_longer_than_the_context_is_transcribed_in_pieces(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, tiny_dir: Path
) -> None:
    """35 s (jfk three times, 1 s of silence between) is two 30 s audio windows, 750 audio tokens: past
    --context-length 512 whole, as a file upload without chunking_strategy is refused. eval cuts it as
    chunking_strategy=auto does (Silero pieces of at most 30 s, each within the context), so it is transcribed."""
    gap = np.zeros(SAMPLE_RATE, dtype=np.float32)
    (tmp_path / "long.wav").write_bytes(wav(np.concatenate([jfk_samples(), gap] * 2 + [jfk_samples()])))
    (tmp_path / "long.txt").write_text(" ".join([JFK] * 3))
    flags = ["--context-length", "512"]
    assert cli(["eval", str(tmp_path), "--cache-dir", str(tiny_dir), "--chunking-strategy", "none", *flags]) == 1
    assert "maximum context length is 512" in capsys.readouterr().err
    report = run_eval(capsys, tmp_path, tiny_dir, *flags)
    assert report["files"] == 1 and report["per_file"][0]["baseline"]["token_ids"]
    assert report["baseline"]["reference_words"] == 3 * 22


def test_a_clip_that_is_speech_end_to_end_is_one_piece_whole(
    capsys: pytest.CaptureFixture[str], corpus: Path, tiny_dir: Path
) -> None:
    """jfk (11 s of speech) under the default chunking is the whole file (app/chunking.py: `EDGE_S`), so the
    tokens equal those of each file sent whole."""
    cut = run_eval(capsys, corpus, tiny_dir)
    whole = run_eval(capsys, corpus, tiny_dir, "--chunking-strategy", "none")
    tokens = [[f["baseline"]["token_ids"] for f in report["per_file"]] for report in (cut, whole)]
    assert tokens[0] == tokens[1]


def test_a_bad_chunking_strategy_is_refused_before_loading(capsys: pytest.CaptureFixture[str], corpus: Path) -> None:
    assert cli(["eval", str(corpus), "--chunking-strategy", "sometimes"]) == 2
    assert "chunking_strategy must be" in capsys.readouterr().err
