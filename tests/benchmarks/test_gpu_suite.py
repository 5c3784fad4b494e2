"""The benchmark scripts that run in the suite: the GPU suite, real sizes and the product check."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.benchmarks._scripts import benchmark_module, run_script


@pytest.mark.slow
def test_gpu_suite_smoke_writes_json_and_markdown(tmp_path: Path) -> None:
    out, md = tmp_path / "gpu.json", tmp_path / "gpu.md"
    proc = run_script(
        "gpu_suite.py", "--smoke", "--out", str(out), "--markdown", str(md), tmp=tmp_path
    )
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
    assert not [r for r in rows if "error" in r]
    routes = [r for r in rows if r["what"] == "route"]  # calibrated once per model, both timed
    assert len(routes) == 2 and all(len(r["seconds_per_product"]) == 2 for r in routes)
    route_of = {r["model"]: r["route"] for r in routes}
    assert all(r["route"] == route_of[r["model"]] for r in ours)
    checks = [r for r in rows if r["what"] == "product_symmetry"]  # the monitor's check
    assert len(checks) == 2 and all(r["defect"] < 1e-4 for r in checks)
    assert "symmetry defect" in md.read_text()
    # route="compiled" timed beside the double backward, without falling back, on both models.
    compiled = [r for r in rows if r["what"] == "compiled_route"]
    assert {r["model"] for r in compiled} == {"resnet18", "gpt"}
    assert all(r["route"] == "compiled" and r["rel_diff"] < 1e-4 for r in compiled)
    assert all(r["compile_seconds"] > r["seconds_per_product"] > 0 for r in compiled)
    assert all(r["block_compile_seconds"] > r["block_seconds_per_vector"] > 0 for r in compiled)
    assert "route `compiled`" in md.read_text()
    assert "| resnet18 |" in md.read_text()
    # Issue 16's in-training figures: a default round's cost in steps, warm λ_max products.
    trained = {r["what"]: r for r in rows if "target" in r}
    rounds = ("default_round_in_steps", "default_round_in_steps_eigenvalue")
    assert set(trained) == {*rounds, "warm_lambda_max_hvps"}
    for name, criterion in zip(rounds, ("residual", "eigenvalue"), strict=True):
        assert trained[name]["criterion"] == criterion
        assert trained[name]["value"] > 0
        assert all(n > 0 for n in trained[name]["round_hvps"])
        shares = trained[name]["probe_in_steps"]
        assert set(shares) == {"Sharpness", "UpdateCurvature", "Trace"}
        assert all(v > 0 for v in shares.values())
    assert trained["warm_lambda_max_hvps"]["converged"]
    assert trained["warm_lambda_max_hvps"]["value"] >= 1
    assert "default_round_in_steps" in md.read_text()


@pytest.mark.slow
def test_real_sizes_quick_speed_section(tmp_path: Path) -> None:
    out = tmp_path / "real.json"
    proc = run_script(
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


def _gpu_suite() -> Any:
    return benchmark_module("gpu_suite")


def test_gpu_suite_refuses_to_run_without_the_anchor_outside_smoke(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without anchor_gpu.py a full run would measure stand-in models: it stops instead."""
    suite = _gpu_suite()
    assert suite.main(["--anchor", str(tmp_path / "missing.py"), "--out", str(tmp_path / "o")]) == 2
    assert "gpu_prepare.sh" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_gpu_suite_rows_written_as_they_come_and_failures_listed(tmp_path: Path) -> None:
    suite = _gpu_suite()
    meta = {"device_name": "H100", "date_utc": "2026-12-07T00:00:00Z", "command": "c"}
    meta |= {"torch": "2.11", "source": "abc"}
    out, md = tmp_path / "g.json", tmp_path / "g.md"
    rec = suite.Recorder(meta, str(out), str(md), budget=1e9)
    rec.emit(model="gpt", params=11_100_000, what="ours", k=5, seconds=1.5, hvps=40, rel_err=1e-6)
    assert len(json.loads(out.read_text())["rows"]) == 1  # on disk before the next section
    assert rec.section("gpt", "alpha", lambda: 1 / 0) is False  # a failure is a row
    per = {"functorch": 0.04}
    rec.emit(model="resnet18", what="route", route="functorch", seconds_per_product=per)
    rec.emit(model="resnet18", params=11e6, what="default_round_in_steps", value=None, target=100)
    rec.emit(model="", what="curvlinops_eigsh", skipped="curvlinops or scipy not importable")
    rec.budget = -1.0
    assert rec.section("gpt2s", "model", lambda: None) is False
    rows = json.loads(out.read_text())["rows"]
    assert [r["what"] for r in rows][-1] == "model" and "time budget" in rows[-1]["skipped"]
    text = md.read_text()
    assert "| gpt | 11.1 M | ours | 5 | 1.500 | 40 | 1.0e-06 |" in text
    assert "route `functorch` (functorch 40.0 ms per product)" in text
    assert "| resnet18 | 11 M | default_round_in_steps |  | ≤ 100 |" in text
    assert "- gpt alpha: ZeroDivisionError" in text
    assert "- gpt2s model: time budget spent" in text
    assert "curvlinops or scipy not importable" in text


def test_gpu_suite_deadline_stops_a_section_and_long_ones_need_time(tmp_path: Path) -> None:
    import time

    suite = _gpu_suite()
    meta = {"device_name": "H100", "date_utc": "2026-12-07T00:00:00Z", "command": "c"}
    out = tmp_path / "g.json"
    spent = time.perf_counter() - suite.T_START  # budgets count from the suite's start
    rec = suite.Recorder(
        meta | {"torch": "2.11", "source": "abc"}, str(out), None, 1e9, spent + 0.3
    )
    started = time.perf_counter()
    assert rec.section("gpt", "compiled_route", lambda: time.sleep(30)) is False
    assert time.perf_counter() - started < 10  # stopped at the deadline, not after 30 s
    assert rec.section("gpt", "next", lambda: None) is False  # nothing left to start with
    rows = json.loads(out.read_text())["rows"]
    assert "Deadline" in rows[0]["error"] and "left" in rows[1]["skipped"]

    def swallowing() -> None:  # as the monitor's fault isolation and the anchor's peers do
        for _ in range(30):
            try:
                time.sleep(1)
            except Exception:
                pass

    rec.deadline = time.perf_counter() - suite.T_START + 0.3
    started = time.perf_counter()
    assert rec.section("gpt", "peers", swallowing) is False
    assert time.perf_counter() - started < 10
    assert "Deadline" in json.loads(out.read_text())["rows"][-1]["error"]
    rec.deadline = time.perf_counter() - suite.T_START + 60
    assert rec.section("gpt", "anchor_peers", lambda: None, needs_s=120) is False
    assert rec.section("gpt", "quick", lambda: None, needs_s=1) is True
    assert "the section needs 120" in json.loads(out.read_text())["rows"][-1]["skipped"]
    assert not (tmp_path / "g.json.tmp").exists()  # replaced whole


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True:UserWarning")
def test_gpu_suite_peers_rows_arrive_as_the_anchor_emits_them(tmp_path: Path) -> None:
    import argparse
    import types

    suite = _gpu_suite()
    anchor = types.ModuleType("fake_anchor")
    model = torch.nn.Linear(2, 1)
    code = """
OUT = []
def emit(**kw):
    OUT.append(kw)
def problem(name, device, tiny):
    return MODEL, None, None, None
def run(name, device, tiny, ks, truth_m, skip_peers):
    m = problem(name, device, tiny)[0]
    m(TORCH.ones(3, 2)).sum().backward(create_graph=True)  # as PyHessian leaves them
    emit(model=name, what="params", value=3)
    emit(model=name, what="pyhessian_power", k=1, secs=0.5, hvps=7, max_iter=None)
    raise RuntimeError("killed")
"""
    anchor.__dict__.update(MODEL=model, TORCH=torch)
    exec(code, anchor.__dict__)
    meta = {"device_name": "H100", "date_utc": "2026-12-07T00:00:00Z", "command": "c"}
    rec = suite.Recorder(meta | {"torch": "2.11", "source": "abc"}, None, None, 1e9)
    args = argparse.Namespace(device="cpu", smoke=True, truth_m=None)
    ran = rec.section("gpt", "anchor_peers", lambda: suite.peers(rec, anchor, "gpt", [1], args))
    assert ran is False
    assert [r["what"] for r in rec.rows] == [
        "anchor:params",
        "anchor:pyhessian_power (max_iter default)",
        "anchor_peers",
    ]
    assert rec.rows[1]["seconds"] == 0.5 and rec.rows[1]["params"] == 3
    assert "killed" in rec.rows[2]["error"]
    assert len(anchor.OUT) == 2 and anchor.emit is anchor.__dict__["emit"]  # restored
    assert all(p.grad is None for p in model.parameters())  # no graph kept alive


@pytest.mark.slow
def test_product_symmetry_quick_run_separates_fused_kernels(tmp_path: Path) -> None:
    out = tmp_path / "symmetry.json"
    proc = run_script("product_symmetry.py", "--quick", "--out", str(out), tmp=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert len(result["floors"]) == 4 and all(r["defect"] < 1e-4 for r in result["floors"])
    for row in result["kernels"]:
        assert row["double_backward_defect"] > 0.1 > 1e-4 > row["finite_difference_defect"]
        fd, ref = row["lambda_max_finite_difference"], row["lambda_max_reference"]
        assert abs(fd - ref) < 1e-3 * ref < abs(row["lambda_max_double_backward"] - ref)
