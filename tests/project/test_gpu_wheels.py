"""bench/gpu_wheels.sh fetches every dependency the server imports that the GPU image lacks: each of
pyproject.toml's dependencies is in exactly one of its PACKAGES (fetched), ON_IMAGE (left to the image) and
LEFT_OUT (no section imports it), by name; bench/gpu_preflight.py skips exactly LEFT_OUT."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]


def _array(script: str, name: str) -> set[str]:
    match = re.search(rf"^{name}=\(([^)]*)\)", script, re.MULTILINE)
    assert match, f"no {name}=(...) in bench/gpu_wheels.sh"
    return {canonicalize_name(word) for word in match.group(1).split()}


def test_every_dependency_is_fetched_or_left_to_the_image() -> None:
    script = (ROOT / "bench" / "gpu_wheels.sh").read_text()
    fetched, on_image, left_out = (_array(script, name) for name in ("PACKAGES", "ON_IMAGE", "LEFT_OUT"))
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {canonicalize_name(Requirement(d).name) for d in dependencies}
    assert names - fetched - on_image - left_out == set(), "add them to PACKAGES (or ON_IMAGE) in bench/gpu_wheels.sh"
    assert fetched & on_image == fetched & left_out == on_image & left_out == set()
    assert "silero-vad" in fetched  # the warm-up imports it (app/vad.py); it once was missing


def test_preflight_skips_what_the_wheels_leave_out() -> None:
    import sys

    sys.path.insert(0, str(ROOT / "bench"))
    from gpu_preflight import NOT_NEEDED

    left_out = _array((ROOT / "bench" / "gpu_wheels.sh").read_text(), "LEFT_OUT")
    assert {canonicalize_name(name) for name in NOT_NEEDED} == left_out


def test_the_floor_takes_the_cards_bandwidth_by_its_name() -> None:
    import sys

    sys.path.insert(0, str(ROOT / "bench"))
    from gpu_check import datasheet_bandwidth

    names = {
        "NVIDIA H100 80GB HBM3": 3.35e12,
        "NVIDIA H100 PCIe": 2.0e12,
        "NVIDIA H200": 4.8e12,
        "NVIDIA A100-SXM4-80GB": 2.0e12,
        "NVIDIA A100-SXM4-40GB": 1.555e12,
        "NVIDIA L40S": 0.864e12,
    }
    assert {name: datasheet_bandwidth(name) for name in names} == names
    assert datasheet_bandwidth("Tesla T4") is None  # measured instead
