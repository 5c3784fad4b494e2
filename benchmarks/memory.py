#!/usr/bin/env python
"""Peak memory of a top-k Hessian eigensolve vs one training step, ours and the peers.

For each of ``bench_cpu.py``'s two models (trained as there) and each method, a fresh child
process rebuilds the model from the trained weights and the probe batch, runs the method once at
k = 1 as a warm-up (lazy kernel set-up, optimizer state), and then measures the method at k
(default 20):

* on the CPU the peak resident set size above the RSS just before the measured call: the kernel's
  high-water mark ``VmHWM`` is reset by writing 5 to ``/proc/self/clear_refs`` (where that is not
  allowed, ``ru_maxrss`` is used, which then also holds the warm-up's peak), and the child runs
  with ``MALLOC_MMAP_THRESHOLD_=65536`` so glibc returns freed tensors to the OS at once;
* on CUDA (``--device cuda``) ``torch.cuda.max_memory_allocated()`` after
  ``reset_peak_memory_stats()``, minus the memory allocated before the call.

Methods: ``train_step`` (train mode, forward + backward + SGD-momentum step on the probe batch),
one Hessian-vector product (operator set-up + one double-backward product: the HVP's own peak),
``ours`` (``hessian_eigenvalues``, tol 1e-4, eigenvectors kept as the monitor keeps them) with
route ``double_backward`` and ``functorch``, PyHessian 0.1 (defaults) and hessian-eigenthings
1.0.0a5 (defaults, and m = 4k + 20 with reorthogonalisation); missing peers are skipped.

    python benchmarks/memory.py                    # both models, k = 20, CPU
    python benchmarks/memory.py --quick            # < 60 s smoke run (small CNN, k = 5, 3 methods)
    python benchmarks/memory.py --out benchmarks/results_memory.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_cpu's models and runners
from bench_cpu import (
    OUR_TOL,
    Problem,
    _eigenthings,
    _pyhessian,
    cpu_model,
    library_fingerprint,
    make_cnn,
    make_gpt,
    run_eigenthings,
)

import lightning_landscape as ll
from lightning_landscape.operators import default_max_basis

MAKERS = {"resnet": make_cnn, "gpt": make_gpt}
METHODS = (
    "train_step",
    "one HVP (double_backward)",
    "ours double_backward",
    "ours functorch",
    "PyHessian (defaults)",
    "eigenthings (defaults)",
    "eigenthings m=4k+20 reorth",
)
MiB = 2.0**20


def _status_kib(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{key}:\s+(\d+) kB", text, re.M).group(1))  # type: ignore[union-attr]


def _reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_above_baseline(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """Run ``fn``: the peak resident memory above the current one (MiB), seconds, its value.

    Raises:
        OSError: where the high-water mark cannot be reset (``/proc/self/clear_refs``).
    """
    gc.collect()
    base = _status_kib("VmRSS")
    if not _reset_hwm():
        raise OSError("cannot reset the RSS high-water mark (/proc/self/clear_refs)")
    t0 = time.perf_counter()
    value = fn()
    return (_status_kib("VmHWM") - base) / 1024, time.perf_counter() - t0, value


def _to(batch: Any, device: torch.device) -> Any:
    return tuple(t.to(device) for t in batch)


def method_fn(prob: Problem, method: str, device: torch.device) -> Callable[[int], Any]:
    """A callable ``fn(k)`` running ``method`` once on ``prob`` (model and batch on device)."""
    model, batch = prob.model, prob.batch
    if method == "train_step":
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

        def step(_: int) -> None:
            model.train()
            opt.zero_grad(set_to_none=True)
            prob.loss_fn(model, batch).backward()
            opt.step()
            model.eval()

        return step
    if method.startswith("one HVP"):

        def one_hvp(_: int) -> Any:
            with ll.curvature_context(model):
                op = ll.HessianOperator(model, prob.loss_fn, [batch], route="double_backward")
                v = torch.randn(op.size, 1, dtype=op.dtype, device=op.device)
                out = op.matmat(v)
                op.release()
            return out

        return one_hvp
    if method.startswith("ours"):
        route = method.split()[1]
        return lambda k: ll.hessian_eigenvalues(
            model, prob.loss_fn, batch, k, tol=OUR_TOL, route=route, return_eigenvectors=True
        )
    if method.startswith("PyHessian"):
        found = _pyhessian()
        assert found is not None

        def pyhessian(k: int) -> Any:
            torch.manual_seed(0)
            ph = found[1](
                prob.ph_model, nn.CrossEntropyLoss(), data=prob.ph_data, cuda=device.type == "cuda"
            )
            out = ph.eigenvalues(top_n=k)
            for p in model.parameters():  # PyHessian leaves graph-carrying .grad tensors
                p.grad = None
            return out

        return pyhessian
    tuned = "reorth" in method
    return lambda k: run_eigenthings(prob, k, tuned)


def child(args: argparse.Namespace) -> dict[str, Any]:
    """Measure one method in this (fresh) process."""
    import warnings

    warnings.filterwarnings("ignore")
    device = torch.device(args.device)
    prob = MAKERS[args.child_model](args.quick, 0)
    prob.model.load_state_dict(torch.load(args.state, weights_only=True))
    prob.model.to(device).eval()
    prob.batch = _to(prob.batch, device)
    prob.ph_data = _to(prob.ph_data, device)
    fn = method_fn(prob, args.child_method, device)
    fn(1)  # warm-up
    gc.collect()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    base_rss = _status_kib("VmRSS")
    hwm_reset = _reset_hwm()
    t0 = time.perf_counter()
    fn(args.k)
    if cuda:
        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    peak_rss = (
        _status_kib("VmHWM") if hwm_reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    )
    out = {
        "seconds": secs,
        "rss_base_mib": base_rss / 1024,
        "rss_peak_mib": peak_rss / 1024,
        "rss_delta_mib": (peak_rss - base_rss) / 1024,
        "hwm_reset": hwm_reset,
    }
    if cuda:
        out["cuda_base_mib"] = base / MiB
        out["cuda_delta_mib"] = (torch.cuda.max_memory_allocated() - base) / MiB
    out["delta_mib"] = out["cuda_delta_mib" if cuda else "rss_delta_mib"]
    return out


def spawn(model: str, method: str, state: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child-model", model, "--child-method", method]
    cmd += ["--state", state, "--device", args.device, "--k", str(args.k)]
    cmd += ["--threads", str(args.threads)] + (["--quick"] if args.quick else [])
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "131072"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(lines[-1][len("RESULT ") :])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="resnet,gpt", help="comma list from: resnet, gpt")
    ap.add_argument("--k", type=int, default=None, help="eigenpairs (default 20; quick: 5)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in each child")
    ap.add_argument("--train-steps", type=int, default=None, help="as bench_cpu (default 60)")
    ap.add_argument("--out", default=None, help="write rows + metadata to this JSON path")
    ap.add_argument("--quick", action="store_true", help="small smoke run (< 60 s)")
    ap.add_argument("--child-model", help=argparse.SUPPRESS)
    ap.add_argument("--child-method", help=argparse.SUPPRESS)
    ap.add_argument("--state", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.k = args.k or (5 if args.quick else 20)
    torch.set_num_threads(args.threads)
    if args.child_model:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return
    steps = args.train_steps if args.train_steps is not None else (20 if args.quick else 60)
    if args.quick:  # child start-up (imports) dominates: one model, three methods
        args.models = args.models if args.models != "resnet,gpt" else "resnet"
    methods = list(METHODS[:3] if args.quick else METHODS)
    methods = [m for m in methods if not m.startswith("PyHessian") or _pyhessian() is not None]
    methods = [m for m in methods if not m.startswith("eigenthings") or _eigenthings()]
    meta = {
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": args.device,
        "cpu": cpu_model(),
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        "torch": torch.__version__,
        "threads": args.threads,
        "loadavg_start": os.getloadavg(),
        "lightning_landscape_src_sha256_16": library_fingerprint(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "k": args.k,
        "skipped": [m for m in METHODS if m not in methods and not args.quick],
    }
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            prob = MAKERS[name](args.quick, steps)  # trained here once, as in bench_cpu
            state = str(Path(tmp) / f"{name}.pt")
            torch.save(prob.model.state_dict(), state)
            n = prob.params
            basis = (default_max_basis(args.k, n) + 1) * n * 4 / MiB
            for method in methods:
                r = {"model": name, "params": n, "method": method, "k": args.k}
                r.update(spawn(name, method, state, args))
                if method.startswith("ours"):
                    r["krylov_basis_mib"] = basis
                rows.append(r)
                print(f"  {json.dumps(r)}", flush=True)
    meta["loadavg_end"] = os.getloadavg()
    print(f"\n{'model':<7} {'params':>7} {'method':<27} {'k':>3} {'peak MiB':>9} {'x train':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['model']:<7} {r['params']:>7} {r['method']:<27} FAILED: {r['error']}")
            continue
        train = next(t for t in rows if t["model"] == r["model"] and t["method"] == "train_step")
        r["ratio_vs_train_step"] = r["delta_mib"] / train["delta_mib"]
        print(
            f"{r['model']:<7} {r['params']:>7} {r['method']:<27} {r['k']:>3} "
            f"{r['delta_mib']:>9.1f} {r['ratio_vs_train_step']:>7.2f}x"
        )
    if meta["skipped"]:
        print(f"skipped (not importable): {meta['skipped']}")
    print(f"load average: start {meta['loadavg_start']}, end {meta['loadavg_end']}")
    if args.out:
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
