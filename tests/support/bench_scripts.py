"""The scripts under bench/ as modules, for tests of their counting and sizing rules (bench/ is no package)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parents[2] / "bench"


def load(name: str) -> ModuleType:
    """bench/`name`.py, executed once per call, registered as `bench_<name>` (dataclasses look their module up
    in `sys.modules`)."""
    if str(BENCH) not in sys.path:  # a script imports its neighbours (bench/procs.py), as when run
        sys.path.append(str(BENCH))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
