"""Multi-process tests of the distributed probes: 2 CPU ranks on the gloo backend, loopback only.

Two launches of ``tests/_dist_worker.py`` under ``torch.distributed.run`` (module-scoped
fixtures) run every multi-process check; each rank writes its results to a JSON file and the tests
below assert on those files. A launch is bounded by ``LAUNCH_TIMEOUT_S``: on a hang the launcher
(torchrun) and every process it started are killed and the tests using that launch fail.
Each launch costs ~5 s of Python/Lightning start-up on top of its checks; the ``functional``
launch also waits ``SLEEP_S`` for the collective-timeout check.

* ``functional`` launch: the functional API and ``DistributedOperator`` on uneven shards against a
  single process on the union, the all-reduce cost model, failure agreement (exceptions inside
  products, NaN on one rank, helpers, rejected configurations) and the collective timeout.
* ``trainer`` launch: ``LandscapeMonitor`` in ``Trainer(strategy="ddp", devices=2)`` under torchrun.

The FSDP1/DeepSpeed refusals and the single-process fall-backs run in this process (FSDP2:
``tests/test_fsdp.py``).
"""

from __future__ import annotations

import itertools
import math
import types
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
)

from lightning_landscape import (
    LandscapeMonitor,
    curvature_context,
    deflated_trace,
    lanczos_ends,
)
from lightning_landscape.operators import HessianOperator
from lightning_landscape.operators.distributed import (
    DistributedOperator,
    agree_on_failure,
    distributed_world,
    weighted_mean,
)
from lightning_landscape.probes.base import join_columns
from tests import _dist_worker as W
from tests._lightning import ClassifierModule, make_dataloader, make_dataset, trainer_kwargs
from tests._models import KINDS, make_model, mlp_batch
from tests._processes import Launch, torchrun_launch

ROOT = Path(__file__).resolve().parents[2]
LAUNCH_TIMEOUT_S = 120.0
RANKS = (0, 1)


# --------------------------------------------------------------------------------------------------
# Launching
# --------------------------------------------------------------------------------------------------


def _launch(scenario: str, outdir: Path) -> Launch:
    return torchrun_launch(
        ["-m", "tests._dist_worker", scenario, str(outdir)],
        scenario,
        outdir,
        [outdir / f"{scenario}.rank{r}.json" for r in RANKS],
        LAUNCH_TIMEOUT_S,
    )


@pytest.fixture(scope="module")
def functional(tmp_path_factory: pytest.TempPathFactory) -> Launch:
    return _launch("functional", tmp_path_factory.mktemp("functional"))


@pytest.fixture(scope="module")
def trainer_run(tmp_path_factory: pytest.TempPathFactory) -> Launch:
    return _launch("trainer", tmp_path_factory.mktemp("trainer"))


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


def _assert_close_lists(got: list[float], want: list[float], rtol: float, what: str) -> None:
    assert len(got) == len(want), what
    for g, w in zip(got, want, strict=True):
        assert _rel(g, w) <= rtol, f"{what}: {got} vs {want}"


@pytest.mark.parametrize("scenario", ["functional", "trainer_run"])
def test_launch_completes(scenario: str, request: pytest.FixtureRequest) -> None:
    """Both ranks ran every check and exited cleanly, well within the launch bound."""
    launch: Launch = request.getfixturevalue(scenario)
    assert launch.returncode == 0, launch.tail()
    for rank in RANKS:
        assert launch.get(rank, "finished") is True
    assert launch.seconds < LAUNCH_TIMEOUT_S


# --------------------------------------------------------------------------------------------------
# a. The functional API over uneven shards equals one process on the union
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_functional_matches_single_process_on_union(functional: Launch, kind: str) -> None:
    """Shards of 7 and 13 samples (sequences); float64; k=3, tol=1e-10; Hutch++ with 30 HVPs."""
    res = functional.get(0, f"agreement_{kind}")
    for which in ("largest", "smallest"):
        dist_eig, ref = res["dist"][which], res["ref"][which]
        assert dist_eig["converged"] and ref["converged"], (which, dist_eig, ref)
        _assert_close_lists(dist_eig["values"], ref["values"], 1e-6, f"{kind} {which}")
    _assert_close_lists(
        [res["dist"]["trace"]["trace"]], [res["ref"]["trace"]["trace"]], 1e-6, f"{kind} trace"
    )
    assert res["dist"]["trace"]["num_hvps"] == 30
    # The shard alone has a clearly different spectrum, so the agreement is not a coincidence.
    for rank in RANKS:
        shard_top = functional.get(rank, f"agreement_{kind}")["shard_only_largest"]["values"][0]
        assert _rel(shard_top, res["ref"]["largest"]["values"][0]) > 1e-3
    assert all(functional.get(r, f"agreement_{kind}")["model_unchanged"] for r in RANKS)


@pytest.mark.parametrize("kind", KINDS)
def test_functional_results_are_bit_identical_on_every_rank(functional: Launch, kind: str) -> None:
    r0, r1 = functional.both(f"agreement_{kind}")
    # Eigenvalues, residuals, convergence flags, HVP counts and the trace: all bit-identical.
    assert r0["dist"] == r1["dist"]
    # distributed=None auto-detects the process group: identical to distributed=True.
    assert r0["explicit_largest"] == r0["dist"]["largest"]
    assert r1["explicit_largest"] == r1["dist"]["largest"]


def test_sync_batchnorm_normalises_each_rank_on_its_own(functional: Launch) -> None:
    r0, r1 = functional.both("sync_batchnorm")
    assert "crashed" not in r0, r0
    assert r0["layers"] > 0 and r0["restored"] and r1["restored"]
    dist_eig, ref = r0["dist"], r0["ref"]
    assert dist_eig["converged"] and ref["converged"], (dist_eig, ref)
    _assert_close_lists(dist_eig["values"], ref["values"], 1e-6, "SyncBatchNorm")
    assert r0["dist"] == r1["dist"]
    # Statistics over the union (what a synchronised forward would give) differ measurably.
    assert _rel(r0["union_statistics"]["values"][0], ref["values"][0]) > 1e-3


def test_compiled_route_on_every_rank(functional: Launch) -> None:
    """Each rank compiles its own product; the all-reduced spectrum is the uncompiled one's."""
    r0, r1 = functional.both("compiled")
    for r in (r0, r1):
        assert r["graphs"] >= 1 and not r["fell_back"]
        assert r["compiled"]["converged"]
        _assert_close_lists(r["compiled"]["values"], r["functorch"]["values"], 1e-10, "compiled")
    assert r0["compiled"] == r1["compiled"]  # bit-identical on both ranks


def test_all_reduce_cost_model(functional: Launch) -> None:
    """Cost model of ``DistributedOperator`` with ``n`` parameters.

    * construction: two all-reduces, MAX over 3 float64 (+size, −size, bad-weight flag) and
      SUM of the weight: the handshake;
    * every product of a block of ``b`` vectors (``matvec``: b = 1): exactly one all-reduce of
      ``(n + 1) · b`` values (the weighted local product plus a failure-flag row);
    * hence ``num_all_reduces = 2 + #products`` and ``floats_reduced = 4 + (n + 1) · num_matvecs``.

    Exercised with single-vector Lanczos, block Lanczos (b = 3), Hutch++ (b = 4) and a matvec.
    """
    r0, r1 = functional.both("cost_model")
    assert r0 == r1
    n = r0["size"]
    assert n == 155
    assert r0["handshake"] == [2, 4]
    products = r0["products"]
    assert {b for b, _, _ in products} == {1, 3, 4}
    for b, reduces, floats in products:
        assert reduces == 1 and floats == (n + 1) * b, (b, reduces, floats)
    assert r0["num_all_reduces"] == 2 + len(products)
    assert r0["num_matvecs"] == sum(b for b, _, _ in products) == r0["local_num_matvecs"]
    assert r0["floats_reduced"] == 4 + (n + 1) * r0["num_matvecs"]


# --------------------------------------------------------------------------------------------------
# b. Failures are agreed across ranks
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("route", ["double_backward", "functorch", "finite_difference"])
def test_exception_inside_a_product_raises_probe_failure_on_every_rank(
    functional: Launch, route: str
) -> None:
    """Rank 1's loss raises under grad (first product); rank 0's products succeed."""
    r0, r1 = functional.both(f"hvp_exception_{route}")
    assert r1["error"] == "ProbeFailure" and r1["cause"] == "RuntimeError", r1
    assert r1["message"] == "this rank's Hessian-vector product failed: injected failure on rank 1"
    assert r0["error"] == "ProbeFailure" and r0["cause"] is None, r0
    assert r0["message"] == "another rank's Hessian-vector product failed"
    # The loss was evaluated once without grad (building the operator), then failed in the first
    # product on rank 1; nobody waited on a collective the other rank skipped.
    assert r1["calls"] == {"no_grad": 1, "grad": 1}
    assert r0["calls"]["grad"] >= 1
    assert r0["seconds"] < 10 and r1["seconds"] < 10
    assert r0["model_unchanged"] and r1["model_unchanged"]
    # The collective schedule is still aligned: the next collective sums correctly.
    assert r0["in_step_after"] == r1["in_step_after"] == pytest.approx(1.65, abs=1e-15)


def test_nan_on_one_rank_reaches_every_rank(functional: Launch) -> None:
    """A NaN in rank 1's shard: both ranks get non-finite results after the same products."""
    r0, r1 = functional.both("nan_on_rank1")
    for key in ("largest", "smallest"):
        a, b = r0[key]["value"], r1[key]["value"]
        assert a["finite"] is False and b["finite"] is False, key
        assert a["converged"] is False and b["converged"] is False, key
        assert all(math.isnan(v) for v in a["values"] + b["values"]), key
        assert a["num_hvps"] == b["num_hvps"], key
    for r in (r0, r1):
        assert r["trace"]["value"]["finite"] is False and r["trace"]["value"]["num_hvps"] == 12
        assert r["in_step_after"] == pytest.approx(1.65, abs=1e-15)


def test_agree_on_failure(functional: Launch) -> None:
    for res in functional.both("helpers"):
        assert res["agree_rank1_only"] is True
        assert res["agree_rank0_only"] is True
        assert res["agree_all"] is True
        assert res["agree_none"] is False


def test_weighted_mean(functional: Launch) -> None:
    for res in functional.both("helpers"):
        assert res["weighted_mean"] == pytest.approx((7 * 1.0 + 13 * 2.0) / 20, abs=1e-15)
        assert res["weighted_mean_zero_weight"] == 2.0


def test_rejects_ranks_with_different_operator_sizes(functional: Launch) -> None:
    r0, r1 = functional.both("rejections")
    assert (r0["local_sizes"], r1["local_sizes"]) == (155, 56)
    for res in (r0, r1):
        assert res["size_mismatch"].get("error") == "ValueError", res["size_mismatch"]
        assert "differ in size" in res["size_mismatch"]["message"]


def test_rejects_non_positive_total_weight(functional: Launch) -> None:
    for res in functional.both("rejections"):
        assert res["zero_total_weight"]["error"] == "ValueError"
        assert "total weight over ranks must be positive" in res["zero_total_weight"]["message"]
        assert res["negative_weight"]["error"] == "ValueError"
        assert "weight must be finite and >= 0" in res["negative_weight"]["message"]
        assert res["in_step_after"] == pytest.approx(1.65, abs=1e-15)


def test_rank_with_zero_weight_contributes_nothing(functional: Launch) -> None:
    """Weights 0 and 13: the product on both ranks is exactly rank 1's local product."""
    r0, r1 = functional.both("rejections")
    assert r0["zero_weight_rank_product"] == r1["zero_weight_rank_product"] == r1["local_product"]
    assert r0["local_product"] != r1["local_product"]


# --------------------------------------------------------------------------------------------------
# c. Collective timeout
# --------------------------------------------------------------------------------------------------


def test_collective_timeout_turns_a_stalled_rank_into_an_error(functional: Launch) -> None:
    """Rank 1 stalls ``SLEEP_S`` s inside its first product; ``timeout=2 s`` on both ranks.

    Rank 0 raises gloo's timeout error after ~2 s instead of waiting; rank 1, once awake, fails
    at its next collective (rank 0 is gone) instead of hanging, and both processes exit.
    """
    r0, r1 = functional.both("timeout")
    assert r0["error"] == "RuntimeError" and "timed out" in r0["message"].lower(), r0
    assert W.TIMEOUT_S - 0.1 <= r0["seconds"] <= W.TIMEOUT_S + 3.0, r0
    assert r0["slept"] is False
    assert r1["slept"] is True
    assert "error" in r1, r1
    assert W.SLEEP_S - 0.1 <= r1["seconds"] <= W.SLEEP_S + 2 * W.TIMEOUT_S + 3.0, r1
    assert functional.returncode == 0, functional.tail()


# --------------------------------------------------------------------------------------------------
# d. LandscapeMonitor under Trainer(strategy="ddp", devices=2)
# --------------------------------------------------------------------------------------------------


def _timeless(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Probe reports without their wall-clock time (the only field that may differ by rank)."""
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


def _landscape_records(records: list[Any]) -> list[tuple[int, dict[str, float]]]:
    return [
        (step, metrics)
        for step, metrics in records
        if any(key.startswith("landscape/") for key in metrics)
    ]


def test_ddp_runs_two_ranks(trainer_run: Launch) -> None:
    for rank in RANKS:
        for key in ("fit_plain", "fit_monitor", "fit_fail_in_product"):
            res = trainer_run.get(rank, key)
            assert "error" not in res, res
            assert res["strategy"] == "DDPStrategy" and res["world_size"] == 2
            assert res["global_rank"] == rank and res["global_step"] == W.MAX_STEPS


def test_ddp_probe_data_is_strided_across_ranks(trainer_run: Launch) -> None:
    """Rank r takes samples r, r + 2, ... of the first 25: 13 on rank 0, 12 on rank 1."""
    x, y = make_dataset().tensors
    for rank in RANKS:
        (batch,) = trainer_run.get(rank, "fit_monitor")["probe"]
        idx = slice(rank, W.NUM_PROBE_SAMPLES, 2)
        assert batch[0] == x[idx].tolist()
        assert batch[1] == y[idx].tolist()
    assert [len(trainer_run.get(r, "fit_monitor")["probe"][0][0]) for r in RANKS] == [13, 12]


def test_ddp_monitor_logs_once_from_rank_zero(trainer_run: Launch) -> None:
    """Both ranks hold a live logger (Lightning logs ``train_loss`` to each); only rank 0 gets
    ``landscape/*``, in exactly one record per probe step."""
    steps = [0, 4, 8]
    r0, r1 = trainer_run.both("fit_monitor")
    assert any("train_loss" in m for _, m in r1["records"])  # rank 1's logger is called
    assert _landscape_records(r1["records"]) == []
    records = _landscape_records(r0["records"])
    assert [step for step, _ in records] == steps
    expected = {
        "landscape/lambda_max",
        "landscape/lambda_min",
        "landscape/trace",
        "landscape/trace_stderr",
        "landscape/probe_loss",
        "landscape/converged",
        "landscape/max_residual",
        "landscape/probe_failed",
        "landscape/cost/seconds",
        "landscape/cost/hvps",
        "landscape/cost/overhead",
        "landscape/stability_ratio",
        "landscape/stability_threshold",
        *(f"landscape/eigenvalues/{i}" for i in range(W.TOP_K)),
    }
    for (step, metrics), report in zip(records, r0["history"], strict=True):
        assert {k for k in metrics if k.startswith("landscape/")} == expected, step
        assert metrics["landscape/lambda_max"] == report["eigenvalues"][0]
        assert metrics["landscape/probe_failed"] == 0.0
    # The same probes ran on rank 1, with bit-identical results.
    assert [h["step"] for h in r1["history"]] == steps
    assert _timeless(r0["history"]) == _timeless(r1["history"])


def test_ddp_optimizer_aware_probes_agree_on_every_rank(trainer_run: Launch) -> None:
    """Under DDP with Adam: preconditioned sharpness, update curvature and batch sharpness are
    logged once from rank 0, and both ranks computed the same numbers."""
    r0, r1 = trainer_run.both("fit_adam")
    assert r0["num_failed"] == r1["num_failed"] == 0, r0["warnings"]
    assert _timeless(r0["history"]) == _timeless(r1["history"])
    records = dict(_landscape_records(r0["records"]))
    assert _landscape_records(r1["records"]) == []
    later = [step for step in records if step > 0]
    assert later
    for step in later:
        metrics = records[step]
        for key in (
            "landscape/preconditioned_lambda_max",
            "landscape/stability_ratio",
            "landscape/update/curvature",
            "landscape/batch_sharpness",
            "landscape/batch_sharpness_stderr",
        ):
            assert key in metrics and math.isfinite(metrics[key]), (step, key)
    first = records[0]
    assert "landscape/preconditioned_lambda_max" not in first  # no Adam state at step 0
    assert "landscape/update/curvature" not in first  # no step behind step 0
    assert "landscape/batch_sharpness" in first


def _load_state(launch: Launch, name: str, rank: int) -> dict[str, Any]:
    state: dict[str, Any] = torch.load(launch.outdir / f"state_{name}.rank{rank}.pt")
    return state


def _assert_states_equal(
    a: dict[str, Any], b: dict[str, Any], what: str, buffers: bool = True
) -> None:
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        if buffers or "running_" not in key:
            assert torch.equal(a["model"][key], b["model"][key]), f"{what}: {key}"
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for idx in sa:
        for name in sa[idx]:
            assert torch.equal(sa[idx][name], sb[idx][name]), f"{what}: optimizer {idx}.{name}"


def _initial_state() -> dict[str, torch.Tensor]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the worker's seed_everything(0) before building the module
        return ClassifierModule().state_dict()


def test_ddp_training_is_bit_identical_with_and_without_monitor(trainer_run: Launch) -> None:
    """Final weights, BN buffers and SGD momentum on rank 0 (what a checkpoint holds) are
    bit-identical with the monitor (also with a failed probe) and without it; rank 1 too."""
    for rank in RANKS:
        plain = _load_state(trainer_run, "plain", rank)
        for name in ("monitor", "product"):
            _assert_states_equal(_load_state(trainer_run, name, rank), plain, f"{name} r{rank}")
    for name in ("plain", "monitor", "product"):
        # DDP replicas share parameters and optimizer state; BatchNorm running statistics are
        # per rank (DDP only broadcasts rank 0's buffers at the start of each forward).
        r0, r1 = (_load_state(trainer_run, name, r) for r in RANKS)
        _assert_states_equal(r1, r0, f"{name} replicas", buffers=False)
    initial = _initial_state()
    trained = _load_state(trainer_run, "plain", 0)["model"]
    assert not torch.equal(trained["net.0.weight"], initial["net.0.weight"])  # it did train


def test_ddp_adaptive_cadence_is_agreed_between_ranks(trainer_run: Launch) -> None:
    """``max_overhead`` under DDP: the ranks' wall clocks differ, but the schedule is agreed, so
    both ranks probe at the same steps (no hang), within the ``every_n_steps`` floor, and
    training is bit-identical to the run without a monitor."""
    r0, r1 = trainer_run.both("fit_budget")
    for res in (r0, r1):
        assert "error" not in res, res
        assert res["global_step"] == W.MAX_STEPS
    steps = [h["step"] for h in r0["history"]]
    assert steps == [h["step"] for h in r1["history"]]
    assert steps[0] == 0 and steps[-1] == W.MAX_STEPS
    assert all(b - a <= 5 for a, b in itertools.pairwise(steps)), steps
    assert _timeless(r0["history"]) == _timeless(r1["history"])
    overheads = [m["landscape/cost/overhead"] for _, m in _landscape_records(r0["records"])]
    assert len(overheads) == len(steps) and all(0 < o < 1 for o in overheads)
    for rank in RANKS:
        plain = _load_state(trainer_run, "plain", rank)
        _assert_states_equal(_load_state(trainer_run, "budget", rank), plain, f"budget r{rank}")


def _probe_states(launch: Launch, rank: int) -> dict[int, dict[str, torch.Tensor]]:
    states: dict[int, dict[str, torch.Tensor]] = torch.load(
        launch.outdir / f"probe_states_monitor.rank{rank}.pt"
    )
    return states


def _single_process_probe(state: dict[str, torch.Tensor]) -> dict[str, float]:
    """The monitor's probe, in this process, on the first 25 samples of the dataset.

    As under DDP, BatchNorm normalises each rank's shard (samples r, r + 2, ...: 13 and 12,
    below the training batch size of 16) with its own statistics: the Hessian is the
    sample-weighted mean over the two shards.
    """
    with torch.random.fork_rng(devices=[]):
        module = ClassifierModule()
    module.load_state_dict(state)
    x, y = make_dataset().tensors
    n = W.NUM_PROBE_SAMPLES
    shards = [(x[r:n:2], y[r:n:2]) for r in RANKS]

    def loss_fn(m: Any, b: Any) -> torch.Tensor:
        loss: torch.Tensor = m.compute_loss(b)
        return loss

    with curvature_context(module, norm_statistics="batch"):
        op = HessianOperator(module, loss_fn, shards, route="double_backward", retain_graph=True)
        top, bottom = lanczos_ends(op, W.TOP_K, 1, tol=W.TOL, seed=0)  # as Sharpness does
        # The monitor's Trace takes the round's converged sharpness pairs as its sketch: the
        # top-k and, below them, λ_min's.
        assert top.eigenvectors is not None and bottom.eigenvectors is not None
        assert float(bottom.eigenvalues[0]) < float(top.eigenvalues.min())
        vectors = join_columns([top.eigenvectors, bottom.eigenvectors])
        values = torch.cat([top.eigenvalues, bottom.eigenvalues])
        probes = W.TRACE_HVPS - 2 * (W.TRACE_HVPS // 3)
        trace = deflated_trace(op, vectors, values, probes, seed=0)
        probe_loss = op.loss_value
    assert top.all_converged and bottom.all_converged
    return {
        "lambda_max": float(top.eigenvalues[0]),
        "lambda_1": float(top.eigenvalues[1]),
        "lambda_min": float(bottom.eigenvalues[0]),
        "trace": trace.trace,
        "probe_loss": probe_loss,
    }


def test_ddp_compiled_route_inside_a_trainer(trainer_run: Launch) -> None:
    """``LandscapeMonitor(route="compiled")`` under DDP: every rank compiles its shard's product
    without falling back, the ranks report the same probes, those equal the default route's,
    and training is bit-identical to training without the monitor."""
    for rank in RANKS:
        res = trainer_run.get(rank, "fit_compiled")
        assert "error" not in res, res
        assert res["graphs"] >= 1 and not res["fell_back"], res
        assert res["num_probes"] == 3 and res["num_failed"] == 0
        _assert_states_equal(
            _load_state(trainer_run, "compiled", rank),
            _load_state(trainer_run, "plain", rank),
            f"compiled r{rank}",
        )
    h0, h1 = (_timeless(trainer_run.get(r, "fit_compiled")["history"]) for r in RANKS)
    assert h0 == h1
    default = trainer_run.get(0, "fit_monitor")["history"]
    assert [h["step"] for h in h0] == [h["step"] for h in default] == [0, 4, 8]
    for got, want in zip(h0, default, strict=True):
        assert got["converged"]
        _assert_close_lists(got["eigenvalues"], want["eigenvalues"], 1e-4, f"step {got['step']}")
        assert _rel(got["lambda_min"], want["lambda_min"]) <= 1e-4
        assert _rel(got["trace"], want["trace"]) <= 1e-4
        assert got["probe_loss"] == want["probe_loss"]


def test_ddp_first_probe_matches_single_process(trainer_run: Launch) -> None:
    """Probe at train start on 13 + 12 samples vs one process on the first 25 samples with the
    same (initial) weights, float32: λ_max, λ_2, λ_min, Hutch++ trace and probe loss."""
    states = [_probe_states(trainer_run, rank)[0] for rank in RANKS]
    initial = _initial_state()
    for state in states:  # the weights the probe saw are the initial ones, on both ranks
        assert all(torch.equal(state[k], initial[k]) for k in initial)
    ref = _single_process_probe(initial)
    first = trainer_run.get(0, "fit_monitor")["history"][0]
    assert first["step"] == 0 and first["converged"]
    assert _rel(first["eigenvalues"][0], ref["lambda_max"]) <= 1e-4
    assert _rel(first["eigenvalues"][1], ref["lambda_1"]) <= 1e-4
    assert _rel(first["lambda_min"], ref["lambda_min"]) <= 1e-4
    # Same seed, so the same Hutch++ probes: only rounding separates the two estimates.
    assert _rel(first["trace"], ref["trace"]) <= 1e-4
    assert _rel(first["probe_loss"], ref["probe_loss"]) <= 1e-6


def test_ddp_later_probes_match_single_process_on_rank_zero_state(trainer_run: Launch) -> None:
    history = {h["step"]: h for h in trainer_run.get(0, "fit_monitor")["history"]}
    states = _probe_states(trainer_run, 0)
    for step in (4, 8):
        ref = _single_process_probe(states[step])
        assert _rel(history[step]["eigenvalues"][0], ref["lambda_max"]) <= 1e-4, step
        assert _rel(history[step]["probe_loss"], ref["probe_loss"]) <= 1e-6, step


def test_ddp_probe_failing_on_one_rank_is_skipped_on_every_rank(trainer_run: Launch) -> None:
    """Rank 1's loss raises inside the products of the 2nd probe (step 4): both ranks skip it,
    one warning on rank 0, ``landscape/probe_failed = 1`` logged once, the probe at step 8 runs."""
    r0, r1 = trainer_run.both("fit_fail_in_product")
    assert r1["raised"] >= 1 and r0["raised"] == 0
    for res in (r0, r1):
        assert res["global_step"] == W.MAX_STEPS
        assert res["num_probes"] == 3 and res["num_failed"] == 1
        assert [h["step"] for h in res["history"]] == [0, 8]
    skipped = [w for w in r0["warnings"] if "probe at step" in w]
    assert skipped == [  # one warning: Trace, due in the same round, shares the failed operator
        "LandscapeMonitor: the Sharpness probe at step 4 failed (another rank's Hessian-vector "
        "product failed); skipped."
    ]
    assert r1["warnings"] == []  # rank_zero_warn: nothing from rank 1
    failed = [
        (s, m["landscape/probe_failed"]) for s, m in r0["records"] if "landscape/probe_failed" in m
    ]
    assert failed == [(0, 0.0), (4, 1.0), (8, 0.0)]
    assert [s for s, m in r0["records"] if "landscape/lambda_max" in m] == [0, 8]
    assert _landscape_records(r1["records"]) == []
    assert all(math.isfinite(v) for h in r0["history"] for v in h["eigenvalues"])
    assert _timeless(r0["history"]) == _timeless(r1["history"])


def test_ddp_loss_failing_on_one_rank_while_building_the_operator_is_agreed(
    trainer_run: Launch,
) -> None:
    r0, r1 = trainer_run.both("fit_fail_in_construction")
    assert r1["raised"] >= 1
    for res in (r0, r1):
        assert "error" not in res, res
        assert res["global_step"] == W.MAX_STEPS
        assert res["num_failed"] == 1
        assert [h["step"] for h in res["history"]] == [0, 8]


# --------------------------------------------------------------------------------------------------
# e. Strategies that shard parameters are refused in setup
# --------------------------------------------------------------------------------------------------


def _setup_with(strategy: Any, **monitor_kwargs: Any) -> None:
    """``LandscapeMonitor.setup`` with a trainer stand-in holding a real strategy object."""
    trainer = types.SimpleNamespace(strategy=strategy, world_size=1)
    monitor = LandscapeMonitor(every_n_steps=5, top_k=2, **monitor_kwargs)
    with torch.random.fork_rng(devices=[]):
        module = ClassifierModule()
    monitor.setup(trainer, module, "fit")  # type: ignore[arg-type]


def test_monitor_refuses_fsdp_in_a_trainer() -> None:
    """The real path; Lightning 2.6 cannot even build FSDP on a CPU accelerator, then skip."""
    try:
        trainer = pl.Trainer(
            **trainer_kwargs(strategy="fsdp", callbacks=[LandscapeMonitor(every_n_steps=5)])
        )
    except ValueError as err:
        assert "requires a GPU" in str(err)
        pytest.skip(f"Lightning cannot build FSDP on CPU here ({err}); see the stub tests")
    with pytest.raises(RuntimeError, match=r"FSDPStrategy \(FSDP1\)"):
        trainer.fit(ClassifierModule(), make_dataloader())


def test_monitor_refuses_fsdp1_in_setup() -> None:
    with pytest.raises(RuntimeError, match=r"FSDPStrategy \(FSDP1\).*`enabled=False`"):
        _setup_with(FSDPStrategy())
    _setup_with(FSDPStrategy(), enabled=False)  # a disabled monitor does not object


def test_monitor_accepts_single_device_ddp_and_fsdp2_in_setup() -> None:
    _setup_with(SingleDeviceStrategy(torch.device("cpu")))
    _setup_with(DDPStrategy())
    _setup_with(ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1))


def test_monitor_refuses_deepspeed_in_setup() -> None:
    assert issubclass(DeepSpeedStrategy, DDPStrategy)
    # DeepSpeed is not installed: a DeepSpeedStrategy without __init__ is enough for isinstance.
    strategy = DeepSpeedStrategy.__new__(DeepSpeedStrategy)
    with pytest.raises(RuntimeError, match="DeepSpeedStrategy"):
        _setup_with(strategy)


# --------------------------------------------------------------------------------------------------
# Single-process fall-backs (no process group in this process)
# --------------------------------------------------------------------------------------------------


def test_without_a_process_group_everything_is_local() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        pytest.skip("another test left a process group initialised in this process")
    assert distributed_world() == 1
    assert agree_on_failure(True) is True and agree_on_failure(False) is False
    assert weighted_mean(3.5, 7.0) == 3.5
    model, loss_fn, _ = make_model("mlp")
    local = HessianOperator(model, loss_fn, [mlp_batch(9)], route="double_backward")
    op = DistributedOperator(local, weight=9.0)
    assert op.world_size == 1 and op.total_weight == 9.0
    block = torch.randn(
        local.size, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    assert torch.equal(op.matmat(block), local.matmat(block))
    assert op.num_all_reduces == 0 and op.floats_reduced == 0
    with pytest.raises(ValueError, match="total weight over ranks must be positive"):
        DistributedOperator(local, weight=0.0)
    with pytest.raises(ValueError, match="weight must be finite and >= 0"):
        DistributedOperator(local, weight=-1.0)
