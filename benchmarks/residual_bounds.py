#!/usr/bin/env python
"""Are the residuals Lanczos reports true? Reported vs true Ritz residuals on known spectra.

For the known-spectrum matrices of ``tests/solvers/test_lanczos.py`` (300 × 300, float64:
well separated, clustered at 1e-6 spacing, indefinite) and both ends at once
(``lanczos_ends`` with (1, 1), (5, 1), (3, 2) pairs) at ``tol=1e-8``, over ``--seeds`` start
vectors: the largest amount by which the true residual ``‖A y − θ y‖ / ‖A‖`` exceeds the reported
one ("under", positive: the report was optimistic), the largest amount by which the report
exceeds the truth ("over"), both in units of ``tol``, and the products spent. It uses the public
API only, so the same command measures any version of the solver.

    python benchmarks/residual_bounds.py --seeds 15 --out benchmarks/results_residual_bounds.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from lightning_landscape import MatrixOperator, lanczos_ends  # noqa: E402
from tests.solvers.test_lanczos import _matrix, _spectrum, _true_residuals  # noqa: E402

TOL = 1e-8


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=15, help="start vectors per case (default 15)")
    ap.add_argument("--out", default=None, help="write the rows to this JSON path")
    args = ap.parse_args()
    rows = []
    print(f"{'spectrum':<11} {'ends':<7} {'under/tol':>9} {'over/tol':>9} {'products':>8}")
    for spectrum in ("separated", "clustered", "indefinite"):
        a = _matrix(_spectrum(spectrum))
        for ends in ((1, 1), (5, 1), (3, 2)):
            under, over, products = -float("inf"), -float("inf"), 0
            for seed in range(args.seeds):
                results = lanczos_ends(MatrixOperator(a), *ends, tol=TOL, seed=seed)
                products += results[0].num_hvps
                for r in results:
                    diff = (_true_residuals(a, r) - r.residuals) / TOL
                    under, over = max(under, float(diff.max())), max(over, float((-diff).max()))
            row = {"spectrum": spectrum, "ends": ends, "under": under, "over": over}
            rows.append({**row, "products": products})
            print(f"{spectrum:<11} {ends!s:<7} {under:>9.3f} {over:>9.3f} {products:>8}")
    if args.out:
        meta = {
            "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "command": " ".join(["python", *sys.argv]),
            "seeds": args.seeds,
            "tol": TOL,
            "torch": torch.__version__,
        }
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
