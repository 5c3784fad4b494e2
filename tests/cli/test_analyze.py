"""``lightning-landscape analyze`` / ``compare`` end to end.

``analyze``, ``compare`` and one error case run as real subprocesses (``python -m
lightning_landscape.cli``), all started at once in a module fixture so their ~5 s torch imports
overlap; the comparison of a checkpoint with itself, the help texts and the other error cases call
:func:`lightning_landscape.cli.main` in-process (same code path, exit code and stderr) to keep the
file fast.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

import lightning_landscape as ll
from lightning_landscape.callbacks.data import silenced, training_step_loss
from lightning_landscape.cli import main
from tests._lightning import ClassifierModule, SyntheticDataModule, make_dataset, trainer_kwargs

REPO = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

CONFIG = """\
seed_everything: 0
trainer:  # ignored by analyze/compare, even where it could not be instantiated here
  max_steps: 10
  devices: 8
  callbacks:
    - class_path: not_a_package.NotACallback
model:
  class_path: tests._lightning.ClassifierModule
  init_args:
    hidden: 16
data:
  class_path: tests._lightning.SyntheticDataModule
  init_args:
    num_samples: 256
optimizer: torch.optim.Adam
"""


def _fit(model: pl.LightningModule, steps: int, path: Path) -> None:
    trainer = pl.Trainer(**trainer_kwargs(max_steps=steps, default_root_dir=path.parent))
    trainer.fit(model, datamodule=SyntheticDataModule())
    trainer.save_checkpoint(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli_analyze")
    paths = {
        "a": root / "step10.ckpt",
        "b": root / "step40.ckpt",
        "other": root / "hidden7.ckpt",
        "config": root / "config.yaml",
        "root": root,
    }
    with ll.fork_rng():
        torch.manual_seed(0)
        model = ClassifierModule()
        _fit(model, 10, paths["a"])
        _fit(model, 40, paths["b"])  # continues from step 10's weights
        _fit(ClassifierModule(hidden=7), 2, paths["other"])
    paths["config"].write_text(CONFIG)
    return paths


@pytest.fixture(scope="module")
def runs(files: dict[str, Path]) -> Iterator[dict[str, subprocess.CompletedProcess[str]]]:
    """Every subprocess run, started concurrently, keyed by name."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cfg, root = str(files["config"]), files["root"]
    a, b, other = str(files["a"]), str(files["b"]), str(files["other"])
    all_probes = "eigen,trace,batch_sharpness,density,alpha,delta2,slice"
    commands: dict[str, list[str]] = {
        "analyze": [
            *("analyze", a, "--config", cfg, "--device", "cpu", "--out", str(root / "an")),
            *("--probes", all_probes, "--top-k", "3"),
        ],
        "compare": [
            *("compare", a, b, "--config", cfg, "--out", str(root / "ab")),
            *("--top-k", "3", "--steps", "11", "--no-progress"),
        ],
        "mismatch": ["analyze", other, "--config", cfg, "--out", str(root / "bad")],
    }
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "lightning_landscape.cli", *args],
            cwd=root,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, args in commands.items()
    }
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=240)
        results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    yield results


def _ok(res: subprocess.CompletedProcess[str]) -> None:
    assert res.returncode == 0, f"stdout:\n{res.stdout}\nstderr:\n{res.stderr}"


def _reference_lambda_max(ckpt: Path, k: int) -> float:
    """λ_max of the training loss's Hessian: the first 256 samples (unshuffled) in chunks of the
    training batch size (16), BatchNorm on each chunk's own statistics."""
    model = ClassifierModule()
    model.load_state_dict(torch.load(ckpt, weights_only=False)["state_dict"])
    chunks = ll.split_batch(make_dataset(256, seed=0).tensors, 16)

    def loss_fn(m: torch.nn.Module, b: Any) -> torch.Tensor:
        return training_step_loss(model, b)

    with silenced(model), ll.curvature_context(model, norm_statistics="batch"):
        op = ll.HessianOperator(model, loss_fn, chunks)
        return float(ll.lanczos(op, k).eigenvalues[0])


def test_analyze_end_to_end(
    runs: dict[str, subprocess.CompletedProcess[str]], files: dict[str, Path]
) -> None:
    res = runs["analyze"]
    _ok(res)
    assert "Traceback" not in res.stderr
    for word in ("λ_max", "λ_min", "trace", "negative mass", "α group", "Δ₂^(D)", "slice"):
        assert word in res.stdout
    assert "global step 10" in res.stdout
    for probe in ("sharpness", "density", "slice"):  # progress on stderr
        assert probe in res.stderr
    out = files["root"] / "an"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["global_step"] == 10 and summary["num_samples"] == 256
    assert summary["probes"] == [
        "sharpness",
        "trace",
        "batch_sharpness",
        "density",
        "delta2",
        "alpha",
        "slice",
    ]
    check = summary["product_check"]  # the products' symmetry, checked before the probes
    assert check["route"] == "double_backward" and check["defect"] < 1e-4
    assert check["num_hvps"] == 4 and not check["switched"]
    batch = summary["batch_sharpness"]  # batches of the config's training batch size
    assert batch["batch_size"] == 16 and batch["num_batches"] >= 10 and batch["stderr"] > 0
    lam = summary["sharpness"]["lambda_max"]  # "eigen" on the command line is its old name
    assert lam == pytest.approx(_reference_lambda_max(files["a"], 3), rel=1e-3)
    eigenvalues = summary["sharpness"]["eigenvalues"]
    assert eigenvalues[0] == lam and len(eigenvalues) == 3
    assert summary["sharpness"]["lambda_min"] <= lam
    assert summary["trace"]["trace"] > 0
    assert 0.0 <= summary["density"]["negative_mass"] <= 1.0
    assert set(summary["alpha"]["layers"]) == {"net.0.weight", "net.4.weight"}
    assert summary["delta2"]["k"] == 255
    assert len(summary["slice"]["losses"]) == 21
    for png in ("density.png", "alpha_fit.png", "loss_slice.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out), size_guidance={"scalars": 0, "images": 0}).Reload()
    tags = acc.Tags()
    events = acc.Scalars("landscape/lambda_max")
    assert [e.step for e in events] == [10]
    assert events[0].value == pytest.approx(lam, rel=1e-6)
    for tag in ("landscape/eigenvalues/2", "landscape/lambda_min", "landscape/trace"):
        assert tag in tags["scalars"]
    for tag in ("landscape/negative_mass", "landscape/alpha/net.0.weight", "landscape/delta2_D"):
        assert tag in tags["scalars"]
    images = {"landscape/density", "landscape/alpha_fit", "landscape/loss_slice"}
    assert images <= set(tags["images"])


def test_compare_end_to_end(
    runs: dict[str, subprocess.CompletedProcess[str]], files: dict[str, Path]
) -> None:
    res = runs["compare"]
    _ok(res)
    assert "B/A" in res.stdout and "barrier" in res.stdout
    out = files["root"] / "ab"
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["global_step_a"], summary["global_step_b"]) == (10, 40)
    la, lb = summary["eigenvalues_a"], summary["eigenvalues_b"]
    assert len(la) == len(lb) == 3
    assert la[0] == pytest.approx(_reference_lambda_max(files["a"], 3), rel=1e-3)
    assert lb[0] == pytest.approx(_reference_lambda_max(files["b"], 3), rel=1e-3)
    assert summary["ratio_b_over_a"][0] == pytest.approx(lb[0] / la[0])
    assert [c["switched"] for c in summary["product_check"]] == [False, False]  # A, then B
    conn = summary["connectivity"]
    assert conn["barrier"] >= 0.0 and len(conn["losses"]) == 11
    assert conn["loss_a"] == pytest.approx(summary["probe_loss_a"], rel=1e-5)
    assert conn["loss_b"] == pytest.approx(summary["probe_loss_b"], rel=1e-5)
    for png in ("spectra.png", "connectivity.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC


def test_subprocess_error(runs: dict[str, subprocess.CompletedProcess[str]]) -> None:
    bad = runs["mismatch"]
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr
    assert "'net.0.weight'" in bad.stderr and "does not match the checkpoint" in bad.stderr


def _in_process(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``main(argv)`` with the global RNGs and ``PL_GLOBAL_SEED`` left as they were."""
    saved = os.environ.get("PL_GLOBAL_SEED")
    try:
        with ll.fork_rng():
            code = main(argv)
    except SystemExit as exit_:  # argparse (help, usage errors)
        code = int(exit_.code or 0)
    finally:
        if saved is None:
            os.environ.pop("PL_GLOBAL_SEED", None)
        else:
            os.environ["PL_GLOBAL_SEED"] = saved
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_compare_with_itself(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, cfg = str(files["a"]), str(files["config"])
    argv = ["compare", a, a, "--config", cfg, "--out", str(tmp_path), "--steps", "5"]
    code, out, err = _in_process([*argv, "--top-k", "2", "--no-progress"], capsys)
    assert code == 0, err
    assert "barrier: 0 at t = 0" in out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["connectivity"]["barrier"] == 0.0
    assert summary["eigenvalues_a"] == summary["eigenvalues_b"]
    assert summary["ratio_b_over_a"] == [1.0, 1.0]


def test_compare_measures_both_spectra_alike_when_one_check_switches(
    files: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """B's products fail the symmetry check (faked): A is measured again by finite differences."""
    import lightning_landscape.cli.compare as compare_cli

    routes: list[str] = []

    def fake_check(ctx: ll.probes.ProbeContext, seed: int) -> dict[str, object]:
        routes.append(ctx.route)
        if len(routes) == 2:  # B's
            ctx.use_route("finite_difference")
        return {"route": "double_backward", "switched": len(routes) == 2}

    measured: list[str] = []  # the route of each spectrum
    run = compare_cli.Sharpness.run

    def counted_run(self: ll.Sharpness, ctx: ll.probes.ProbeContext) -> object:
        measured.append(ctx.route)
        return run(self, ctx)

    monkeypatch.setattr(compare_cli, "checked_products", fake_check)
    monkeypatch.setattr(compare_cli.Sharpness, "run", counted_run)
    a, cfg = str(files["a"]), str(files["config"])
    argv = ["compare", a, a, "--config", cfg, "--out", str(tmp_path), "--steps", "3"]
    code, _, err = _in_process([*argv, "--top-k", "2", "--no-progress"], capsys)
    assert code == 0, err
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["route"] == "finite_difference" and len(summary["product_check"]) == 2
    assert routes == ["auto", "auto"]  # A's re-measurement is not checked again
    assert measured == ["auto", "finite_difference", "finite_difference"]  # A, B, A again
    # Same checkpoint, same route: the same spectrum (to the finite differences' accuracy).
    assert summary["eigenvalues_a"] == pytest.approx(summary["eigenvalues_b"], rel=1e-6)


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _in_process(["analyze", "--help"], capsys)
    assert code == 0
    for word in ("CKPT", "--config", "--probes", "--top-k", "--num-samples", "--out", "example"):
        assert word in out
    code, out, _ = _in_process(["compare", "--help"], capsys)
    assert code == 0
    for word in ("CKPT_A", "CKPT_B", "--config", "--top-k", "--steps", "--out", "example"):
        assert word in out
    code, out, _ = _in_process(["--help"], capsys)
    assert code == 0 and "analyze" in out and "compare" in out and "demo" in out


def test_errors_in_process(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, cfg, other = str(files["a"]), str(files["config"]), str(files["other"])
    no_model = tmp_path / "no_model.yaml"
    no_model.write_text("model:\n  init_args:\n    hidden: 3\ndata:\n  class_path: x.Y\n")
    no_data = tmp_path / "no_data.yaml"
    no_data.write_text("model:\n  class_path: tests._lightning.ClassifierModule\n")
    no_state = tmp_path / "weights.ckpt"
    torch.save({"weights": {}}, no_state)
    cases = [
        (["analyze", str(tmp_path / "nope.ckpt"), "--config", cfg], "checkpoint file"),
        (["analyze", a, "--config", str(tmp_path / "nope.yaml")], "config file"),
        (["analyze", a, "--config", str(no_model)], "no `model:` entry with a `class_path:`"),
        (["compare", a, a, "--config", str(no_data)], "no `data:` entry with a `class_path:`"),
        (["analyze", str(no_state), "--config", cfg], "has no `state_dict`"),
        (["analyze", a, "--config", cfg, "--probes", "eigen,hessian"], "unknown probe name"),
        (
            ["analyze", a, "--config", cfg, "--top-k", "1000"],
            "top_k=1000 exceeds the 227 probed parameters",
        ),
        (
            ["analyze", a, "--config", cfg, "--model-class", "tests._lightning.AdamModule"],
            "but --model-class says 'tests._lightning.AdamModule'",
        ),
        (["compare", a, other, "--config", cfg], "does not have the architecture"),
    ]
    for argv, message in cases:
        code, out, err = _in_process([*argv, "--out", str(tmp_path / "out")], capsys)
        assert code == 2, (argv, out, err)
        assert message in err, (argv, err)
        assert "Traceback" not in err
    assert not (tmp_path / "out").exists()  # nothing written on errors


def test_analyze_takes_the_lightningcli_plain_form(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """examples/cli_config.yaml names no classes (examples/cli_train.py gives them to LightningCLI
    in code): analyze refuses it with a hint, and takes it with --model-class / --data-class."""
    from lightning_landscape.cli.demo import DigitsCNN, DigitsDataModule

    with ll.fork_rng():
        torch.manual_seed(0)
        model = DigitsCNN(lr=0.1)  # the config's `model: {lr: 0.1}`
        trainer = pl.Trainer(**trainer_kwargs(max_steps=3, default_root_dir=tmp_path))
        trainer.fit(model, datamodule=DigitsDataModule())
    ckpt = tmp_path / "digits.ckpt"
    trainer.save_checkpoint(ckpt)
    cfg = str(REPO / "examples" / "cli_config.yaml")
    base = ["analyze", str(ckpt), "--config", cfg, "--out", str(tmp_path / "out"), "--no-progress"]

    code, _, err = _in_process(base, capsys)
    assert code == 2 and "--model-class" in err and "Traceback" not in err

    classes = ["--model-class", "lightning_landscape.cli.demo.DigitsCNN"]
    classes += ["--data-class", "lightning_landscape.cli.demo.DigitsDataModule"]
    argv = [*base, *classes, "--probes", "sharpness,trace", "--num-samples", "64", "--top-k", "2"]
    code, out, err = _in_process(argv, capsys)
    assert code == 0, err
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["global_step"] == 3 and summary["num_samples"] == 64
    # The numbers are those of the checkpoint's weights on the datamodule's first 64 samples.
    dm = DigitsDataModule()
    dm.setup("fit")
    x = torch.stack([dm.train[i][0] for i in range(64)])
    y = torch.stack([dm.train[i][1] for i in range(64)])
    reference = DigitsCNN(lr=0.1)
    reference.load_state_dict(torch.load(ckpt, weights_only=False)["state_dict"])

    def loss_fn(m: torch.nn.Module, b: Any) -> torch.Tensor:
        return training_step_loss(reference, b)

    # BatchNorm on the batch's own statistics (64 samples: one chunk of the training batch size).
    with silenced(reference), ll.curvature_context(reference, norm_statistics="batch"):
        op = ll.HessianOperator(reference, loss_fn, [(x, y)])
        ref = ll.lanczos(op, 2, tol=1e-6)
    assert summary["sharpness"]["eigenvalues"] == pytest.approx(ref.eigenvalues.tolist(), rel=1e-3)
    assert summary["norm_statistics"] == "batch"
    assert "λ_max" in out and "trace" in out
