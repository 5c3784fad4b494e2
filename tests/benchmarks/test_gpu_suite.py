"""The prepared GPU suite and the real-size benchmark run end to end at smoke size on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(script: str, *args: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        cwd=tmp,
        timeout=240,
        check=False,
    )


@pytest.mark.slow
def test_gpu_suite_smoke_writes_json_and_markdown(tmp_path: Path) -> None:
    out, md = tmp_path / "gpu.json", tmp_path / "gpu.md"
    proc = _run("gpu_suite.py", "--smoke", "--out", str(out), "--markdown", str(md), tmp=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    ours = [r for r in rows if r["what"] == "ours"]
    assert {r["model"] for r in ours} == {"resnet18", "gpt"}
    assert all(r["converged"] and r["hvps"] > 0 for r in ours)
    # Where the anchor file is present, our eigenvalues match its reference Lanczos.
    for r in ours:
        if r["rel_err"] is not None:
            assert r["rel_err"] < 1e-3, r
    whats = {r["what"] for r in rows}
    assert {"adamw_train_step", "alpha_curvature_exponents", "delta2_stabilization"} <= whats
    assert "| resnet18 |" in md.read_text()
    # Issue 16's in-training figures: a default round's cost in steps, warm λ_max products.
    trained = {r["what"]: r for r in rows if "target" in r}
    assert set(trained) == {"default_round_in_steps", "warm_lambda_max_hvps"}
    assert trained["default_round_in_steps"]["value"] > 0
    assert all(n > 0 for n in trained["default_round_in_steps"]["round_hvps"])
    assert trained["warm_lambda_max_hvps"]["converged"]
    assert trained["warm_lambda_max_hvps"]["value"] >= 1
    assert "default_round_in_steps" in md.read_text()


@pytest.mark.slow
def test_real_sizes_quick_speed_section(tmp_path: Path) -> None:
    out = tmp_path / "real.json"
    proc = _run(
        "real_sizes.py",
        "--quick",
        "--ks",
        "1",
        "--sections",
        "speed",
        "--out",
        str(out),
        tmp=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    (row,) = data["speed"]
    assert row["ours"]["converged"] and 0.0 <= row["ours"]["overhead"] < 1.0
    if "curvlinops" in row:  # a peer installed: the same eigenvalue
        assert row["agree"] < 1e-3
