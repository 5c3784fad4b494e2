#!/usr/bin/env python
"""Real sizes: top-k eigenvalues on an 11 M-parameter ResNet-18 against curvlinops, and memory on a
27 M-parameter GPT against an AdamW training step.

Speed (``--sections speed``): a torchvision-style ResNet-18 (7×7 stem, max-pool, [2, 2, 2, 2] basic
blocks with BatchNorm, 10 classes: 11.18 M parameters; random init, ``eval()`` mode) on 16 random
CIFAR-shape samples. For k = 1, 5, 20 in one process, float32, same batch:

* ours: ``lightning_landscape.hessian_eigenvalues(model, loss, batch, k, tol=1e-4)`` (route
  ``auto``), with the time spent inside Hessian-vector products measured separately, so that the
  solver's own share ("overhead") is the rest;
* curvlinops 3.0.1: ``HessianLinearOperator(...).to_scipy()`` + SciPy ``eigsh(k, which="LA",
  tol=1e-4)``, its documented path.

"agree" is the largest relative difference between our k eigenvalues and curvlinops'.
``--repeats N`` times each library N times per k, interleaved (ours, curvlinops, ours, ...), and
compares the median runs: this machine's speed drifts by tens of percent over minutes.
``--sections probe-size``: ours alone for k = 1, 5 at the monitor's default probe size (256
samples), where a product is dearer and the solver's share correspondingly smaller.
``--sections compiled``: seconds per product of the two eager exact routes against
``route="compiled"`` (``torch.compile`` of the whole ``torch.func`` product), and the compile
time, on the ResNet-18 and on the GPT below.

Memory (``--sections memory``): a GPT (6 layers, d = 512, 8 heads, vocab 8192, explicit attention:
27.3 M parameters) on 8 × 128 random tokens. Each method runs in a fresh child process after one
AdamW step and one Hessian-vector product as a warm-up, then measured: peak RSS above the RSS just
before the call (``/proc/self/clear_refs`` resets the high-water mark; glibc returns freed memory
at once with ``MALLOC_MMAP_THRESHOLD_``). Methods: one AdamW training step (the reference), one
Hessian-vector product, a λ_max solve (k = 1) and a top-5 solve, each ``hessian_eigenvalues(...,
tol=1e-4, return_eigenvectors=True)``; then the same with the memory caps: micro-batches of one
sequence (``micro_batch_size=1``) and the Krylov basis bounded in bytes (``max_basis_bytes``: 8
parameter vectors for λ_max, 13 for the top 5).

    python benchmarks/real_sizes.py --sections speed,compiled,memory \
        --out benchmarks/results_real_sizes.json
    python benchmarks/real_sizes.py --sections probe-size --out benchmarks/results_probe_size.json
    python benchmarks/real_sizes.py --quick     # < 60 s smoke run (small widths)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cpu import (
    OUR_TOL,
    FlatLogits,
    Problem,
    TinyGPT,
    _curvlinops,
    cpu_model,
    gpt_loss,
    library_fingerprint,
    run_curvlinops,
    version_of,
)
from memory import peak_above_baseline

import lightning_landscape as ll
from lightning_landscape import functional as ll_functional
from lightning_landscape.cli.demo import BasicBlock

MiB = 2.0**20


# --------------------------------------------------------------------------------------- models
class TorchvisionResNet18(nn.Module):
    """torchvision's ``resnet18`` layout (defined here: its wheel does not load on these CPUs).

    The demo's :class:`~lightning_landscape.cli.demo.BasicBlock` is torchvision's basic block; what
    differs from the demo's CIFAR ResNet-18 is the 7×7 stride-2 stem and the max-pool.
    """

    def __init__(self, num_classes: int = 10, width: int = 64) -> None:
        super().__init__()
        w = width
        self.conv1 = nn.Conv2d(3, w, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        layers: list[nn.Module] = []
        cin = w
        for cout, stride in [(w, 1), (2 * w, 2), (4 * w, 2), (8 * w, 2)]:
            layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(8 * w, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layers(self.maxpool(F.relu(self.bn1(self.conv1(x)))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def cnn_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def make_resnet18(quick: bool, samples: int = 16) -> Problem:
    torch.manual_seed(0)
    model = TorchvisionResNet18(width=16 if quick else 64).eval()
    g = torch.Generator().manual_seed(1)
    batch = (
        torch.randn(samples, 3, 32, 32, generator=g),
        torch.randint(0, 10, (samples,), generator=g),
    )
    desc = (
        f"torchvision-style ResNet-18 (BN, eval), {samples} x 3x32x32 random samples, random init"
    )
    return Problem("resnet18", desc, model, cnn_loss, batch, model, batch)


def make_gpt27m(quick: bool) -> Problem:
    vocab, t, d, heads, layers = (512, 32, 64, 4, 2) if quick else (8192, 128, 512, 8, 6)
    torch.manual_seed(0)
    model = TinyGPT(vocab, t, d, heads, layers).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, vocab, (8, t), generator=g)
    y = torch.randint(0, vocab, (8, t), generator=g)
    desc = (
        f"GPT ({layers} x d={d}, {heads} heads, vocab {vocab}, explicit attention), 8 x {t} tokens"
    )
    return Problem(
        "gpt27m", desc, model, gpt_loss, (x, y), FlatLogits(model).eval(), (x, y.reshape(-1))
    )


MAKERS = {"resnet18": make_resnet18, "gpt27m": make_gpt27m}


# ---------------------------------------------------------------------------------------- speed
class _TimedOperator(ll.HessianOperator):
    """Counts the seconds spent in Hessian-vector products of the last operator built."""

    last: _TimedOperator | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hvp_seconds = 0.0
        _TimedOperator.last = self

    def _matmat(self, block: Tensor) -> Tensor:
        t0 = time.perf_counter()
        out = super()._matmat(block)
        self.hvp_seconds += time.perf_counter() - t0
        return out

    def _matvec_into(self, v: Tensor, out: Tensor) -> Tensor:  # Lanczos' single-vector steps
        t0, before = time.perf_counter(), self.hvp_seconds
        result = super()._matvec_into(v, out)
        self.hvp_seconds = before + time.perf_counter() - t0  # once, if it went through _matmat
        return result


def run_ours_timed(prob: Problem, k: int) -> dict[str, Any]:
    saved = ll_functional.HessianOperator
    ll_functional.HessianOperator = _TimedOperator  # type: ignore[misc]
    try:
        t0 = time.perf_counter()
        res = ll.hessian_eigenvalues(prob.model, prob.loss_fn, prob.batch, k, tol=OUR_TOL)
        secs = time.perf_counter() - t0
    finally:
        ll_functional.HessianOperator = saved  # type: ignore[misc]
    op = _TimedOperator.last
    assert op is not None
    return {
        "seconds": secs,
        "hvps": op.num_matvecs,
        "hvp_seconds": op.hvp_seconds,
        "overhead": 1.0 - op.hvp_seconds / secs,
        "route": op.route,
        "restarts": res.num_restarts,
        "converged": bool(res.converged.all()),
        "max_residual": float(res.residuals.max()),
        "vals": res.eigenvalues.tolist(),
    }


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run of median seconds (the lower middle one for an even count), with every run's time."""
    ordered = sorted(runs, key=lambda r: r["seconds"])
    return {**ordered[(len(ordered) - 1) // 2], "all_seconds": [r["seconds"] for r in runs]}


def speed(prob: Problem, ks: list[int], peers: bool, repeats: int = 1) -> list[dict[str, Any]]:
    """Per k, ``repeats`` timed solves of ours and of curvlinops, interleaved (ours, theirs, ours,
    ...), so that a slow spell of a shared machine falls on both; medians are compared."""
    rows: list[dict[str, Any]] = []
    run_ours_timed(prob, 1)  # warm-up (lazy kernel set-up)
    for k in ks:
        mine: list[dict[str, Any]] = []
        theirs: list[dict[str, Any]] = []
        for _ in range(repeats):
            mine.append(run_ours_timed(prob, k))
            if peers:
                theirs.append(run_curvlinops(prob, k))
        ours = _median_run(mine)
        row: dict[str, Any] = {"model": prob.name, "params": prob.params, "k": k, "ours": ours}
        if peers:
            cl = _median_run(theirs)
            a = sorted(ours["vals"], reverse=True)
            b = sorted(cl["vals"], reverse=True)
            row["curvlinops"] = cl
            row["agree"] = max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True))
            row["speedup_vs_curvlinops"] = cl["seconds"] / ours["seconds"]
            row["speedup_per_pair"] = [
                c["seconds"] / o["seconds"] for o, c in zip(mine, theirs, strict=True)
            ]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


# ------------------------------------------------------------------------------------- compiled
def compiled(prob: Problem, repeats: int = 5, width: int = 4) -> dict[str, Any]:
    """Seconds per product of the three exact routes of ``HessianOperator`` on one model: the
    double backward, forward-over-reverse (``functorch``) and ``compiled`` (``torch.compile`` of
    that product, as curvlinops compiles it), each the median of ``repeats`` products after a
    first one, which for ``compiled`` is the compilation (its seconds are reported); then the
    same per vector for blocks of ``width`` vectors (a vmapped product; for ``compiled`` a
    second compilation). ``auto`` takes a compiled route only where it measured faster."""
    model, batch = prob.model, prob.batch
    g = torch.Generator().manual_seed(5)
    v = torch.randn(prob.params, generator=g)
    block = torch.randn(prob.params, width, generator=g)
    row: dict[str, Any] = {"model": prob.name, "params": prob.params, "repeats": repeats}
    products: dict[str, Tensor] = {}

    def median_seconds(fn: Any) -> float:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2]

    with ll.curvature_context(model):
        for route in ("double_backward", "functorch", "compiled"):
            op = ll.HessianOperator(model, prob.loss_fn, [batch], route=route)
            t0 = time.perf_counter()
            products[route] = op.matvec(v)
            row[f"{route}_first_seconds"] = time.perf_counter() - t0
            row[route] = median_seconds(lambda op=op: op.matvec(v))
            t0 = time.perf_counter()
            op.matmat(block)
            row[f"{route}_block_first_seconds"] = time.perf_counter() - t0
            per_block = median_seconds(lambda op=op: op.matmat(block))
            row[f"{route}_block_per_vector"] = per_block / width
            row[f"{route}_resolved"] = op.route  # "functorch" if the compilation fell back
            op.release()
    row["block_width"] = width
    exact = products["double_backward"]
    for route in ("functorch", "compiled"):
        row[f"{route}_rel_diff"] = float((products[route] - exact).norm() / exact.norm())
    print(json.dumps(row), flush=True)
    return row


# --------------------------------------------------------------------------------------- memory
def child(model_name: str, method: str, quick: bool) -> dict[str, Any]:
    import warnings

    warnings.filterwarnings("ignore")
    prob = MAKERS[model_name](quick)
    model, batch = prob.model, prob.batch
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train_step() -> None:
        model.train()
        opt.zero_grad(set_to_none=True)
        prob.loss_fn(model, batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.eval()

    train_step()  # AdamW's state exists before anything is measured, for every method

    # "<name> [k=K] [micro=M] [basis=V]": micro-batches of M samples (graphs built one at a time)
    # and a Krylov basis of V vectors (max_basis_bytes = V vectors, the "+ 1" included).
    name, *opts = method.split()
    kw = dict(opt.split("=") for opt in opts)
    micro = int(kw["micro"]) if "micro" in kw else None
    batches = [batch] if micro is None else ll.split_batch(batch, micro)

    def run() -> Any:
        if name == "train_step":
            return train_step()
        if name == "one_hvp":
            with ll.curvature_context(model):
                op = ll.HessianOperator(model, prob.loss_fn, batches)
                out = op.matvec(torch.randn(op.size))
                op.release()
            return out
        vector = sum(p.numel() * p.element_size() for p in model.parameters())
        return ll.hessian_eigenvalues(
            model,
            prob.loss_fn,
            batch,
            int(kw["k"]),
            tol=OUR_TOL,
            return_eigenvectors=True,
            micro_batch_size=micro,
            max_basis_bytes=int(kw["basis"]) * vector if "basis" in kw else None,
        )

    # Warm-up: one training step ran above; one Hessian-vector product sets up autograd's and the
    # allocator's lazy state (a full warm-up solve would double the cost of the run).
    with ll.curvature_context(model):
        warm = ll.HessianOperator(model, prob.loss_fn, [batch])
        warm.matvec(torch.randn(warm.size))
        warm.release()
    del warm
    delta_mib, secs, out = peak_above_baseline(run)
    row = {"seconds": secs, "delta_mib": delta_mib}
    if hasattr(out, "num_hvps"):
        row["hvps"] = out.num_hvps
    return row


# The default solves, then the memory caps: micro-batches of one sequence and a basis bounded
# in bytes (8 vectors for λ_max, 13 for the top 5).
METHODS = (
    "train_step",
    "one_hvp",
    "eig k=1",
    "eig k=5",
    "one_hvp micro=1",
    "eig k=1 micro=1 basis=8",
    "eig k=5 micro=1 basis=13",
)


def memory(model_name: str, quick: bool) -> list[dict[str, Any]]:
    rows = []
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "131072"}
    for method in METHODS:
        cmd = [sys.executable, __file__, "--child", model_name, method]
        cmd += ["--quick"] if quick else []
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        row: dict[str, Any] = {"model": model_name, "method": method}
        if proc.returncode != 0 or not lines:
            row["error"] = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        else:
            row.update(json.loads(lines[-1][len("RESULT ") :]))
        rows.append(row)
    train = rows[0].get("delta_mib")
    for row in rows:
        if train and "delta_mib" in row:
            row["ratio_vs_train_step"] = row["delta_mib"] / train
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--sections",
        default="speed,memory",
        help="comma list: speed, memory, compiled, probe-size",
    )
    ap.add_argument("--ks", default=None, help="comma list of k (default 1,5,20; quick: 1,3)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="speed: timed solves per library and k, interleaved; medians compared (default 1)",
    )
    ap.add_argument("--no-peers", action="store_true", help="only lightning_landscape")
    ap.add_argument("--out", default=None, help="write rows + metadata to this JSON path")
    ap.add_argument("--quick", action="store_true", help="small smoke run (< 60 s)")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print("RESULT " + json.dumps(child(*args.child, args.quick)), flush=True)
        return
    ks = [int(k) for k in (args.ks or ("1,3" if args.quick else "1,5,20")).split(",")]
    peers = not args.no_peers and _curvlinops() is not None
    sections = args.sections.split(",")
    meta = {
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "loadavg_start": os.getloadavg(),
        "torch": torch.__version__,
        "curvlinops": version_of("curvlinops-for-pytorch") if peers else None,
        "scipy": version_of("scipy") if peers else None,
        "lightning_landscape_src_sha256_16": library_fingerprint(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "tol": OUR_TOL,
        "repeats": args.repeats,
    }
    print(json.dumps(meta), flush=True)
    out: dict[str, Any] = {"meta": meta}
    if "speed" in sections:
        prob = make_resnet18(args.quick)
        print(f"== speed: {prob.desc}; {prob.params} parameters", flush=True)
        out["speed"] = speed(prob, ks, peers, args.repeats)
    if "probe-size" in sections:  # the monitor's default probe data: 256 samples, ours only
        prob = make_resnet18(args.quick, samples=32 if args.quick else 256)
        print(f"== solver share at the monitor's probe size: {prob.desc}", flush=True)
        out["probe_size"] = speed(prob, ks[:2], peers=False)
    if "compiled" in sections:
        out["compiled"] = []
        for make in (make_resnet18, make_gpt27m):
            prob = make(args.quick)
            print(f"== compiled HVP: {prob.desc}", flush=True)
            out["compiled"].append(compiled(prob))
    if "memory" in sections:
        print("== memory: " + make_gpt27m(args.quick).desc, flush=True)
        out["memory"] = memory("gpt27m", args.quick)
    meta["loadavg_end"] = os.getloadavg()
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
