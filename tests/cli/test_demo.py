"""The README's main job (the demo), the CLI entry point and the examples."""

import math
import runpy
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_landscape import cli
from lightning_landscape.cli.demo import format_table, main, run_demo

ROOT = Path(__file__).resolve().parents[2]


def test_demo_trains_probes_and_writes_tensorboard(tmp_path):
    monitor, run_dir = run_demo(
        max_epochs=1, max_steps=12, every_n_steps=5, top_k=2, log_dir=str(tmp_path), progress=False
    )
    steps = [r.step for r in monitor.history]
    assert steps == [0, 5, 10, 12]
    for report in monitor.history:
        assert math.isfinite(report.lambda_max) and report.lambda_max > 0
        assert report.lambda_min is not None and report.lambda_min <= report.lambda_max
        assert report.stability_ratio == pytest.approx(0.05 * report.lambda_max / 3.8)
    events = EventAccumulator(str(run_dir), size_guidance={"histograms": 0}).Reload()
    tags = events.Tags()
    for tag in ("landscape/lambda_max", "landscape/trace", "landscape/stability_ratio"):
        assert tag in tags["scalars"]
    assert [e.step for e in events.Scalars("landscape/lambda_max")] == steps
    assert "landscape/eigenvalues" in tags["histograms"]
    table = format_table(monitor.history)
    assert table.splitlines()[0].split()[:2] == ["step", "λ_max"]
    assert len(table.splitlines()) == 2 + len(steps)


def test_demo_main_prints_table_and_log_dir(tmp_path, capsys):
    code = main(
        [
            "--max-steps",
            "6",
            "--every-n-steps",
            "3",
            "--top-k",
            "2",
            "--log-dir",
            str(tmp_path),
            "--no-progress",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "TensorBoard logs:" in out and str(tmp_path) in out
    assert "λ_max" in out


def test_cli_dispatches_demo_help(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", "--help"])
    assert exc.value.code == 0
    assert "--every-n-steps" in capsys.readouterr().out


def test_cli_rejects_unknown_command(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bogus"])
    assert exc.value.code == 2


def test_functional_example_matches_dense(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["functional_api.py"])
    runpy.run_path(str(ROOT / "examples" / "functional_api.py"), run_name="__main__")
    lines = capsys.readouterr().out.splitlines()
    lanczos = lines[1].split("[")[1].split("]")[0]
    dense = lines[2].split("[")[1].split("]")[0]
    assert lanczos == dense  # printed to 6 decimals
