"""``benchmarks/warm_start.py --default-monitor`` with changed ``Sharpness`` settings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.benchmarks._scripts import benchmark_module, run_script

QUICK = ("--quick", "--default-monitor", "--models", "resnet", "--steps", "30", "--every", "15")


@pytest.mark.slow
def test_default_round_with_sharpness_settings_and_reference(tmp_path: Path) -> None:
    out = tmp_path / "round.json"
    settings = ["--sharpness", "top_k=2", "--sharpness", "criterion=eigenvalue", "--reference"]
    proc = run_script("warm_start.py", *QUICK, *settings, "--out", str(out), tmp=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert row["sharpness_overrides"] == {"top_k": 2, "criterion": "eigenvalue"}
    assert row["sharpness_criterion"] == "eigenvalue"
    assert row["median_round_in_steps"] is None  # the reference solves ran inside the rounds
    assert len(row["reference"]) == len(row["round_hvps"]) == 3  # steps 0, 15, 30
    assert [t["step"] for t in row["traces"]] == [0, 15, 30]
    assert all(t["method"] == "deflated" and t["stderr"] > 0 for t in row["traces"])
    for rec in row["reference"]:
        assert rec["reference_converged"] and len(rec["eigenvalues"]) == 2
        assert max(rec["relative_errors"]) < 1e-2  # the probe's default tol, 1e-3, and margin
        # λ_min to the solve's scale, the largest Ritz value magnitude
        scale = max(abs(rec["reference"][0]), abs(rec["reference_lambda_min"]))
        assert abs(rec["lambda_min"] - rec["reference_lambda_min"]) < 1e-2 * scale


def _options() -> Any:
    return benchmark_module("warm_start").options


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--sharpness", "top_k"), "NAME=VALUE"),
        (("--sharpness", "every_n_steps=5"), "--every"),
        (("--sharpness", "topk=2"), "--sharpness: "),
        (("--sharpness", "tol=-1"), "--sharpness: "),
        (("--criterion", "eigenvalue", "--sharpness", "criterion=residual"), "once"),
        (("--reference",), "--default-monitor"),
    ],
)
def test_bad_sharpness_settings_are_usage_errors(
    args: tuple[str, ...], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    monitor = () if "--reference" in args else QUICK
    with pytest.raises(SystemExit) as exit_:
        _options()([*monitor, *args])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_sharpness_settings_are_parsed_as_literals() -> None:
    args = _options()([*QUICK, "--sharpness", "tol=1e-2", "--sharpness", "lambda_min=False"])
    assert args.sharpness_settings == {"tol": 0.01, "lambda_min": False}
