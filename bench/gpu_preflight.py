"""Before bench/gpu_check.sh measures anything: will the server import on this machine, at the versions it needs?

It checks what the machine would run once the wheels from .whl/ are installed (into `--site`): every
dependency in pyproject.toml (torch's floor, numpy below 2.5, ...) and every requirement of the wheels brought
along (transformers' own: regex, huggingface-hub, tokenizers, ...), each against the version importable here.
Each problem is one line, saying what is wanted and what is there; the exit status is 3 when there is one.
`NOT_NEEDED` is left out: pyproject's dependencies that bench/gpu_wheels.sh leaves behind (its LEFT_OUT) because
no section imports them: PyAV, bitsandbytes, jiwer.

    PYTHONPATH=/tmp/site:$PWD python3 bench/gpu_preflight.py --site /tmp/site
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import json
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
NOT_NEEDED = {"av", "bitsandbytes", "jiwer"}
"""pyproject dependencies the checks run without: bench/gpu_wheels.sh's LEFT_OUT (it says why)."""


def check(site: Path | None) -> tuple[list[str], list[str]]:
    """(problems, notes). Problems: a requirement missing or at a conflicting version, from pyproject's
    dependencies and the brought wheels' own. Notes: an exact pin of pyproject (`==`) that the image, not
    a wheel, answers with another version: its range is what matters there (torch>=2.6, numpy<2.5), and the
    image's accelerate or prometheus-client at another patch level is no reason to stop."""
    brought = set()
    wanted = [(Requirement(d), "pyproject.toml") for d in _pyproject()]
    if site is not None and site.is_dir():
        for dist in metadata.distributions(path=[str(site)]):
            brought.add(canonicalize_name(dist.metadata["Name"]))
            wanted += [(Requirement(text), f"{dist.metadata['Name']} {dist.version}") for text in dist.requires or []]
    problems: list[str] = []
    notes: list[str] = []
    for requirement, by in wanted:
        name = canonicalize_name(requirement.name)
        if name in NOT_NEEDED or (requirement.marker is not None and not requirement.marker.evaluate({"extra": ""})):
            continue
        version = _version(requirement.name)
        if version is not None and requirement.specifier.contains(version, prereleases=True):
            continue
        line = f"{name}: {by} wants {requirement.specifier or 'it'}, this machine has {version or 'none'}"
        pinned = all(spec.operator == "==" for spec in requirement.specifier) and len(requirement.specifier)
        into = notes if version is not None and pinned and by == "pyproject.toml" and name not in brought else problems
        if line not in into:
            into.append(line)
    return problems, notes


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _pyproject() -> list[str]:
    dependencies: list[str] = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return dependencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--site", type=Path, default=None, help="where the wheels from .whl/ were installed")
    parser.add_argument("--out", type=Path, default=None, help="append the JSON line here too")
    args = parser.parse_args()
    found, notes = check(args.site)
    line = json.dumps({"section": "preflight", "ok": not found, "problems": found, "notes": notes})
    print(line, flush=True)
    if args.out is not None:
        with args.out.open("a") as out:
            out.write(line + "\n")
    for problem in found:
        print(f"gpu_check: version conflict: {problem}", file=sys.stderr)
    sys.exit(3 if found else 0)


if __name__ == "__main__":
    main()
