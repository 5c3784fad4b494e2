#!/usr/bin/env python
"""Batched vs one-direction-at-a-time curvature products for α on a CIFAR ResNet-18 (issue 6).

``curvature_exponents`` builds, per weight, the gradient's top-k singular directions
``d_k = vec(u_k v_kᵀ)`` and applies the layer-restricted Hessian to all k at once (one
``HessianOperator.matmat`` of an ``(n, k)`` block). This script times, per HVP route:

* end to end: the whole ``curvature_exponents(...)`` call (median of ``--repeats``);
* batched products: per layer, a fresh ``HessianOperator(params=[layer])`` and one ``matmat(D)``;
* sequential products: the same operator type and directions, k separate ``matvec`` calls;

and checks that both give the same ``h_k = d_kᵀ H d_k``. Timings of products include the
operator's first-call set-up (the retained gradient graph for double backward), once per layer,
as in ``curvature_exponents``. Model: local CIFAR ResNet-18 (11.2 M parameters, 20 conv weights +
fc = 21 layers), random seeded inputs and labels, eval mode, cross-entropy. On cuda the peak
``max_memory_allocated`` of each variant is reported.

Usage::

    python benchmarks/bench_alpha.py --device cuda --batch 128          # the issue's target
    python benchmarks/bench_alpha.py --batch 8 --max-layers 6 --repeats 1 --out res.json  # CPU
    python benchmarks/bench_alpha.py --quick                            # < 30 s smoke test
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # run from a checkout without an editable install
    sys.path.insert(0, str(HERE.parent))

from lightning_landscape import curvature_exponents  # noqa: E402
from lightning_landscape.cli.demo import ResNet18  # noqa: E402
from lightning_landscape.metrics.alpha import resolve_layers  # noqa: E402
from lightning_landscape.operators import HessianOperator  # noqa: E402


def loss_fn(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def directions(grad: Tensor, top_k: int) -> Tensor:
    """The unit directions ``vec(u_k v_kᵀ)`` exactly as ``alpha._layer_alpha`` builds them."""
    g2 = grad.detach().reshape(grad.shape[0], -1).to(torch.float64)
    m, n = g2.shape
    u, _, vh = torch.linalg.svd(g2, full_matrices=False)
    k = min(top_k, m, n)
    d = torch.einsum("ik,jk->ijk", u[:, :k], vh[:k].T).reshape(m * n, k)
    d = d / d.norm(dim=0, keepdim=True).clamp_min(1e-300)
    return d.to(grad.dtype)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=20)
    ap.add_argument("--layers", default=None, help="comma-separated weight names (default: all)")
    ap.add_argument("--max-layers", type=int, default=None, help="evenly spaced subset by depth")
    ap.add_argument("--routes", default="functorch,double_backward")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads on the CPU (0: default)")
    ap.add_argument("--no-e2e", action="store_true", help="skip the curvature_exponents timing")
    ap.add_argument("--quick", action="store_true", help="--batch 2 --max-layers 2 --top-k 4")
    ap.add_argument("--out", default=None, help="write the results as JSON")
    args = ap.parse_args()
    if args.quick:
        args.batch, args.max_layers, args.top_k, args.repeats = 2, 2, 4, 1
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    def reset_peak() -> None:
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)

    def peak_mib() -> float | None:
        return torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None

    torch.manual_seed(0)
    model = ResNet18().to(device).eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 3, 32, 32, generator=gen).to(device)
    y = torch.randint(0, 10, (args.batch,), generator=gen).to(device)
    batch = (x, y)
    names = args.layers.split(",") if args.layers else resolve_layers(model, None)
    if args.max_layers and args.max_layers < len(names):
        step = (len(names) - 1) / max(args.max_layers - 1, 1)
        names = [names[round(i * step)] for i in range(args.max_layers)]
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(loss_fn(model, batch), [params[n] for n in names])
    dirs = {n: directions(g, args.top_k) for n, g in zip(names, grads, strict=True)}
    num_hvps = sum(d.shape[1] for d in dirs.values())
    meta = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "loadavg_start": os.getloadavg(),
        "argv": sys.argv[1:],
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "layers": names,
        "num_hvps": num_hvps,
    }
    print(
        f"ResNet-18 {meta['num_parameters'] / 1e6:.1f} M params, B={args.batch}, "
        f"{len(names)} layers x k={args.top_k} = {num_hvps} HVPs, {meta['device']}, "
        f"{meta['threads']} threads, load {meta['loadavg_start']}",
        flush=True,
    )

    rows: list[dict[str, Any]] = []
    for route in args.routes.split(","):
        row: dict[str, Any] = {"route": route, "num_hvps": num_hvps}

        def products(
            mode: str, route: str = route, only: int | None = None
        ) -> tuple[float, dict[str, Tensor]]:
            hs: dict[str, Tensor] = {}
            seconds = 0.0
            for n, d in list(dirs.items())[:only]:
                sync()
                t0 = time.perf_counter()
                op = HessianOperator(model, loss_fn, [batch], params=[n], route=route)
                if mode == "batched":
                    hd = op.matmat(d)
                else:
                    hd = torch.stack([op.matvec(d[:, j]) for j in range(d.shape[1])], dim=1)
                op.release()
                sync()
                seconds += time.perf_counter() - t0
                hs[n] = (d * hd).sum(0).detach().to("cpu", torch.float64)
                del op, hd
            return seconds, hs

        h: dict[str, dict[str, Tensor]] = {}
        for mode in ("batched", "sequential"):
            if not args.quick:
                products(mode, only=1)  # warm-up on one layer (one-off set-up)
            times = []
            reset_peak()
            for _ in range(args.repeats):
                t, h[mode] = products(mode)
                times.append(t)
                print(f"  {route:16s} {mode:10s} {t:8.2f} s", flush=True)
            row[f"{mode}_s"] = statistics.median(times)
            row[f"{mode}_runs_s"] = times
            row[f"{mode}_peak_mib"] = peak_mib()
            row[f"{mode}_per_hvp_ms"] = 1e3 * row[f"{mode}_s"] / num_hvps
        row["speedup_batched"] = row["sequential_s"] / row["batched_s"]
        rel_scaled, rel_elem = 0.0, 0.0
        for n in names:
            hb, hs = h["batched"][n], h["sequential"][n]
            diff = (hb - hs).abs()
            scale = hs.abs().max().clamp_min(1e-300)
            rel_scaled = max(rel_scaled, float(diff.max() / scale))
            rel_elem = max(rel_elem, float((diff / hs.abs().clamp_min(1e-12 * scale)).max()))
        row["max_rel_diff_scaled"], row["max_rel_diff_elementwise"] = rel_scaled, rel_elem
        if not args.no_e2e:
            kwargs = {"top_k": args.top_k, "layers": names, "route": route}
            times = []
            reset_peak()
            for _ in range(args.repeats):
                sync()
                t0 = time.perf_counter()
                res = curvature_exponents(model, loss_fn, batch, **kwargs)
                sync()
                times.append(time.perf_counter() - t0)
            row["e2e_s"], row["e2e_runs_s"] = statistics.median(times), times
            row["e2e_peak_mib"] = peak_mib()
            row["e2e_max_rel_diff_vs_batched"] = max(
                float((res[n].h - h["batched"][n]).abs().max() / h["batched"][n].abs().max())
                for n in names
            )
            print(f"  {route:16s} {'e2e':10s} {row['e2e_s']:8.2f} s", flush=True)
        rows.append(row)

    meta["loadavg_end"] = os.getloadavg()
    print(
        "\n| route | batched s | sequential s | batched ms/HVP | sequential ms/HVP | "
        "speed-up | max rel diff (scaled / elementwise) | e2e s | peak MiB (b / s) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        pk = (
            "n/a"
            if r["batched_peak_mib"] is None
            else (f"{r['batched_peak_mib']:.0f} / {r['sequential_peak_mib']:.0f}")
        )
        e2e = f"{r['e2e_s']:.2f}" if "e2e_s" in r else "-"
        print(
            f"| {r['route']} | {r['batched_s']:.2f} | {r['sequential_s']:.2f} | "
            f"{r['batched_per_hvp_ms']:.0f} | {r['sequential_per_hvp_ms']:.0f} | "
            f"{r['speedup_batched']:.2f}x | {r['max_rel_diff_scaled']:.1e} / "
            f"{r['max_rel_diff_elementwise']:.1e} | {e2e} | {pk} |"
        )
    print(f"load average start {meta['loadavg_start']} end {meta['loadavg_end']}")
    if args.out:
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
