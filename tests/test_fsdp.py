"""The monitor under FSDP2 (``fully_shard``, Lightning's ``ModelParallelStrategy``).

One torchrun launch of 2 gloo ranks on the CPU (``tests/_fsdp_worker.py``, bounded at
``LAUNCH_TIMEOUT_S``; on a hang it and every process it started are killed and these tests fail)
checks the sharded finite-difference operator against dense float64 Hessians of the same model
on the union of both ranks' probe samples, and a ``Trainer`` run with and without the monitor.
The refusals (FSDP1, tensor parallelism, probes and routes that need second-order autograd) run
in this process.
"""

from __future__ import annotations

import types
from typing import Any

import pytest
import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

from lightning_landscape import CurvatureExponent, LandscapeMonitor, Sharpness, Trace
from lightning_landscape.operators.sharded import check_fsdp2_parameters, local_tensor
from tests import _fsdp_worker as W
from tests._lightning import ClassifierModule
from tests._processes import Launch, torchrun_launch

LAUNCH_TIMEOUT_S = 240.0
RTOL = 1e-3  # the documented accuracy of the finite-difference route in float32


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory: pytest.TempPathFactory) -> Launch:
    outdir = tmp_path_factory.mktemp("fsdp")
    records = [outdir / f"fsdp.rank{r}.json" for r in (0, 1)]
    return torchrun_launch(
        ["-m", "tests._fsdp_worker", str(outdir)], "fsdp", outdir, records, LAUNCH_TIMEOUT_S
    )


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def test_launch_completes(fsdp: Launch) -> None:
    assert fsdp.returncode == 0, fsdp.tail()
    for rank in (0, 1):
        assert fsdp.get(rank, "finished") is True


# --------------------------------------------------------------------------------------------------
# The sharded operator against dense float64 truth
# --------------------------------------------------------------------------------------------------


def test_sharded_operator_matches_the_dense_hessian_of_the_union(fsdp: Launch) -> None:
    r0, r1 = fsdp.both("operator")
    ref = fsdp.get(0, "operator_reference")
    assert r0["converged"]
    assert r0["top"] == r1["top"]  # every rank took the same decisions
    for got, want in zip(r0["top"], ref["top"], strict=True):
        assert _rel(got, want) < RTOL, (r0["top"], ref["top"])
    assert r0["local_size"] + r1["local_size"] == r0["global_size"] == ref["size"]
    assert r0["local_size"] < ref["size"]  # each rank holds a slice only
    assert abs(r0["trace"] - ref["trace"]) < 4 * r0["trace_stderr"] + 1e-6
    assert _rel(r0["loss"], ref["loss"]) < 1e-6


def test_sharded_gradient_is_the_gradient_of_the_union(fsdp: Launch) -> None:
    got = fsdp.get(0, "operator")["gradient"]  # rank 0's slices, then rank 1's
    shards = fsdp.get(0, "operator_shards")  # per rank: slice size of every parameter
    pieces: list[list[float]] = [[] for _ in shards[0]]
    offset = 0
    for per_rank in shards:
        for i, size in enumerate(per_rank):
            pieces[i].extend(got[offset : offset + size])
            offset += size
    whole = [v for piece in pieces for v in piece]
    want = fsdp.get(0, "operator_reference")["gradient"]
    torch.testing.assert_close(
        torch.tensor(whole, dtype=torch.float64),
        torch.tensor(want, dtype=torch.float64),
        atol=1e-6,
        rtol=0,
    )


def test_sharded_operator_restores_parameters_and_gradients(fsdp: Launch) -> None:
    for res in fsdp.both("operator"):
        assert res["params_restored"] is True
        assert res["grads_restored"] is True


def test_nan_on_one_rank_is_seen_by_both(fsdp: Launch) -> None:
    for res in fsdp.both("nan"):
        assert res["finite"] is False


# --------------------------------------------------------------------------------------------------
# The monitor in a Trainer with ModelParallelStrategy
# --------------------------------------------------------------------------------------------------


def _landscape(records: list[Any]) -> list[tuple[int, dict[str, float]]]:
    return [(s, m) for s, m in records if any(k.startswith("landscape/") for k in m)]


def test_training_is_bit_identical_with_the_monitor(fsdp: Launch) -> None:
    for rank in (0, 1):
        assert fsdp.get(rank, "fit_plain")["global_step"] == W.MAX_STEPS
        assert fsdp.get(rank, "fit_monitor")["global_step"] == W.MAX_STEPS
        plain = torch.load(fsdp.outdir / f"shards_plain.rank{rank}.pt")
        watched = torch.load(fsdp.outdir / f"shards_monitor.rank{rank}.pt")
        assert plain.keys() == watched.keys()
        for name in plain:
            assert torch.equal(plain[name], watched[name]), name
    losses = [
        [m["train_loss"] for _, m in fsdp.get(0, key)["records"] if "train_loss" in m]
        for key in ("fit_plain", "fit_monitor")
    ]
    assert losses[0] == losses[1]


def test_monitor_logs_the_single_process_sharpness(fsdp: Launch) -> None:
    """The "done when" of issue 17: the logged sharpness equals one process's on the same data."""
    res = fsdp.get(0, "fit_monitor")
    ref = res["reference"]
    assert res["probe_sizes"] == [[13], [12]]  # the union is the 25 probe samples
    logged = dict(_landscape(res["records"]))
    final = logged[W.MAX_STEPS]
    assert final["landscape/converged"] == 1.0
    for i in range(W.TOP_K):
        assert _rel(final[f"landscape/eigenvalues/{i}"], ref["top"][i]) < RTOL
    assert abs(final["landscape/lambda_min"] - ref["min"]) < RTOL * ref["top"][0]
    assert _rel(final["landscape/preconditioned_lambda_max"], ref["preconditioned"]) < RTOL
    ratio = ref["preconditioned"] / final["landscape/stability_threshold"]
    assert _rel(final["landscape/stability_ratio"], ratio) < RTOL
    assert _rel(final["landscape/probe_loss"], ref["loss"]) < 1e-6
    assert abs(final["landscape/trace"] - ref["trace"]) < 4 * final["landscape/trace_stderr"]
    for tag in ("landscape/update/curvature", "landscape/negative_mass"):
        assert tag in final
    assert [s for s, _ in _landscape(res["records"])] == [0, 4, 8]
    assert res["num_failed"] == 0 and res["warnings"] == []


def test_monitor_logs_on_rank_zero_and_agrees_on_every_rank(fsdp: Launch) -> None:
    r0, r1 = fsdp.both("fit_monitor")
    assert _landscape(r1["records"]) == []
    assert len(_landscape(r0["records"])) == 3

    def timeless(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: v for k, v in h.items() if k != "seconds"} for h in history]

    assert timeless(r0["history"]) == timeless(r1["history"])
    assert {k: v for k, v in r0["update"].items() if k != "seconds"} == {
        k: v for k, v in r1["update"].items() if k != "seconds"
    }


def test_probes_without_sharding_support_are_refused_on_both_ranks(fsdp: Launch) -> None:
    for res in fsdp.both("fit_refused"):
        assert res["error"] == "ValueError"
        assert "CurvatureExponent cannot use" in res["message"]


# --------------------------------------------------------------------------------------------------
# Refusals in setup (this process)
# --------------------------------------------------------------------------------------------------


def _setup_with(strategy: Any, **monitor_kwargs: Any) -> None:
    trainer = types.SimpleNamespace(strategy=strategy, world_size=1)
    monitor = LandscapeMonitor(**monitor_kwargs)
    with torch.random.fork_rng(devices=[]):
        module = ClassifierModule()
    monitor.setup(trainer, module, "fit")  # type: ignore[arg-type]


def test_fsdp1_is_refused_with_the_fsdp2_recipe() -> None:
    with pytest.raises(RuntimeError, match=r"FSDPStrategy \(FSDP1\).*ModelParallelStrategy"):
        _setup_with(FSDPStrategy())
    _setup_with(FSDPStrategy(), enabled=False)


def test_model_parallel_is_accepted_with_sharding_probes() -> None:
    _setup_with(ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1))
    _setup_with(ModelParallelStrategy(), probes=[Sharpness(2), Trace()], route="finite_difference")


def test_tensor_parallelism_is_refused() -> None:
    with pytest.raises(RuntimeError, match="not tensor parallelism"):
        _setup_with(ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2))


def test_second_order_routes_and_probes_are_refused_under_fsdp2() -> None:
    for route in ("double_backward", "functorch", "compiled"):
        with pytest.raises(ValueError, match=f"route='{route}' needs second-order"):
            _setup_with(ModelParallelStrategy(), route=route)
    with pytest.raises(ValueError, match="CurvatureExponent cannot use"):
        _setup_with(ModelParallelStrategy(), probes=[Sharpness(2), CurvatureExponent()])


def test_unsharded_parameters_are_named() -> None:
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"parameter 'weight' is not sharded"):
        check_fsdp2_parameters(list(model.named_parameters()))
    assert local_tensor(model.weight) is model.weight
