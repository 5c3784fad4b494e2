#!/usr/bin/env python
"""Benchmark of Δ₂^(D): Gaussian-moment closed form (gm) vs Monte Carlo (qmc, mc), stage by stage.

For each model (trained a few dozen seeded SGD steps, no downloads) the script times, each the
median of ``--repeats`` runs after a warm-up, mirroring ``lightning_landscape.stabilization``:

* Stage I: ``HessianOperator`` of ``L_k`` + thick-restart Lanczos for the top-D eigenvectors;
* Stage II: ``a = L_{k+1} − L_k``, ``c = U_Dᵀ(g^(k+1) − g^(k))``, ``B`` (D HVPs per Hessian);
* Stage III: ``gm`` (``_gaussian_moment``), ``qmc`` (S draws on the quadratic model) and ``mc``
  (S draws on the true losses, 2 forwards each); gm and qmc as the mean over a loop of calls;
* end to end: ``stabilization(estimator="gm")`` vs ``stabilization(estimator="mc")`` (both run
  Stages I and II), and, for context, ``full_space_delta2`` with S draws.

It also checks agreement: |gm − mc| / stderr(mc), with mc and qmc on common random numbers.
Models: ``gpt`` and ``cnn`` (from ``bench_cpu.py``), ``gpt11m`` (the 11 M-parameter GPT of
``anchors.md``: 6 layers, d=384, vocab 512, 16 × 256 tokens; meant for ``--device cuda``).
``--quick`` is a < 30 s smoke test.
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
for _p in (HERE.parent, HERE):  # run from a checkout without an editable install
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from bench_cpu import (  # noqa: E402
    TinyGPT,
    cpu_model,
    fib_mod_batch,
    gpt_loss,
    library_fingerprint,
    make_cnn,
    make_gpt,
    train_fib_gpt,
)

import lightning_landscape as ll  # noqa: E402
from lightning_landscape import curvature_context, full_space_delta2, stabilization  # noqa: E402
from lightning_landscape.metrics.delta2 import (  # noqa: E402
    _first,
    _gaussian_moment,
    _loss_gap_mc,
    _mean_stderr,
)
from lightning_landscape.operators import HessianOperator  # noqa: E402
from lightning_landscape.solvers import lanczos  # noqa: E402


def make_gpt11m(steps: int, device: str) -> tuple[dict[str, Any], nn.Module, Any, Any]:
    """anchors.md GPT-11M shape, trained on device on the fib-mod task (bench_cpu's data)."""
    vocab, t, d, heads, layers, b = 512, 256, 384, 6, 6, 16
    torch.manual_seed(0)
    model = TinyGPT(vocab, t, d, heads, layers).to(device)
    g = torch.Generator().manual_seed(2)
    losses = train_fib_gpt(model, steps, b, t, vocab, g, device)
    probe = tuple(
        s.to(device) for s in fib_mod_batch(b, t, vocab, torch.Generator().manual_seed(3))
    )
    desc = f"GPT-11M ({layers} layers, d={d}, {heads} heads, vocab {vocab}), B={b}x{t} tokens"
    train = {"steps": steps, "loss_first": losses[:1], "loss_last": losses[-1:]}
    return {"name": "gpt11m-fibmod", "desc": desc, "train": train}, model, gpt_loss, probe


def build(
    name: str, quick: bool, steps: int, device: str
) -> tuple[dict[str, Any], nn.Module, Any, Any]:
    if name == "gpt11m":
        return make_gpt11m(steps, device)
    prob = {"gpt": make_gpt, "cnn": make_cnn}[name](quick, steps)  # trained on the CPU
    info = {"name": prob.name, "desc": prob.desc, "train": prob.train}
    return info, prob.model.to(device), prob.loss_fn, tuple(t.to(device) for t in prob.batch)


def bench_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    info, model, loss_fn, batch = build(name, args.quick, args.train_steps, args.device)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    k = args.k if args.k is not None else batch[0].shape[0] // 2
    D, S, sigma, tol = args.D, args.samples, args.sigma, args.tol
    seed, reps = args.seed, args.repeats
    small, large = _first(batch, k), _first(batch, k + 1)
    cuda = args.device == "cuda"

    def clock() -> float:  # wall clock after the queued kernels finished
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    # ---- Stages I and II, exactly as in stabilization() (op_k's retained graph reused for B)
    st: dict[str, list[float]] = {"stage1": [], "stage2": []}
    for r in range(reps + 1):  # r = 0: warm-up
        with curvature_context(model):
            t0 = clock()
            op_k = HessianOperator(model, loss_fn, [small], route=args.route)
            eig = lanczos(op_k, D, which="largest", tol=tol, seed=seed)
            assert eig.eigenvectors is not None
            U = eig.eigenvectors
            t1 = clock()
            hvps1 = op_k.num_matvecs
            op_k1 = HessianOperator(model, loss_fn, [large], route=args.route)
            h_k = (U.T @ op_k.matmat(U)).to(device="cpu", dtype=torch.float64)
            h_k1 = (U.T @ op_k1.matmat(U)).to(device="cpu", dtype=torch.float64)
            B = 0.5 * (h_k1 + h_k1.T) - 0.5 * (h_k + h_k.T)
            with op_k._differentiable():
                g_diff = op_k1._gradient() - op_k._gradient()
            c = (U.T @ g_diff).to(device="cpu", dtype=torch.float64)
            a = op_k1.loss_value - op_k.loss_value
            t2 = clock()
            hvps2 = op_k.num_matvecs - hvps1 + op_k1.num_matvecs
            route, params = op_k.route, op_k.params
            op_k.release()
            op_k1.release()
        if r:
            st["stage1"].append(t1 - t0)
            st["stage2"].append(t2 - t1)

    # ---- Stage III: the three evaluations on the same (a, c, B, U)
    gen = torch.Generator().manual_seed(seed)

    def gm() -> Any:
        return _gaussian_moment(a, c, B, sigma)

    def qmc() -> Any:
        z = sigma * torch.randn(S, D, generator=gen, dtype=torch.float64)
        q = a + z @ c + 0.5 * ((z @ B) * z).sum(dim=1)
        return _mean_stderr(q * q)

    def mc() -> Any:
        z = sigma * torch.randn(S, D, generator=gen, dtype=torch.float64)
        directions = U @ z.T.to(device=U.device, dtype=U.dtype)
        return _mean_stderr(_loss_gap_mc(model, loss_fn, small, large, params, directions.T))

    def batch_time(fn: Callable[[], Any], n: int) -> float:
        t0 = clock()
        for _ in range(n):
            fn()
        return (clock() - t0) / n

    evals: dict[str, Callable[[], Any]] = {"gm": gm, "qmc": qmc, "mc": mc}
    loops: dict[str, int] = {}
    with curvature_context(model):
        for key, fn in evals.items():  # warm-up, then double the loop until it takes min_time
            fn()
            n, min_time = 1, (args.min_loop_time if key != "mc" else 0.0)
            while batch_time(fn, n) * n < min_time:
                n *= 2
            loops[key] = n
        st |= {key: [] for key in evals}
        for _ in range(reps):  # round-robin, so background load hits all three alike
            for key, fn in evals.items():
                st[key].append(batch_time(fn, loops[key]))

    # ---- end to end: stabilization(gm) vs stabilization(mc), and the full-space MC for context
    common = {"D": D, "sigma": sigma, "tol": tol, "route": args.route, "seed": seed}
    runs: dict[str, Callable[[], Any]] = {
        "e2e_gm": lambda: stabilization(model, loss_fn, batch, k, estimator="gm", **common),
        "e2e_mc": lambda: stabilization(
            model, loss_fn, batch, k, estimator="mc", num_samples=S, **common
        ),
        "full_space_mc": lambda: full_space_delta2(
            model, loss_fn, batch, k, sigma=sigma, num_samples=S, seed=seed
        ),
    }
    out: dict[str, Any] = {}
    st |= {key: [] for key in runs}
    for r in range(reps + 1):
        for key, fn in runs.items():
            t0 = clock()
            out[key] = fn()
            if r:
                st[key].append(clock() - t0)

    res_gm, res_mc, (fs_val, fs_se) = out["e2e_gm"], out["e2e_mc"], out["full_space_mc"]
    z = sigma * torch.randn(
        S, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )
    q = res_gm.a + z @ res_gm.c + 0.5 * ((z @ res_gm.B) * z).sum(dim=1)
    qmc_val, qmc_se = _mean_stderr(q * q)  # = stabilization(estimator="qmc"), same draws as mc
    med = {key: statistics.median(v) for key, v in st.items()}
    gm_v, mc_v, mc_se = res_gm.value, res_mc.value, res_mc.stderr
    row = {**info, "params": n_params, "k": k, "D": D, "S": S, "sigma": sigma, "route": route}
    row |= {"stage1_hvps": hvps1, "stage2_hvps": hvps2, "converged": bool(res_gm.converged)}
    row |= {"eval_loop_calls": loops, "seconds": med, "seconds_all": st}
    row |= {
        "speedup_eval_mc_over_gm": med["mc"] / med["gm"],
        "speedup_eval_mc_over_qmc": med["mc"] / med["qmc"],
        "speedup_e2e_mc_over_gm": med["e2e_mc"] / med["e2e_gm"],
    }
    row |= {"a": res_gm.a, "gm": gm_v, "qmc": qmc_val, "qmc_stderr": qmc_se}
    row |= {"mc": mc_v, "mc_stderr": mc_se, "gm_mc_z": abs(gm_v - mc_v) / mc_se}
    row |= {
        "gm_mc_rel": abs(gm_v - mc_v) / abs(mc_v),
        "full_space": fs_val,
        "full_space_stderr": fs_se,
    }
    print(json.dumps({x: row[x] for x in ("name", "params", "seconds", "gm", "mc", "mc_stderr")}))
    return row


def g3(x: float) -> str:
    return f"{x:.3g}"


def print_tables(rows: list[dict[str, Any]]) -> None:
    print(
        "\n| model | params | k | D | S | Stage I s (HVPs) | Stage II s (HVPs) | GM eval s | "
        "QMC eval s | MC eval s | MC/GM eval | e2e GM s | e2e MC s | MC/GM e2e | full-space MC s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        s = r["seconds"]
        print(
            f"| {r['name']} | {r['params']:,} | {r['k']} | {r['D']} | {r['S']} | "
            f"{g3(s['stage1'])} ({r['stage1_hvps']}) | {g3(s['stage2'])} ({r['stage2_hvps']}) | "
            f"{s['gm']:.2e} | {s['qmc']:.2e} | {g3(s['mc'])} | "
            f"{r['speedup_eval_mc_over_gm']:,.0f}× | {g3(s['e2e_gm'])} | {g3(s['e2e_mc'])} | "
            f"{r['speedup_e2e_mc_over_gm']:.2f}× | {g3(s['full_space_mc'])} |"
        )
    print("\n| model | σ | a | GM | QMC ± se | MC ± se | abs(GM−MC)/se(MC) | full-space MC ± se |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['name']} | {r['sigma']:g} | {r['a']:.4g} | {r['gm']:.6g} | "
            f"{r['qmc']:.6g} ± {r['qmc_stderr']:.2g} | {r['mc']:.6g} ± {r['mc_stderr']:.2g} | "
            f"{r['gm_mc_z']:.2f} | {r['full_space']:.6g} ± {r['full_space_stderr']:.2g} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=None, help="comma list of gpt, cnn, gpt11m")
    ap.add_argument("--D", type=int, default=None, help="subspace dimension (default 10; quick 4)")
    ap.add_argument("--k", type=int, default=None, help="samples of L_k (default: batch // 2)")
    ap.add_argument("--sigma", type=float, default=1e-3)
    ap.add_argument("--samples", type=int, default=64, help="Monte Carlo draws S")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs, median (default 5)")
    ap.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's; quick: 1)"
    )
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--tol", type=float, default=1e-6, help="Lanczos tol (stabilization default)")
    ap.add_argument("--route", default="auto", help="HVP route of HessianOperator")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-steps", type=int, default=None, help="SGD steps (default 60)")
    ap.add_argument("--min-loop-time", type=float, default=0.2, help="s per gm/qmc timing loop")
    ap.add_argument("--out", default=None, help="write rows + metadata to this JSON path")
    ap.add_argument("--quick", action="store_true", help="small smoke run (< 30 s on 2 cores)")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but torch.cuda.is_available() is False")
    default_models = "gpt,cnn" + (",gpt11m" if args.device == "cuda" and not args.quick else "")
    models = (args.models or default_models).split(",")
    args.D = args.D or (4 if args.quick else 10)
    args.repeats = args.repeats or (1 if args.quick else 5)
    args.train_steps = (
        args.train_steps if args.train_steps is not None else (10 if args.quick else 60)
    )
    if args.quick:
        args.min_loop_time = min(args.min_loop_time, 0.05)
    if args.threads or args.quick:  # quick: 1 thread, robust to other processes on the cores
        torch.set_num_threads(args.threads or 1)
    if args.device == "cuda":  # fp32 throughout, as in anchors.md (TF32 off)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False

    meta = {
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
        "loadavg_start": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning_landscape": ll.__version__,
        "lightning_landscape_src_sha256_16": library_fingerprint(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "args": vars(args),
        "dtype": "float32",
    }
    print(json.dumps(meta))
    t_start = time.perf_counter()
    rows = [bench_model(name, args) for name in models]
    meta["total_seconds"] = time.perf_counter() - t_start
    meta["loadavg_end"] = os.getloadavg()
    print_tables(rows)
    print(
        f"\ntotal {meta['total_seconds']:.1f} s; load average at start {meta['loadavg_start']}, "
        f"at end {meta['loadavg_end']} ({meta['torch_threads']} torch threads)"
    )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
