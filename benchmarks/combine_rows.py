#!/usr/bin/env python
"""Ritz vectors from a Lanczos basis at 11 M parameters: ``combine_rows``' two paths.

``combine_rows(rows, y, out)`` forms ``p`` combinations of ``j`` basis rows of ``n`` float32
entries chunk by chunk. Into an output that shares no memory with the basis (the Ritz vectors a
solve returns) each chunk's product is written straight into its columns; into the basis itself
(a thick restart, in place) each chunk goes through a small buffer and is then copied. Both are
timed here on the same data: "straight" into a separate tensor, "buffered" into rows of the
basis's own storage that the combination does not read (the path a restart takes, here without
overwriting its input, so every repeat does the same work). Medians of ``repeats`` calls after one
warm-up call, the two paths alternating.

    python benchmarks/combine_rows.py --out benchmarks/results_combine_rows.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cpu import ROOT, run_metadata, write_results

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from lightning_landscape.solvers._orthogonality import combine_rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=11_181_642, help="columns (default: ResNet-18's size)")
    ap.add_argument("--j", type=int, default=22, help="basis rows (default: top-5 + λ_min's basis)")
    ap.add_argument("--ps", default="1,6,14", help="comma list of combinations to form")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    rows_out: list[dict[str, Any]] = []
    for p in (int(x) for x in args.ps.split(",")):
        storage = torch.randn(args.j + p, args.n, generator=g)
        basis, own_rows = storage[: args.j], storage[args.j :]
        separate = torch.empty(p, args.n)
        y = torch.randn(args.j, p, generator=g, dtype=torch.float64)
        paths = {"straight": separate, "buffered": own_rows}  # where each path writes

        times: dict[str, list[float]] = {name: [] for name in paths}
        for out in paths.values():  # warm-up: first touches of the outputs
            combine_rows(basis, y, out=out)
        for _ in range(args.repeats):
            for name, out in paths.items():
                t0 = time.perf_counter()
                combine_rows(basis, y, out=out)
                times[name].append(time.perf_counter() - t0)
        # The same sums, blocked differently by the GEMM: equal to float32 rounding.
        gap = float((separate - own_rows).abs().max() / own_rows.abs().max())
        assert gap < 1e-5, f"the two paths disagree by {gap:.1e}"
        row = {
            "p": p,
            "j": args.j,
            "max_relative_difference": gap,
            **{f"{name}_seconds": statistics.median(t) for name, t in times.items()},
            **{f"{name}_all": t for name, t in times.items()},
        }
        rows_out.append(row)
        print(json.dumps({k: v for k, v in row.items() if not k.endswith("_all")}), flush=True)
    write_results(args.out, run_metadata(n=args.n), rows_out)


if __name__ == "__main__":
    main()
