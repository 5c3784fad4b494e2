#!/usr/bin/env python
"""Where a probe's time goes at 11 M parameters: wall-clock timers around the library's functions.

``--solve K``: one cold top-K solve (``hessian_eigenvalues``, tol 1e-4, after a warm-up solve) on
the ``eval()`` ResNet-18 of ``real_sizes.py`` (16 samples), as in its speed table.
``--rounds``: ``warm_start.py --default-monitor``'s training run (SGD, the default monitor
probes every 20 steps, 16 probe samples).

Each listed function's total wall time and call count are printed; nested ones overlap (the
products are inside ``_single_step``, the copy of each product into its output vector,
``_flat_or_zero``, inside ``_second_backward``). ``Tensor.addmv_`` is every Gram–Schmidt
correction pass over a basis: Lanczos' partial reorthogonalisation and ``project_out``'s. Timers
cost microseconds per call.

    python benchmarks/profile_probe.py --solve 1
    python benchmarks/profile_probe.py --rounds --steps 60 --threads 2
"""

from __future__ import annotations

import argparse
import collections
import functools
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402

import lightning_landscape  # noqa: E402,F401  (loads the submodules patched below)

TOTAL: dict[str, float] = collections.defaultdict(float)
CALLS: collections.Counter[str] = collections.Counter()
TIMED = {
    "lightning_landscape.operators.hessian": [
        "HessianOperator._second_backward",
        "HessianOperator._flat_or_zero",
    ],
    "lightning_landscape.solvers.lanczos": [
        "_single_step",
        "_start_block",
        "coefficients",
        "combine_rows",
        "project_out",
        "dot",
        "vector_norm",
    ],
    "lightning_landscape.solvers.trace": ["_deflated_hutchinson", "orthonormal_columns"],
    "lightning_landscape.probes.sharpness": ["Sharpness.run"],
    "lightning_landscape.probes.trace": ["Trace.run"],
    "lightning_landscape.probes.update": ["UpdateCurvature.run"],
}


def _timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            TOTAL[name] += time.perf_counter() - t0
            CALLS[name] += 1

    return wrapper


def install() -> None:
    """Wrap every function of :data:`TIMED` where its module looks it up."""
    for module_name, names in TIMED.items():
        module = sys.modules[module_name]
        for qual in names:
            *path, attr = qual.split(".")
            owner: Any = module
            for part in path:
                owner = getattr(owner, part)
            setattr(owner, attr, _timed(qual, getattr(owner, attr)))
    torch.Tensor.addmv_ = _timed("Tensor.addmv_", torch.Tensor.addmv_)  # type: ignore[method-assign]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--solve", type=int, default=None, help="one cold top-K solve")
    ap.add_argument("--rounds", action="store_true", help="the default monitor's rounds")
    ap.add_argument("--steps", type=int, default=60, help="training steps with --rounds")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    install()
    t0 = time.perf_counter()
    if args.rounds:
        import warm_start

        ns = warm_start.options(
            ["--steps", str(args.steps), "--every", "20", "--threads", str(args.threads)]
        )
        warm_start.run_default_monitor("resnet18", ns)
    else:
        from real_sizes import make_resnet18

        from lightning_landscape import hessian_eigenvalues

        problem = make_resnet18(False)
        k = args.solve or 1
        hessian_eigenvalues(problem.model, problem.loss_fn, problem.batch, k=k, tol=1e-4)
        TOTAL.clear()
        CALLS.clear()
        t0 = time.perf_counter()
        res = hessian_eigenvalues(problem.model, problem.loss_fn, problem.batch, k=k, tol=1e-4)
        print(f"top-{k}: {res.num_hvps} products, {res.num_restarts} restarts")
    print(f"wall {time.perf_counter() - t0:.2f} s")
    for name in sorted(TOTAL, key=lambda n: -TOTAL[n]):
        print(f"  {name:<36} {TOTAL[name]:8.2f} s {CALLS[name]:6d} calls")


if __name__ == "__main__":
    main()
