#!/usr/bin/env python
"""One prepared GPU run (≤ 8 minutes on one H100/H200): ours against the anchors, in one process.

For each model of ``../shared/bench/anchor_gpu.py`` (ResNet-18 at 128 CIFAR samples, GPT-11M at
16 × 256 tokens, GPT-98M at 8 × 512 tokens; built by that file's own ``problem()`` so models,
batches and the 30 SGD warm-up steps are identical), float32 with TF32 off, ``eval()`` mode:

* a reference spectrum: that file's ``ref_lanczos`` (full reorthogonalisation) for ``--truth-m``
  steps on its retained-graph HVP;
* ours: ``hessian_eigenvalues(..., k, tol=1e-4)`` with route ``auto`` (calibrated on the device),
  seconds (CUDA-synchronised), HVPs, relative error against the reference, and peak memory above
  the model's (``torch.cuda.max_memory_allocated``) next to a training step's;
* curvlinops + SciPy ``eigsh`` at the same tolerance, when importable;
* α: ``curvature_exponents`` on ResNet-18 (batched per-layer products), seconds;
* Δ₂^(D): ``stabilization`` on GPT-11M (D = 10), seconds;
* inside training (issue 16's ResNet-18 of ``real_sizes.py``, 16-sample batches, through
  ``warm_start.py`` on a one-GPU ``Trainer``): the default ``LandscapeMonitor()`` round's median
  cost in training steps (target ≤ 100) over 120 steps, and the median products of a warm-started
  λ_max probe (target ≤ 5) over 200 steps, both probing every 20 steps.

``--peers`` also re-runs the anchor file's own ``run()`` (PyHessian, hessian-eigenthings, the
reference Lanczos timings) in the same process first. Writes ``--out`` (JSON rows) and
``--markdown`` (a RESULTS.md section). ``--smoke`` runs tiny models on the CPU in seconds (used by
the test suite); without the anchor file it uses ``real_sizes.py``'s models instead.

    python benchmarks/gpu_suite.py --out benchmarks/results_gpu.json --markdown /tmp/gpu.md
    python benchmarks/gpu_suite.py --smoke
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

HERE = Path(__file__).resolve().parent
ANCHOR = HERE.parent.parent / "shared" / "bench" / "anchor_gpu.py"
sys.path.insert(0, str(HERE))

from bench_cpu import rel_err  # noqa: E402

import lightning_landscape as ll  # noqa: E402

TOL = 1e-4


def load_anchor(path: Path) -> ModuleType | None:
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location("anchor_gpu", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def build(anchor: ModuleType | None, name: str, device: str, smoke: bool) -> tuple[Any, ...]:
    """``(model, loss_fn(model, batch), batch, criterion)`` for one anchor model."""
    if anchor is not None:
        model, crit, x, y = anchor.problem(name, device, smoke)
    else:  # no anchor file: real_sizes.py's models at smoke size
        from real_sizes import make_gpt27m, make_resnet18

        prob = (make_resnet18 if name == "resnet18" else make_gpt27m)(True)
        model = prob.model.to(device)
        x, y = (t.to(device) for t in prob.batch)
        ce = nn.CrossEntropyLoss()

        def crit(out: Tensor, t: Tensor) -> Tensor:
            return ce(out.reshape(-1, out.shape[-1]), t.reshape(-1))

    def loss_fn(m: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        out: Tensor = crit(m(batch[0]), batch[1])
        return out

    return model, loss_fn, (x, y), crit


def timed(fn: Callable[[], Any], device: str) -> tuple[Any, float, float | None]:
    """``(result, seconds, peak MiB above the memory allocated before; None on the CPU)``."""
    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    out = fn()
    if cuda:
        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else None
    return out, secs, peak


def bench_model(
    anchor: ModuleType | None, name: str, ks: list[int], args: argparse.Namespace
) -> list[dict[str, Any]]:
    device = args.device
    model, loss_fn, batch, crit = build(anchor, name, device, args.smoke)
    n = sum(p.numel() for p in model.parameters())
    rows: list[dict[str, Any]] = []

    def emit(**kw: Any) -> None:
        row = {"model": name, "params": n, **kw}
        rows.append(row)
        print(json.dumps(row), flush=True)

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        model.train()
        opt.zero_grad(set_to_none=True)
        loss_fn(model, batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.eval()

    step()
    _, secs, peak = timed(step, device)
    emit(what="adamw_train_step", seconds=secs, peak_mib=peak)

    truth: list[float] | None = None
    if anchor is not None:
        hvp = anchor.Counted(model, crit, *batch)
        vals = anchor.ref_lanczos(hvp, hvp.n, max(ks), device, fixed_m=args.truth_m)
        truth = sorted((float(v) for v in vals[0]), reverse=True)[: max(ks)]
        del hvp
        emit(what="truth", m=args.truth_m, top=truth[:3])

    ll.hessian_eigenvalues(model, loss_fn, batch, 1, tol=TOL)  # warm-up: route calibration
    for k in ks:
        res, secs, peak = timed(
            lambda k=k: ll.hessian_eigenvalues(
                model, loss_fn, batch, k, tol=TOL, return_eigenvectors=True
            ),
            device,
        )
        vals = res.eigenvalues.tolist()
        emit(
            what="ours",
            k=k,
            seconds=secs,
            hvps=res.num_hvps,
            peak_mib=peak,
            converged=bool(res.converged.all()),
            rel_err=rel_err(vals, truth[:k]) if truth else None,
            top=vals[:3],
        )
        if args.curvlinops and k <= args.curvlinops_max_k:
            try:
                from bench_cpu import FlatLogits, Problem, run_curvlinops

                flat = FlatLogits(model)  # what curvlinops sees: CrossEntropyLoss on flat logits
                prob = Problem(
                    name, "", model, loss_fn, batch, flat, (batch[0], batch[1].reshape(-1))
                )
                cl, secs, peak = timed(lambda k=k, p=prob: run_curvlinops(p, k, TOL), device)
                emit(
                    what="curvlinops_eigsh",
                    k=k,
                    seconds=secs,
                    hvps=cl["hvps"],
                    peak_mib=peak,
                    rel_err=rel_err(cl["vals"], truth[:k]) if truth else None,
                )
            except Exception as err:  # report, keep going
                emit(what="curvlinops_eigsh", k=k, error=repr(err)[:300])
    if name == "resnet18":
        _, secs, peak = timed(
            lambda: ll.curvature_exponents(model, loss_fn, batch, top_k=4 if args.smoke else 20),
            device,
        )
        emit(what="alpha_curvature_exponents", seconds=secs, peak_mib=peak)
    if name == "gpt":
        _, secs, peak = timed(
            lambda: ll.stabilization(
                model, loss_fn, batch, max(1, len(batch[0]) // 2), D=3 if args.smoke else 10
            ),
            device,
        )
        emit(what="delta2_stabilization", seconds=secs, peak_mib=peak)
    return rows


def in_training(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Issue 16's in-training figures on the suite's device, through ``warm_start.py``."""
    import warm_start

    smoke = args.smoke
    accelerator = "gpu" if args.device == "cuda" else "cpu"
    every = "10" if smoke else "20"
    ns = warm_start.options(
        ["--every", every, "--tol", str(TOL), "--accelerator", accelerator]
        + (["--quick"] if smoke else [])
    )
    ns.steps = 30 if smoke else 120
    d = warm_start.run_default_monitor("resnet18", ns)
    rows = [
        {
            "model": "resnet18",
            "params": d["params"],
            "what": "default_round_in_steps",
            "value": d["median_round_in_steps"],
            "target": 100,
            "seconds": d["median_round_seconds"],
            "step_seconds": d["median_step_seconds"],
            "round_hvps": d["round_hvps"],
            "every_n_steps": ns.every,
        }
    ]
    ns.steps = 40 if smoke else 200
    w = warm_start.run("resnet18", 1, True, ns)
    rows.append(
        {
            "model": "resnet18",
            "params": w["params"],
            "what": "warm_lambda_max_hvps",
            "value": w["median_hvps"],
            "target": 5,
            "seconds": w["median_seconds"],
            "hvps_per_probe": w["hvps"],
            "converged": w["all_converged"],
            "every_n_steps": ns.every,
        }
    )
    for row in rows:
        print(json.dumps(row), flush=True)
    return rows


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        f"## GPU suite ({meta['device_name']}, {meta['date_utc'][:10]})",
        "",
        f"Command: `{meta['command']}`; torch {meta['torch']}; float32, TF32 off; tol {TOL:g}.",
        "",
        "| model | params | what | k | seconds | HVPs | rel. error | peak MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    trained = [r for r in rows if "target" in r]
    for r in rows:
        if r["what"] == "truth" or r in trained:
            continue
        err, peak = r.get("rel_err"), r.get("peak_mib")
        lines.append(
            f"| {r['model']} | {r['params'] / 1e6:.1f} M | {r['what']} | {r.get('k', '')} | "
            f"{r.get('seconds', float('nan')):.3f} | {r.get('hvps', '')} | "
            f"{'' if err is None else f'{err:.1e}'} | {'' if peak is None else f'{peak:.0f}'} |"
        )
    if trained:
        lines += [
            "",
            f"Inside training (SGD, a probe round every {trained[0]['every_n_steps']} steps; "
            "medians after the first round):",
            "",
            "| model | params | what | value | target | round or probe seconds |",
            "|---|---|---|---|---|---|",
        ]
        for r in trained:
            lines.append(
                f"| {r['model']} | {r['params'] / 1e6:.1f} M | {r['what']} | {r['value']:.4g} | "
                f"≤ {r['target']} | {r['seconds']:.3f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny models on the CPU (seconds)")
    ap.add_argument("--anchor", default=str(ANCHOR), help="path of anchor_gpu.py")
    ap.add_argument("--truth-m", type=int, default=None, help="reference Lanczos steps")
    ap.add_argument("--peers", action="store_true", help="also run the anchor's own peers")
    ap.add_argument("--no-curvlinops", dest="curvlinops", action="store_false")
    ap.add_argument("--curvlinops-max-k", type=int, default=20)
    ap.add_argument(
        "--no-in-training",
        dest="in_training",
        action="store_false",
        help="skip the in-training rounds (default round in steps, warm λ_max products)",
    )
    ap.add_argument("--out", default=None, help="JSON rows")
    ap.add_argument("--markdown", default=None, help="RESULTS.md section")
    args = ap.parse_args(argv)
    args.device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    args.truth_m = args.truth_m or (80 if args.smoke else 120)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    anchor = load_anchor(Path(args.anchor))
    plan = [("resnet18", [1, 5, 20]), ("gpt", [1, 5, 20]), ("gpt2s", [10])]
    if args.smoke:
        plan = [("resnet18", [1, 2]), ("gpt", [1, 2])]
    meta = {
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "anchor": str(args.anchor) if anchor is not None else None,
    }
    print(json.dumps(meta), flush=True)
    rows: list[dict[str, Any]] = []
    for name, ks in plan:
        if anchor is not None and args.peers:
            anchor.run(name, args.device, args.smoke, ks, args.truth_m, False)
        try:
            rows += bench_model(anchor, name, ks, args)
        except Exception as err:  # one model failing (e.g. out of memory) keeps the rest
            rows.append({"model": name, "what": "error", "error": repr(err)[:500]})
            print(json.dumps(rows[-1]), flush=True)
        if args.device == "cuda":
            torch.cuda.empty_cache()
    if args.in_training:
        try:
            rows += in_training(args)
        except Exception as err:  # keep what was measured
            rows.append({"model": "resnet18", "what": "error", "error": repr(err)[:500]})
            print(json.dumps(rows[-1]), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(markdown([r for r in rows if "what" in r], meta))
    return 0 if all(r.get("what") != "error" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
