#!/usr/bin/env python
"""CPU: what glibc's handling of freed memory costs a probe (page faults), and the fix.

A Hessian-vector product at 10 M parameters frees and allocates tens of MB of tensors. With
glibc's defaults a freed block at the top of the heap is returned to the kernel once it passes
the (dynamic) trim threshold, so the next product faults the same pages back in. This runs the
same work in fresh child processes, with three settings: glibc's defaults;

    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=17179869184

(tensors up to 32 MiB from the heap, freed memory kept for reuse; the peak RSS is unchanged, the
RSS just does not shrink after it); and those plus ``THP_MEM_ALLOC_ENABLE=1``, PyTorch's own
switch: CPU tensors of 2 MiB or more are aligned to 2 MiB and ``madvise``-d for transparent huge
pages, so a fresh 45 MB vector takes ~22 page faults instead of ~11,000 (the kernel's
``/sys/kernel/mm/transparent_hugepage/enabled`` must be ``madvise`` or ``always``). The work:
one SGD training step of the torchvision-style ResNet-18 of ``real_sizes.py`` (11.2 M
parameters, 16 samples, median of 20) and a cold λ_max solve on it (``eval()``, ``tol=1e-4``,
after one warm-up solve), with the solve's minor page faults and each process's peak RSS.

    python benchmarks/cpu_allocator.py --repeats 3 --out benchmarks/results_cpu_allocator.json

With ``--repeats`` the configurations run round-robin, each repeat in fresh processes.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

TUNED = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "17179869184"}
HUGE = TUNED | {"THP_MEM_ALLOC_ENABLE": "1"}
CONFIGS = (("glibc defaults", {}), ("freed memory kept", TUNED), ("kept + huge pages", HUGE))
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def child() -> dict[str, float]:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from real_sizes import make_resnet18

    from lightning_landscape import hessian_eigenvalues

    problem = make_resnet18(False)
    model = problem.model
    model.eval()
    hessian_eigenvalues(model, problem.loss_fn, problem.batch, k=1, tol=1e-4)  # warm-up
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.perf_counter()
    result = hessian_eigenvalues(model, problem.loss_fn, problem.batch, k=1, tol=1e-4)
    solve = time.perf_counter() - t0
    solve_faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    steps = []
    for i in range(23):
        t0 = time.perf_counter()
        optimizer.zero_grad()
        problem.loss_fn(model, problem.batch).backward()
        optimizer.step()
        if i >= 3:
            steps.append(time.perf_counter() - t0)
    return {
        "solve_seconds": solve,
        "solve_products": result.num_hvps,
        "solve_minor_faults": solve_faults,
        "step_seconds": statistics.median(steps),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _run_child(extra: dict[str, str]) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if k not in HUGE} | extra
    out = subprocess.run(
        [sys.executable, __file__, "--child"], env=env, capture_output=True, text=True
    )
    if out.returncode:
        raise SystemExit(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--repeats", type=int, default=1, help="round-robin repeats (fresh processes)")
    ap.add_argument("--out", default=None, help="write the rows to this JSON path")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child()))
        return
    runs: dict[str, list[dict[str, float]]] = {name: [] for name, _ in CONFIGS}
    for _ in range(args.repeats):
        for name, extra in CONFIGS:
            r = _run_child(extra)
            runs[name].append(r)
            print(
                f"{name:<18} λ_max solve {r['solve_seconds']:.2f} s ({r['solve_products']} "
                f"products, {r['solve_minor_faults']} page faults), step "
                f"{1e3 * r['step_seconds']:.1f} ms, peak RSS {r['peak_rss_mib']:.0f} MiB",
                flush=True,
            )
    rows = {
        name: {key: statistics.median(r[key] for r in rs) for key in rs[0]} | {"runs": rs}
        for name, rs in runs.items()
    }
    for name, r in rows.items():
        print(
            f"median {name:<18} solve {r['solve_seconds']:.2f} s, faults "
            f"{r['solve_minor_faults']:.0f}, step {1e3 * r['step_seconds']:.1f} ms"
        )
    if args.out:
        meta = {
            "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "command": " ".join(["python", *sys.argv]),
            "cpu_count": os.cpu_count(),
            "repeats": args.repeats,
            "configs": dict(CONFIGS),
            "transparent_hugepage": THP_MODE.read_text().strip() if THP_MODE.exists() else None,
            "loadavg": os.getloadavg(),
        }
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
