"""Worker processes for ``tests/test_distributed.py`` (2 ranks, gloo, CPU).

Launched by the tests as::

    python -m torch.distributed.run --nproc_per_node=2 --master_addr=127.0.0.1 \
        --master_port=<free> -m tests._dist_worker <scenario> <outdir>

Each rank writes ``<outdir>/<scenario>.rank<r>.json``, rewritten after every check, so a crash or
a kill still leaves the results of the checks that ran. The tests assert on these files; nothing
is asserted here. Every collective a check issues is bounded (``timeout=`` on the library's
collectives, a short process-group timeout otherwise), and each scenario ends with the check that
deliberately leaves the process group out of step, after which both ranks leave with
``os._exit`` instead of tearing the group down.

Scenarios:

* ``functional``: the distributed functional API and ``DistributedOperator`` against single-process
  results, the all-reduce cost model, ``route="compiled"`` on every rank, ``SyncBatchNorm`` with
  batch statistics, failure agreement, and (last) the collective timeout.
* ``trainer``: ``LandscapeMonitor`` in ``Trainer(strategy="ddp", devices=2)`` (Lightning picks up
  torchrun's environment): runs without monitor, with monitor, with Adam, with
  ``route="compiled"``, with a probe failing on rank 1
  inside a product, and (last) with the loss failing on rank 1 while the operator is built.
"""

from __future__ import annotations

import copy
import datetime
import json
import math
import os
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

import lightning_landscape as ll
from lightning_landscape.operators import HessianOperator
from lightning_landscape.operators.distributed import (
    DistributedOperator,
    ProbeFailure,
    agree_on_failure,
    weighted_mean,
)
from lightning_landscape.solvers import hutchpp_trace, lanczos
from tests._models import KINDS, cnn_batch, lm_batch, make_model, mlp_batch

# Uneven shards: rank 0 holds the first 7 samples (sequences) of the union, rank 1 the next 13.
SIZES = (7, 13)
# Bound on every library collective in the checks that are not about timeouts.
BOUND = datetime.timedelta(seconds=30)
# Collective timeout check: rank 1 sleeps SLEEP_S before its first product, rank 0 waits TIMEOUT_S.
TIMEOUT_S = 2.0
SLEEP_S = 5.0
# Trainer scenario.
MAX_STEPS = 8
EVERY_N_STEPS = 4  # probes at steps 0 (train start), 4 and 8
NUM_PROBE_SAMPLES = 25  # rank 0 gets samples 0, 2, ..., 24 (13), rank 1 gets 1, 3, ..., 23 (12)
TOP_K = 2
TOL = 1e-4
TRACE_HVPS = 9
CONSTRUCTION_TIMEOUT_S = 3.0


class Recorder:
    """A JSON file of check results, rewritten atomically after every entry."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = {}

    def __setitem__(self, key: str, value: Any) -> None:
        self.data[key] = value
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data))
        os.replace(tmp, self.path)


def outcome(fn: Callable[[], Any]) -> dict[str, Any]:
    """Run ``fn``: its (JSON-able) value, or the exception it raised, and the seconds it took."""
    t0 = time.perf_counter()
    try:
        value = fn()
    except Exception as err:
        cause = err.__cause__
        return {
            "error": type(err).__name__,
            "message": str(err),
            "cause": None if cause is None else type(cause).__name__,
            "seconds": time.perf_counter() - t0,
        }
    return {"value": value, "seconds": time.perf_counter() - t0}


def fit_outcome(trainer: Any, module: Any, loader: Any) -> dict[str, Any]:
    """``outcome(trainer.fit(...))`` plus the monitor's warnings raised meanwhile."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = outcome(lambda: trainer.fit(module, loader))
    res["warnings"] = [str(w.message) for w in caught if "LandscapeMonitor" in str(w.message)]
    return res


def guarded(rec: Recorder, key: str, fn: Callable[[], Any]) -> None:
    """Record ``fn()`` under ``key``; an unexpected exception is recorded with its traceback."""
    try:
        rec[key] = fn()
    except Exception:
        rec[key] = {"crashed": traceback.format_exc()}


def eig(result: ll.EigenResult) -> dict[str, Any]:
    return {
        "values": result.eigenvalues.tolist(),
        "residuals": result.residuals.tolist(),
        "converged": result.all_converged,
        "finite": result.is_finite,
        "num_hvps": result.num_hvps,
    }


def union_batch(kind: str, n: int = sum(SIZES)) -> Any:
    if kind == "mlp":
        return mlp_batch(n, torch.float64, seed=11)
    if kind == "cnn":
        return cnn_batch(n, torch.float64, seed=11)
    return lm_batch(n, seed=11)


def take(batch: Any, start: int, stop: int) -> Any:
    if isinstance(batch, tuple):
        return tuple(t[start:stop] for t in batch)
    return batch[start:stop]


def shard_of(batch: Any, rank: int) -> Any:
    start = sum(SIZES[:rank])
    return take(batch, start, start + SIZES[rank])


def state_equal(model: nn.Module, saved: dict[str, Tensor]) -> bool:
    return all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------------------------------
# functional
# --------------------------------------------------------------------------------------------------


def check_agreement(rank: int, kind: str) -> dict[str, Any]:
    """Distributed results on uneven shards, and single-process results on the union."""
    model, loss_fn, _ = make_model(kind)
    union = union_batch(kind)
    shard = shard_of(union, rank)
    before = snapshot(model)
    dist_res: dict[str, Any] = {}
    ref: dict[str, Any] = {}
    for which in ("largest", "smallest"):
        # distributed=None: auto-detected from the initialised 2-rank process group.
        r = ll.hessian_eigenvalues(
            model, loss_fn, shard, k=3, tol=1e-10, which=which, timeout=BOUND
        )
        dist_res[which] = eig(r)
        r = ll.hessian_eigenvalues(
            model, loss_fn, union, k=3, tol=1e-10, which=which, distributed=False
        )
        ref[which] = eig(r)
    explicit = ll.hessian_eigenvalues(
        model, loss_fn, shard, k=3, tol=1e-10, distributed=True, timeout=BOUND
    )
    tr = ll.hessian_trace(model, loss_fn, shard, num_hvps=30, timeout=BOUND)
    dist_res["trace"] = {"trace": tr.trace, "stderr": tr.stderr, "num_hvps": tr.num_hvps}
    tr = ll.hessian_trace(model, loss_fn, union, num_hvps=30, distributed=False)
    ref["trace"] = {"trace": tr.trace, "stderr": tr.stderr, "num_hvps": tr.num_hvps}
    shard_only = ll.hessian_eigenvalues(model, loss_fn, shard, k=3, tol=1e-10, distributed=False)
    return {
        "dist": dist_res,
        "explicit_largest": eig(explicit),
        "ref": ref,
        "shard_only_largest": eig(shard_only),
        "model_unchanged": state_equal(model, before),
    }


def check_sync_batchnorm(rank: int) -> dict[str, Any]:
    """A ``SyncBatchNorm`` model with batch statistics over the uneven shards: each rank's shard
    is normalised with its own statistics (the synchronised forward has no double backward), so
    the result is one process's sample-weighted mean of the shards' Hessians."""
    model, loss_fn, _ = make_model("cnn")
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))
    union = union_batch("cnn")
    shards = [shard_of(union, r) for r in range(len(SIZES))]
    res = ll.hessian_eigenvalues(
        synced, loss_fn, shards[rank], k=3, tol=1e-10, norm_statistics="batch", timeout=BOUND
    )
    with ll.curvature_context(model, norm_statistics="batch"):
        op = HessianOperator(model, loss_fn, shards)  # weighted by the shards' sample counts
        ref = lanczos(op, 3, tol=1e-10)
        op.release()
    whole = ll.hessian_eigenvalues(  # one batch of 20: statistics over the union
        model, loss_fn, union, k=3, tol=1e-10, norm_statistics="batch", distributed=False
    )
    layers = [m for m in synced.modules() if isinstance(m, nn.SyncBatchNorm)]
    return {
        "dist": eig(res),
        "ref": eig(ref),
        "union_statistics": eig(whole),
        "layers": len(layers),
        "restored": all("forward" not in m.__dict__ and not m.training for m in layers),
    }


def check_compiled(rank: int) -> dict[str, Any]:
    """``route="compiled"`` under DDP: each rank compiles its shard's product (``aot_eager``, as
    the single-process tests) and the all-reduced results equal the uncompiled route's."""
    from tests._compile import recording_compile

    graphs: list[Any] = []
    model, loss_fn, _ = make_model("mlp")
    shard = shard_of(union_batch("mlp"), rank)
    with recording_compile(graphs), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = ll.hessian_eigenvalues(
            model, loss_fn, shard, k=3, tol=1e-10, route="compiled", timeout=BOUND
        )
    eager = ll.hessian_eigenvalues(
        model, loss_fn, shard, k=3, tol=1e-10, route="functorch", timeout=BOUND
    )
    return {
        "compiled": eig(compiled),
        "functorch": eig(eager),
        "graphs": len(graphs),
        "fell_back": any("torch.compile failed" in str(w.message) for w in caught),
    }


def check_cost_model(rank: int) -> dict[str, Any]:
    """Per-product all-reduce counts and sizes of DistributedOperator."""
    model, loss_fn, _ = make_model("mlp")
    shard = shard_of(union_batch("mlp"), rank)
    local = HessianOperator(model, loss_fn, [shard], route="double_backward")
    op = DistributedOperator(local, float(SIZES[rank]), timeout=BOUND)
    handshake = [op.num_all_reduces, op.floats_reduced]
    products: list[list[int]] = []

    def counting(method: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
        def wrapped(x: Tensor) -> Tensor:
            calls, floats = op.num_all_reduces, op.floats_reduced
            y = method(x)
            b = 1 if x.ndim == 1 else x.shape[1]
            products.append([b, op.num_all_reduces - calls, op.floats_reduced - floats])
            return y

        return wrapped

    op.matmat = counting(op.matmat)  # type: ignore[method-assign]
    op.matvec = counting(op.matvec)  # type: ignore[method-assign]
    into = op.matvec_into
    op.matvec_into = lambda v, out: counting(lambda x: into(x, out))(v)  # type: ignore[method-assign]
    lanczos(op, 3, tol=1e-8)  # single vectors
    lanczos(op, 2, block_size=3, max_basis=30, tol=1e-6)  # blocks of 3
    hutchpp_trace(op, 12)  # blocks of 4
    op.matvec(torch.ones(op.size, dtype=op.dtype))
    return {
        "size": op.size,
        "handshake": handshake,
        "products": products,
        "num_all_reduces": op.num_all_reduces,
        "floats_reduced": op.floats_reduced,
        "num_matvecs": op.num_matvecs,
        "local_num_matvecs": local.num_matvecs,
    }


def check_hvp_exception(rank: int, route: str) -> dict[str, Any]:
    """Rank 1's loss raises whenever it is evaluated under grad, i.e. only inside products."""
    model, loss_fn, _ = make_model("mlp")
    shard = shard_of(union_batch("mlp"), rank)
    before = snapshot(model)
    calls = {"no_grad": 0, "grad": 0}

    def flaky(m: nn.Module, batch: Any) -> Tensor:
        calls["grad" if torch.is_grad_enabled() else "no_grad"] += 1
        if rank == 1 and torch.is_grad_enabled():
            raise RuntimeError("injected failure on rank 1")
        return loss_fn(m, batch)

    res = outcome(
        lambda: eig(ll.hessian_eigenvalues(model, flaky, shard, k=2, route=route, timeout=BOUND))
    )
    res["is_probe_failure"] = res.get("error") == ProbeFailure.__name__
    res["calls"] = calls
    res["model_unchanged"] = state_equal(model, before)
    # The collective schedule is still aligned afterwards: a fresh collective gives the right sum.
    res["in_step_after"] = weighted_mean(float(rank + 1), float(SIZES[rank]), timeout=BOUND)
    return res


def check_nan_on_one_rank(rank: int) -> dict[str, Any]:
    model, loss_fn, _ = make_model("mlp")
    x, y = shard_of(union_batch("mlp"), rank)
    if rank == 1:
        x = x.clone()
        x[3, 2] = float("nan")
    top = outcome(
        lambda: eig(ll.hessian_eigenvalues(model, loss_fn, (x, y), k=3, tol=1e-10, timeout=BOUND))
    )
    bottom = outcome(
        lambda: eig(
            ll.hessian_eigenvalues(
                model, loss_fn, (x, y), k=1, which="smallest", tol=1e-10, timeout=BOUND
            )
        )
    )

    def trace() -> dict[str, Any]:
        tr = ll.hessian_trace(model, loss_fn, (x, y), num_hvps=12, timeout=BOUND)
        return {"trace": tr.trace, "finite": math.isfinite(tr.trace), "num_hvps": tr.num_hvps}

    return {
        "largest": top,
        "smallest": bottom,
        "trace": outcome(trace),
        "in_step_after": weighted_mean(float(rank + 1), float(SIZES[rank]), timeout=BOUND),
    }


def check_helpers(rank: int) -> dict[str, Any]:
    return {
        "agree_rank1_only": agree_on_failure(rank == 1, timeout=BOUND),
        "agree_rank0_only": agree_on_failure(rank == 0),
        "agree_none": agree_on_failure(False, timeout=BOUND),
        "agree_all": agree_on_failure(True, timeout=BOUND),
        # (7 · 1 + 13 · 2) / 20 = 1.65
        "weighted_mean": weighted_mean(float(rank + 1), float(SIZES[rank]), timeout=BOUND),
        # A rank with weight 0 does not count: 2.0
        "weighted_mean_zero_weight": weighted_mean(
            5.0 if rank == 0 else 2.0, 0.0 if rank == 0 else 3.0, timeout=BOUND
        ),
    }


def check_rejections(rank: int) -> dict[str, Any]:
    model, loss_fn, _ = make_model("mlp")
    shard = shard_of(union_batch("mlp"), rank)
    # Different parameter subsets: 155 parameters on rank 0, 56 (fc1) on rank 1.
    params = None if rank == 0 else ["fc1.*"]
    mismatched = HessianOperator(model, loss_fn, [shard], params=params)
    local = HessianOperator(model, loss_fn, [shard], route="double_backward")
    res: dict[str, Any] = {
        "local_sizes": mismatched.size,
        "size_mismatch": outcome(
            lambda: DistributedOperator(mismatched, float(SIZES[rank]), timeout=BOUND).size
        ),
        "zero_total_weight": outcome(lambda: DistributedOperator(local, 0.0, timeout=BOUND).size),
        "negative_weight": outcome(lambda: DistributedOperator(local, -1.0, timeout=BOUND).size),
    }
    # Rank 0 holds no weight: the product is exactly rank 1's local product, on both ranks.
    op = DistributedOperator(local, 0.0 if rank == 0 else float(SIZES[1]), timeout=BOUND)
    v = torch.linspace(-1.0, 1.0, local.size, dtype=torch.float64)
    res["zero_weight_rank_product"] = op.matvec(v).tolist()
    res["local_product"] = local.matvec(v).tolist()
    res["in_step_after"] = weighted_mean(float(rank + 1), float(SIZES[rank]), timeout=BOUND)
    return res


def check_timeout(rank: int) -> dict[str, Any]:
    """Rank 1 stalls inside its first product; both ranks bound their waits by TIMEOUT_S."""
    model, loss_fn, _ = make_model("mlp")
    shard = shard_of(union_batch("mlp"), rank)
    slept = {"done": False}

    def slow(m: nn.Module, batch: Any) -> Tensor:
        if rank == 1 and torch.is_grad_enabled() and not slept["done"]:
            slept["done"] = True
            time.sleep(SLEEP_S)
        return loss_fn(m, batch)

    dist.barrier()  # start the clocks together
    res = outcome(
        lambda: eig(
            ll.hessian_eigenvalues(
                model,
                slow,
                shard,
                k=2,
                route="double_backward",
                timeout=datetime.timedelta(seconds=TIMEOUT_S),
            )
        )
    )
    res["slept"] = slept["done"]
    return res


def scenario_functional(rank: int, rec: Recorder) -> None:
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rec["world_size"] = dist.get_world_size()
    for kind in KINDS:
        guarded(rec, f"agreement_{kind}", lambda kind=kind: check_agreement(rank, kind))
    guarded(rec, "cost_model", lambda: check_cost_model(rank))
    guarded(rec, "compiled", lambda: check_compiled(rank))
    guarded(rec, "sync_batchnorm", lambda: check_sync_batchnorm(rank))
    for route in ("double_backward", "functorch", "finite_difference"):
        guarded(rec, f"hvp_exception_{route}", lambda route=route: check_hvp_exception(rank, route))
    guarded(rec, "nan_on_rank1", lambda: check_nan_on_one_rank(rank))
    guarded(rec, "helpers", lambda: check_helpers(rank))
    guarded(rec, "rejections", lambda: check_rejections(rank))
    # Last: leaves the process group out of step.
    guarded(rec, "timeout", lambda: check_timeout(rank))


# --------------------------------------------------------------------------------------------------
# trainer
# --------------------------------------------------------------------------------------------------


class FailOnRank1:
    """Probe loss that raises on rank 1 at one probe, either inside products or while building.

    ``under_grad=True``: raise when the loss is evaluated with gradients enabled (graph building,
    i.e. inside a Hessian-vector product); ``False``: raise in the no-grad loss evaluation done
    when the ``HessianOperator`` is built (before any product).
    """

    def __init__(self, rank: int, at_probe: int, under_grad: bool) -> None:
        self.rank = rank
        self.at_probe = at_probe
        self.under_grad = under_grad
        self.monitor: Any = None
        self.raised = 0

    def __call__(self, module: Any, batch: Any) -> Tensor:
        if (
            self.rank == 1
            and self.monitor.num_probes == self.at_probe
            and torch.is_grad_enabled() == self.under_grad
        ):
            self.raised += 1
            raise RuntimeError("injected probe failure on rank 1")
        loss: Tensor = module.compute_loss(batch)
        return loss


def scenario_trainer(rank: int, rec: Recorder, outdir: Path) -> None:
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import DDPStrategy

    from tests._lightning import (
        AdamModule,
        ClassifierModule,
        MemoryLogger,
        make_dataloader,
        make_dataset,
        trainer_kwargs,
    )

    def probes(every_n_steps: int = EVERY_N_STEPS) -> list[ll.Probe]:
        return [
            ll.Sharpness(TOP_K, tol=TOL, every_n_steps=every_n_steps),
            ll.Trace(TRACE_HVPS, every_n_steps=every_n_steps),
        ]

    def monitor(**kwargs: Any) -> ll.LandscapeMonitor:
        return ll.LandscapeMonitor(probes=probes(), num_probe_samples=NUM_PROBE_SAMPLES, **kwargs)

    class ProbeSpy(pl.Callback):
        """Runs right after the monitor: records this rank's probe data and, at every probe,
        the module's state (parameters and BatchNorm buffers) the probe saw."""

        def __init__(self, mon: ll.LandscapeMonitor) -> None:
            self.mon = mon
            self.probe: list[Any] = []
            self.states: dict[int, dict[str, Tensor]] = {}

        def _keep(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
            self.states[trainer.global_step] = state

        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self.probe = [[t.tolist() for t in b] for b in self.mon._batches or []]
            self._keep(trainer, pl_module)

        def on_train_batch_end(
            self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any
        ) -> None:
            if trainer.global_step % EVERY_N_STEPS == 0:
                self._keep(trainer, pl_module)

    def fit(
        name: str, mon: ll.LandscapeMonitor | None, module_cls: type = ClassifierModule
    ) -> dict[str, Any]:
        pl.seed_everything(0, verbose=False)
        spy = None if mon is None else ProbeSpy(mon)
        module = module_cls()
        logger = MemoryLogger()
        trainer = pl.Trainer(
            **trainer_kwargs(
                devices=2,
                strategy=DDPStrategy(
                    process_group_backend="gloo", timeout=datetime.timedelta(seconds=30)
                ),
                max_steps=MAX_STEPS,
                logger=logger,
                callbacks=[] if mon is None else [mon, spy],
            )
        )
        loader = make_dataloader(make_dataset(), batch_size=16)
        res = fit_outcome(trainer, module, loader)
        state = {"model": module.state_dict()}
        if trainer.optimizers:
            state["optimizer"] = trainer.optimizers[0].state_dict()
        torch.save(state, outdir / f"state_{name}.rank{rank}.pt")
        if spy is not None:
            torch.save(spy.states, outdir / f"probe_states_{name}.rank{rank}.pt")
        res.update(
            global_step=trainer.global_step,
            world_size=trainer.world_size,
            global_rank=trainer.global_rank,
            strategy=type(trainer.strategy).__name__,
            records=logger.records,
        )
        if mon is not None:
            res.update(
                history=[vars(r) for r in mon.history],
                num_probes=mon.num_probes,
                num_failed=mon.num_failed,
                probe=spy.probe if spy is not None else None,
            )
        return res

    guarded(rec, "fit_plain", lambda: fit("plain", None))
    guarded(rec, "fit_monitor", lambda: fit("monitor", monitor()))
    # Adaptive cadence: wall clocks differ between ranks, the probe steps must not.
    guarded(
        rec,
        "fit_budget",
        lambda: fit(
            "budget",
            ll.LandscapeMonitor(
                probes=probes(every_n_steps=5),
                max_overhead=0.5,
                num_probe_samples=NUM_PROBE_SAMPLES,
                collective_timeout=30,
            ),
        ),
    )

    # Adam: the preconditioned sharpness, the update's curvature (the probe gradient averaged over
    # ranks) and batch sharpness (each rank draws a batch; the global batch's value).
    aware = [
        ll.Sharpness(TOP_K, tol=TOL, every_n_steps=EVERY_N_STEPS),
        ll.UpdateCurvature(every_n_steps=EVERY_N_STEPS),
        ll.BatchSharpness(8, min_batches=3, max_batches=6, every_n_steps=EVERY_N_STEPS),
    ]
    guarded(
        rec,
        "fit_adam",
        lambda: fit(
            "adam",
            ll.LandscapeMonitor(probes=aware, num_probe_samples=NUM_PROBE_SAMPLES),
            AdamModule,
        ),
    )

    def fit_compiled() -> dict[str, Any]:
        """The monitor with ``route="compiled"`` (``aot_eager``, as the single-process tests):
        each rank compiles its shard's product during the first round."""
        from tests._compile import recording_compile

        graphs: list[Any] = []
        with recording_compile(graphs), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = fit("compiled", monitor(route="compiled", collective_timeout=60))
        res["graphs"] = len(graphs)
        res["fell_back"] = any("torch.compile failed" in str(w.message) for w in caught)
        return res

    guarded(rec, "fit_compiled", fit_compiled)

    def fit_failing(name: str, under_grad: bool, **kwargs: Any) -> dict[str, Any]:
        loss = FailOnRank1(rank, at_probe=2, under_grad=under_grad)
        mon = monitor(loss_fn=loss, **kwargs)
        loss.monitor = mon
        res = fit(name, mon)
        res["raised"] = loss.raised
        return res

    # Rank 1's loss raises inside the Hessian-vector products of the second probe (step 4).
    guarded(rec, "fit_fail_in_product", lambda: fit_failing("product", True, collective_timeout=30))
    # Last: rank 1's loss raises while the second probe's operator is built (before any
    # product). This may leave the process group out of step.
    guarded(
        rec,
        "fit_fail_in_construction",
        lambda: fit_failing("construction", False, collective_timeout=CONSTRUCTION_TIMEOUT_S),
    )


# --------------------------------------------------------------------------------------------------


def main(argv: list[str]) -> None:
    scenario, outdir = argv[0], Path(argv[1])
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    rec = Recorder(outdir / f"{scenario}.rank{rank}.json")
    rec["started"] = True
    if scenario == "functional":
        scenario_functional(rank, rec)
    elif scenario == "trainer":
        scenario_trainer(rank, rec, outdir)
    else:
        raise SystemExit(f"unknown scenario {scenario!r}")
    rec["finished"] = True
    sys.stdout.flush()
    sys.stderr.flush()
    # The last check of each scenario may leave collectives pending: skip the process-group
    # teardown (which could block on them) and leave now.
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
