#!/usr/bin/env python
"""How fast the top Hessian eigenvector turns over during training, and what a warm start buys.

A warm-started λ_max solve can only be cheap when the previous probe's top eigenvector is still
close to the new one. This measures that directly on ``warm_start.py``'s ResNet-18 run (same
model, data, SGD with momentum 0.9, probe batch and Hessian: BatchNorm on batch statistics in
chunks of 16, as the monitor's default ``norm_statistics="batch"``), without a ``Trainer``:

1. **Controls** at step ``--start``: from the same weights, one plain gradient step of size
   ``--small-lrs`` on the batch that training takes next (no momentum, nothing else moves). How
   close must a start vector be for a warm solve to take few products? Warm solves start as the
   monitor's do (``lanczos``' default ``start_noise=0.05``: a random unit vector of weight 0.05
   is added); the controls also solve from the exact previous vector (``warm_hvps_noise0``).
2. **Training**: the real optimizer continues for ``--gaps`` steps at a time (cumulative); after
   each gap the top eigenpair is solved tightly (tol 1e-5, the reference vector), cold and warm
   (from the previous reference vector) at ``--tol``. ``cos_previous`` is ``|v_prevᵀ v_new|``;
   ``in_previous_top3`` is the norm of ``v_new``'s projection on the previous top-3 eigenvectors
   (the reference solves are top-3), and ``spectral_gap`` is ``1 − λ₂/λ₁``: a clustered top
   lets the top vector rotate inside the cluster while λ_max hardly moves.

Each of ``--seeds`` is one trajectory from its own initialisation of the network (the data,
probe batch and batch order are the same); about 3 minutes each on 2 cores.

    python benchmarks/turnover.py --out benchmarks/results_turnover_resnet18.json
    python benchmarks/turnover.py --seeds 0 --lr 0.01 --out /tmp/turnover_lr0.01.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cpu import ROOT, cpu_model, library_fingerprint
from warm_start import setup

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from lightning_landscape import HessianOperator, curvature_context
from lightning_landscape.solvers import EigenResult, lanczos

REFERENCE_TOL = 1e-5


def _vectors(res: EigenResult) -> Tensor:
    assert res.eigenvectors is not None
    return res.eigenvectors


def _top(res: EigenResult) -> Tensor:
    return _vectors(res)[:, 0]


def _gap(res: EigenResult) -> float:
    return 1.0 - float(res.eigenvalues[1] / res.eigenvalues[0])


def trajectory(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """The controls and the training rows of one initialisation (``seed``)."""
    gaps = [int(g) for g in args.gaps.split(",")]
    small_lrs = [float(s) for s in args.small_lrs.split(",")]
    module, loader, probe_loader, _ = setup(
        "resnet18", args.start + sum(gaps), False, args.probe_samples, seed=seed
    )
    module.lr = args.lr
    net = module.net
    probe = list(probe_loader)
    batches = iter(loader)
    optimizer = module.configure_optimizers()
    net.train()
    pending: list[Any] = []  # a batch taken out of ``batches`` early, trained on first

    def train(n: int) -> None:
        for _ in range(n):
            batch = pending.pop() if pending else next(batches)
            optimizer.zero_grad()
            module.loss_fn(net, batch).backward()
            optimizer.step()

    def solve(
        tol: float, start: Tensor | None = None, k: int = 1, **kw: Any
    ) -> tuple[EigenResult, float]:
        with curvature_context(net, norm_statistics="batch"):
            op = HessianOperator(net, module.loss_fn, probe)
            res = lanczos(op, k, tol=tol, start=start, return_eigenvectors=True, **kw)
            loss = sum(float(module.loss_fn(net, b).detach()) for b in probe) / len(probe)
        return res, loss

    train(args.start)
    ref, loss = solve(REFERENCE_TOL, k=3)
    first = {
        "step": args.start,
        "lambda_max": float(ref.eigenvalues[0]),
        "spectral_gap": _gap(ref),
        "probe_loss": loss,
        "reference_converged": ref.all_converged,
    }
    print(f"seed {seed}: {first}", flush=True)
    saved = {k: v.clone() for k, v in net.state_dict().items()}
    control_batch = next(batches)  # the batch of step start + 1: trained on after the controls
    controls = []
    for lr in small_lrs:
        net.load_state_dict(saved)
        net.zero_grad()
        module.loss_fn(net, control_batch).backward()
        with torch.no_grad():
            for p in net.parameters():
                if p.grad is not None:
                    p.add_(p.grad, alpha=-lr)
        new, _ = solve(REFERENCE_TOL, k=3)
        warm, _ = solve(args.tol, _top(ref)[:, None])
        exact, _ = solve(args.tol, _top(ref)[:, None], start_noise=0.0)
        row = {
            "step_size": lr,
            "lambda_max": float(new.eigenvalues[0]),
            "cos_previous": abs(float(_top(ref) @ _top(new))),
            "warm_hvps": warm.num_hvps,
            "warm_hvps_noise0": exact.num_hvps,
            "reference_converged": new.all_converged,
        }
        controls.append(row)
        print(f"  control step {lr:g}: {row}", flush=True)
    net.load_state_dict(saved)
    net.zero_grad()
    pending.append(control_batch)
    rows: list[dict[str, Any]] = []
    step, prev = args.start, ref
    for n in gaps:
        train(n)
        step += n
        new, loss = solve(REFERENCE_TOL, k=3)
        cold, _ = solve(args.tol)
        warm, _ = solve(args.tol, _top(prev)[:, None])
        row = {
            "step": step,
            "gap": n,
            "lambda_max": float(new.eigenvalues[0]),
            "probe_loss": loss,
            "cos_previous": abs(float(_top(prev) @ _top(new))),
            "cos_start": abs(float(_top(ref) @ _top(new))),
            "in_previous_top3": float((_vectors(prev).T @ _top(new)).norm()),
            "spectral_gap": _gap(new),
            "cold_hvps": cold.num_hvps,
            "warm_hvps": warm.num_hvps,
            "reference_converged": new.all_converged,
        }
        rows.append(row)
        print(f"  {row}", flush=True)
        prev = new
    return {"seed": seed, "first": first, "controls": controls, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (warm_start's 0.05)")
    ap.add_argument("--start", type=int, default=100, help="training steps before the controls")
    ap.add_argument("--gaps", default="1,1,1,2,5,10,20,20,20", help="steps between probes")
    ap.add_argument("--small-lrs", default="1e-4,1e-3,1e-2,5e-2", help="control step sizes")
    ap.add_argument("--tol", type=float, default=1e-4, help="the cold and warm solves' tol")
    ap.add_argument("--probe-samples", type=int, default=16, help="a multiple of 16")
    ap.add_argument("--seeds", default="0,1,2", help="network initialisations, one run each")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="write rows + metadata to this JSON path")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    runs = [trajectory(args, int(seed)) for seed in args.seeds.split(",")]
    meta = {
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "lightning_landscape_src_sha256_16": library_fingerprint(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "lr": args.lr,
        "tol": args.tol,
        "reference_tol": REFERENCE_TOL,
        "probe_samples": args.probe_samples,
        "malloc_env": {
            k: v for k, v in os.environ.items() if k.startswith(("MALLOC_", "THP_MEM_"))
        },
        "seconds": time.perf_counter() - t0,
    }
    if args.out:
        Path(args.out).write_text(json.dumps({"meta": meta, "runs": runs}, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
