#!/usr/bin/env python
"""Orthonormalising tall float32 blocks: ``orthonormal_columns`` against ``torch.linalg.qr``.

The blocks the solvers orthonormalise at real sizes: ``b`` columns of ``n`` = 11,181,642 entries
(ResNet-18's parameter count), float32, either unit columns stored as contiguous rows (the layout
of Ritz vectors, e.g. the eigenvectors the trace deflates) or a row-major Gaussian block (a random
start block). For each: the median seconds of ``repeats`` calls after one warm-up call, and the
orthogonality error ``max |QᵀQ − I|`` computed in float64.

    python benchmarks/qr_blocks.py --out benchmarks/results_qr_blocks.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cpu import ROOT, run_metadata, write_results

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from lightning_landscape.solvers._orthogonality import orthonormal_columns


def _seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _orthogonality(q: Tensor) -> float:
    wide = q.double()
    return float((wide.T @ wide - torch.eye(q.shape[1], dtype=torch.float64)).abs().max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=11_181_642, help="rows (default: ResNet-18's size)")
    ap.add_argument("--bs", default="6,10", help="comma list of block widths")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    rows: list[dict[str, Any]] = []
    for b in (int(x) for x in args.bs.split(",")):
        unit = torch.randn(b, args.n, generator=g)
        unit /= unit.norm(dim=1, keepdim=True)
        blocks = {"unit columns as rows": unit.T, "Gaussian, row-major": torch.randn(args.n, b)}
        for layout, block in blocks.items():
            row = {"b": b, "layout": layout}
            for name, fn in (
                ("orthonormal_columns", orthonormal_columns),
                ("torch.linalg.qr", torch.linalg.qr),
            ):
                row[name] = {
                    "seconds": _seconds(lambda fn=fn, x=block: fn(x), args.repeats),
                    "orthogonality": _orthogonality(fn(block)[0]),
                }
            rows.append(row)
            print(json.dumps(row), flush=True)
    write_results(args.out, run_metadata(n=args.n), rows)


if __name__ == "__main__":
    main()
