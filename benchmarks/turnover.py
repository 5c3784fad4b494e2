#!/usr/bin/env python
"""How fast the top Hessian eigenvector turns over during training, and what a warm start buys.

A warm-started λ_max solve can only be cheap when the previous probe's top eigenvector is still
close to the new one. This measures that directly on ``warm_start.py``'s ResNet-18 run (same
model, data, SGD with momentum 0.9, probe batch and Hessian: BatchNorm on batch statistics in
chunks of 16, as the monitor's default ``norm_statistics="batch"``), without a ``Trainer``:

1. **Controls** at step ``--start``: from the same weights, one plain gradient step of size
   ``--small-lrs`` on a training batch (no momentum, nothing else moves). How close must a
   start vector be for a warm solve to take few products?
2. **Training**: the real optimizer continues for ``--gaps`` steps at a time (cumulative); after
   each gap the top eigenpair is solved tightly (tol 1e-5, the reference vector), cold and warm
   (from the previous reference vector) at ``--tol``. ``cos_previous`` is ``|v_prevᵀ v_new|``;
   ``in_previous_top3`` is the norm of ``v_new``'s projection on the previous top-3 eigenvectors
   (the reference solves are top-3), and ``spectral_gap`` is ``1 − λ₂/λ₁``: a clustered top
   lets the top vector rotate inside the cluster while λ_max hardly moves.

    python benchmarks/turnover.py                           # ~5 min on 2 cores
    python benchmarks/turnover.py --lr 0.01 --out benchmarks/results_turnover_resnet18.json
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cpu import ROOT, cpu_model, library_fingerprint
from warm_start import setup

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from lightning_landscape import HessianOperator, curvature_context
from lightning_landscape.solvers import EigenResult, lanczos

REFERENCE_TOL = 1e-5


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (warm_start's 0.05)")
    ap.add_argument("--start", type=int, default=100, help="training steps before the controls")
    ap.add_argument("--gaps", default="1,1,1,2,5,10,20,20,20", help="steps between probes")
    ap.add_argument("--small-lrs", default="1e-4,1e-3,1e-2,5e-2", help="control step sizes")
    ap.add_argument("--tol", type=float, default=1e-4, help="the cold and warm solves' tol")
    ap.add_argument("--probe-samples", type=int, default=16, help="in chunks of 16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="write rows + metadata to this JSON path")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gaps = [int(g) for g in args.gaps.split(",")]
    small_lrs = [float(s) for s in args.small_lrs.split(",")]
    total = args.start + 1 + sum(gaps)
    torch.manual_seed(0)
    module, loader, probe_loader, _ = setup("resnet18", total, False, args.probe_samples)
    module.lr = args.lr
    net = module.net
    probe = list(probe_loader)
    batches = iter(loader)
    optimizer = module.configure_optimizers()
    net.train()

    def train(n: int) -> None:
        for _ in range(n):
            batch = next(batches)
            optimizer.zero_grad()
            module.loss_fn(net, batch).backward()
            optimizer.step()

    def solve(
        tol: float, start: torch.Tensor | None = None, k: int = 1
    ) -> tuple[EigenResult, float]:
        with curvature_context(net, norm_statistics="batch"):
            op = HessianOperator(net, module.loss_fn, probe)
            res = lanczos(op, k, tol=tol, start=start, return_eigenvectors=True)
            loss = sum(float(module.loss_fn(net, b).detach()) for b in probe) / len(probe)
        return res, loss

    def vectors(res: EigenResult) -> torch.Tensor:
        assert res.eigenvectors is not None
        return res.eigenvectors

    def top(res: EigenResult) -> torch.Tensor:
        return vectors(res)[:, 0]

    t0 = time.perf_counter()
    train(args.start)
    ref, loss = solve(REFERENCE_TOL, k=3)
    print(f"step {args.start}: lambda_max {float(ref.eigenvalues[0]):.4g}, loss {loss:.3g}")
    saved = {k: v.clone() for k, v in net.state_dict().items()}
    control_batch = next(iter(loader))
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
        warm, _ = solve(args.tol, top(ref)[:, None])
        row = {
            "step_size": lr,
            "lambda_max": float(new.eigenvalues[0]),
            "cos_previous": abs(float(top(ref) @ top(new))),
            "warm_hvps": warm.num_hvps,
        }
        controls.append(row)
        print(f"  control step {lr:g}: {row}", flush=True)
    net.load_state_dict(saved)
    net.zero_grad()
    rows: list[dict[str, Any]] = []
    step, prev = args.start, ref
    for gap in gaps:
        train(gap)
        step += gap
        new, loss = solve(REFERENCE_TOL, k=3)
        cold, _ = solve(args.tol)
        warm, _ = solve(args.tol, top(prev)[:, None])
        row = {
            "step": step,
            "gap": gap,
            "lambda_max": float(new.eigenvalues[0]),
            "probe_loss": loss,
            "cos_previous": abs(float(top(prev) @ top(new))),
            "cos_start": abs(float(top(ref) @ top(new))),
            "in_previous_top3": float((vectors(prev).T @ top(new)).norm()),
            "spectral_gap": 1.0 - float(new.eigenvalues[1] / new.eigenvalues[0]),
            "cold_hvps": cold.num_hvps,
            "warm_hvps": warm.num_hvps,
        }
        rows.append(row)
        print(f"  {row}", flush=True)
        prev = new
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
        "seconds": time.perf_counter() - t0,
    }
    if args.out:
        Path(args.out).write_text(
            json.dumps({"meta": meta, "controls": controls, "rows": rows}, indent=1) + "\n"
        )
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
