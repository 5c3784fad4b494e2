"""Running a benchmark script the way a user would, for the suite's smoke tests."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]


def run_script(script: str, *args: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    """``python benchmarks/<script> <args>`` in ``tmp``, output captured, 240 s at most."""
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        cwd=tmp,
        timeout=240,
        check=False,
    )


def benchmark_module(name: str) -> ModuleType:
    """Import ``benchmarks/<name>.py`` as a module (the benchmarks folder goes on ``sys.path``,
    where the scripts import each other from)."""
    folder = str(ROOT / "benchmarks")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return importlib.import_module(name)
