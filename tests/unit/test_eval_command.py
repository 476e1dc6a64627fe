"""`voxtral-server eval` end to end on the tiny model (CPU): jfk in two containers with reference texts written
here, two configurations loaded one after the other through the server's transcription path."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from app.main import cli
from tests.support.audio_fixtures import DATA

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
