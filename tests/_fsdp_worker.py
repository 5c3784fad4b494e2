"""Worker processes for ``tests/test_fsdp.py``: FSDP2 (``fully_shard``) on 2 gloo ranks, CPU.

Launched by the tests as::

    python -m torch.distributed.run --standalone --nproc_per_node=2 -m tests._fsdp_worker <outdir>

Each rank writes ``<outdir>/fsdp.rank<r>.json``, rewritten after every check (see
``tests._dist_worker.Recorder``), plus its final parameter shards per run. The tests assert on
these files; nothing is asserted here. Single-process references (dense float64 Hessians of the
same model at the same parameters on the union of the ranks' probe samples) are computed on
rank 0 from the gathered full parameters.

Checks, in order:

* ``operator``: :class:`ShardedHessianOperator` on a model whose root holds parameters itself
  (LayerNorm, the head) against the exact route on the union of both ranks' data (uneven: 7 and
  13 samples): top-3 eigenvalues, trace, loss, gradient slices, parameters and ``.grad``
  restored bit-for-bit, a NaN loss on rank 1 seen as non-finite by both ranks.
* ``fit_plain`` / ``fit_monitor``: ``Trainer(strategy=ModelParallelStrategy(data_parallel_size=2,
  tensor_parallel_size=1))`` with AdamW, without and with the monitor (sharpness with the
  preconditioned sharpness, trace, density, update curvature, every 4 steps); the reference
  eigenvalues at the last probe's parameters.
* ``fit_refused``: a probe without sharding support is refused in ``setup`` on both ranks.
"""

from __future__ import annotations

import datetime
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

import lightning_landscape as ll
from lightning_landscape.operators import HessianOperator
from lightning_landscape.operators.sharded import ShardedHessianOperator, local_tensor
from tests._dist_worker import Recorder, fit_outcome, guarded

IN, HIDDEN, CLASSES = 6, 12, 3
SIZES = (7, 13)  # the operator check's uneven shards of the union
MAX_STEPS = 8
EVERY_N_STEPS = 4
NUM_PROBE_SAMPLES = 25  # rank 0: samples 0, 2, ..., 24 (13); rank 1: 1, 3, ..., 23 (12)
TOP_K = 2
TOL = 1e-4
TRACE_HVPS = 9
BOUND = datetime.timedelta(seconds=60)


def make_net(in_features: int = IN, classes: int = CLASSES) -> nn.Sequential:
    """LayerNorm and the head stay in the root's own FSDP group (parameters of the root)."""
    return nn.Sequential(
        nn.Linear(in_features, HIDDEN),
        nn.Tanh(),
        nn.LayerNorm(HIDDEN),
        nn.Linear(HIDDEN, HIDDEN),
        nn.GELU(),
        nn.Linear(HIDDEN, classes),
    )


def shard(net: nn.Module) -> None:
    from torch.distributed.fsdp import fully_shard

    fully_shard(net[0])
    fully_shard(net[3])
    fully_shard(net)


def cross_entropy(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def data(n: int, seed: int = 11) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, IN, generator=g)
    teacher = torch.randn(IN, CLASSES, generator=g)
    return x, (x @ teacher).argmax(dim=1)


def full_state(net: nn.Module) -> dict[str, Tensor]:
    """Every parameter whole (a collective: call on every rank)."""
    return {
        name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
        for name, p in net.named_parameters()
    }


def dense_hessian(op: HessianOperator) -> Tensor:
    eye = torch.eye(op.size, dtype=op.dtype)
    return torch.cat([op.matmat(eye[:, i : i + 64]) for i in range(0, op.size, 64)], dim=1)


def reference(
    state: dict[str, Tensor],
    batches: list[tuple[Tensor, Tensor]],
    scale: Tensor | None = None,
    shape: tuple[int, int] = (IN, CLASSES),
) -> dict[str, Any]:
    """Dense float64 truth on one process: eigenvalues, trace, loss (and λ₁(P⁻¹H) = λ₁(S½ H S½))."""
    net = make_net(*shape).double()
    net.load_state_dict({k: v.double() for k, v in state.items()})
    batches = [(x.double(), y) for x, y in batches]
    weights = [float(len(y)) for _, y in batches]
    op = HessianOperator(net, cross_entropy, batches, weights=weights, route="double_backward")
    h = dense_hessian(op)
    h = 0.5 * (h + h.T)
    values = torch.linalg.eigvalsh(h)
    out: dict[str, Any] = {
        "top": values.flip(0)[:3].tolist(),
        "min": float(values[0]),
        "trace": float(torch.trace(h)),
        "loss": op.loss_value,
        "gradient": op.gradient().tolist(),
        "size": op.size,
    }
    if scale is not None:
        root = scale.double().sqrt()
        out["preconditioned"] = float(torch.linalg.eigvalsh(root[:, None] * h * root)[-1])
    return out


def gathered(obj: Any) -> list[Any]:
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def check_operator(rank: int, rec: Recorder) -> None:
    torch.manual_seed(0)
    net = make_net()
    plain = {k: v.detach().clone() for k, v in net.state_dict().items()}
    shard(net)
    x, y = data(sum(SIZES))
    lo = sum(SIZES[:rank])
    mine = (x[lo : lo + SIZES[rank]], y[lo : lo + SIZES[rank]])
    for p in net.parameters():  # training's gradients, which the operator must leave alone
        p.grad = torch.ones_like(p)
    before = [local_tensor(p).detach().clone() for p in net.parameters()]
    op = ShardedHessianOperator(net, cross_entropy, [mine], timeout=BOUND)
    top = ll.lanczos(op, k=3, tol=1e-5)
    trace = ll.hutchpp_trace(op, num_hvps=60)
    grad = op.gradient()
    after = [local_tensor(p).detach() for p in net.parameters()]
    grads_kept = all(
        p.grad is not None and bool((local_tensor(p.grad) == 1).all()) for p in net.parameters()
    )
    slices = gathered(grad.tolist())
    rec["operator"] = {
        "top": top.eigenvalues.tolist(),
        "converged": top.all_converged,
        "num_hvps": top.num_hvps,
        "trace": trace.trace,
        "trace_stderr": trace.stderr,
        "loss": op.loss_value,
        "gradient": [v for part in slices for v in part],
        "local_size": op.size,
        "global_size": op.global_size,
        "params_restored": all(torch.equal(a, b) for a, b in zip(before, after, strict=True)),
        "grads_restored": grads_kept,
    }
    ref_batches = [(x[:7], y[:7]), (x[7:], y[7:])]
    if rank == 0:
        rec["operator_reference"] = reference(plain, ref_batches)
    # Each rank's slice sizes per parameter: the gathered gradient is rank 0's slices, then rank
    # 1's; a whole parameter is its slices in rank order (FSDP2 shards dim 0).
    rec["operator_shards"] = gathered([local_tensor(p).numel() for p in net.parameters()])

    def nan_on_rank1(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        loss = cross_entropy(model, batch)
        return loss * float("nan") if rank == 1 else loss

    op_nan = ShardedHessianOperator(net, nan_on_rank1, [mine], timeout=BOUND)
    res = ll.lanczos(op_nan, k=1, tol=1e-3)
    rec["nan"] = {"finite": res.is_finite, "loss": op_nan.loss_value}


def scenario(rank: int, rec: Recorder, outdir: Path) -> None:
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import ModelParallelStrategy

    from tests._lightning import (
        IN_FEATURES,
        NUM_CLASSES,
        MemoryLogger,
        make_dataloader,
        make_dataset,
        trainer_kwargs,
    )

    guarded(rec, "operator_check", lambda: check_operator(rank, rec) or True)

    class Sharded(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_net(IN_FEATURES, NUM_CLASSES)

        def configure_model(self) -> None:
            shard(self.net)

        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            loss = nn.functional.cross_entropy(self.net(batch[0]), batch[1])
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=0.02, weight_decay=0.01)

    def probes() -> list[ll.Probe]:
        return [
            ll.Sharpness(TOP_K, tol=TOL, every_n_steps=EVERY_N_STEPS),
            ll.Trace(TRACE_HVPS, every_n_steps=EVERY_N_STEPS),
            ll.SpectralDensity(num_runs=2, lanczos_steps=8, every_n_steps=EVERY_N_STEPS),
            ll.UpdateCurvature(every_n_steps=EVERY_N_STEPS),
        ]

    class ProbeSpy(pl.Callback):
        """Runs after the monitor: keeps this rank's probe batches (the monitor drops them)."""

        def __init__(self, mon: ll.LandscapeMonitor) -> None:
            self.mon = mon
            self.batches: list[Any] = []

        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self.batches = [tuple(t.clone() for t in b) for b in self.mon._batches or []]

    def fit(name: str, mon: ll.LandscapeMonitor | None) -> dict[str, Any]:
        pl.seed_everything(0, verbose=False)
        spy = None if mon is None else ProbeSpy(mon)
        module = Sharded()
        logger = MemoryLogger()
        strategy = ModelParallelStrategy(
            data_parallel_size=2, tensor_parallel_size=1, timeout=BOUND
        )
        trainer = pl.Trainer(
            **trainer_kwargs(
                devices=2,
                strategy=strategy,
                max_steps=MAX_STEPS,
                logger=logger,
                callbacks=[] if mon is None else [mon, spy],
            )
        )
        loader = make_dataloader(make_dataset(), batch_size=16)
        res = fit_outcome(trainer, module, loader)
        if "error" in res:
            return res
        shards = {n: local_tensor(p).detach().clone() for n, p in module.named_parameters()}
        torch.save(shards, outdir / f"shards_{name}.rank{rank}.pt")
        res.update(global_step=trainer.global_step, records=logger.records)
        if mon is None:
            return res
        res.update(
            history=[vars(r) for r in mon.history],
            num_failed=mon.num_failed,
            trace=vars(mon.probe_named("trace").last_result),
            update=vars(mon.probe_named("update").last_result),
        )
        # The single-process truth at the last probe (train end: the final parameters).
        state = full_state(module.net)
        optimizer = trainer.optimizers[0]
        group = optimizer.param_groups[0]
        vs = [optimizer.state[p]["exp_avg_sq"].full_tensor() for p in module.parameters()]
        step = float(optimizer.state[next(module.parameters())]["step"])
        assert spy is not None
        batches = gathered(spy.batches)
        if rank == 0:
            b1, b2 = (float(b) for b in group["betas"])
            precond = [
                (1 - b1**step) * ((v.double() / (1 - b2**step)).sqrt() + group["eps"]) for v in vs
            ]
            scale = torch.cat([(1 / p).reshape(-1) for p in precond])  # λ₁(S½HS½) = λ₁(P⁻¹H)
            union = [b for per_rank in batches for b in per_rank]
            res["reference"] = reference(state, union, scale, (IN_FEATURES, NUM_CLASSES))
            res["probe_sizes"] = [[len(b[1]) for b in per_rank] for per_rank in batches]
        return res

    guarded(rec, "fit_plain", lambda: fit("plain", None))
    guarded(
        rec,
        "fit_monitor",
        lambda: fit(
            "monitor",
            ll.LandscapeMonitor(
                probes=probes(), num_probe_samples=NUM_PROBE_SAMPLES, collective_timeout=60
            ),
        ),
    )
    # Last: refused in setup (both ranks raise the same error before any collective).
    guarded(
        rec,
        "fit_refused",
        lambda: fit(
            "refused",
            ll.LandscapeMonitor(
                probes=[ll.Sharpness(1), ll.CurvatureExponent(every_n_steps=4)],
                num_probe_samples=NUM_PROBE_SAMPLES,
            ),
        ),
    )


def main(argv: list[str]) -> None:
    outdir = Path(argv[0])
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", timeout=BOUND)
    rec = Recorder(outdir / f"fsdp.rank{rank}.json")
    rec["started"] = True
    scenario(rank, rec, outdir)
    rec["finished"] = True
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # a refused fit may leave Lightning's state half torn down: leave now


if __name__ == "__main__":
    main(sys.argv[1:])
