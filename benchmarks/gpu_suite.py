#!/usr/bin/env python
"""One prepared GPU run (≤ 8 minutes on one H100/H200): ours against the anchors, in one process.

For each model of ``../shared/bench/anchor_gpu.py`` (ResNet-18 at 128 CIFAR samples, GPT-11M at
16 × 256 tokens, GPT-98M at 8 × 512 tokens; built by that file's own ``problem()`` so models,
batches and the 30 SGD warm-up steps are identical), float32 with TF32 off, ``eval()`` mode:

* a reference spectrum: that file's ``ref_lanczos`` (full reorthogonalisation) for ``--truth-m``
  steps on its retained-graph HVP (default 120 steps, 80 on GPT-98M, whose basis would not fit);
* the route ``auto`` picks on the device, with both routes' seconds per product (one row), then
  ours: ``hessian_eigenvalues(..., k, tol=1e-4)`` on that route, seconds (CUDA-synchronised), HVPs,
  relative error against the reference, and peak memory above the model's
  (``torch.cuda.max_memory_allocated``) next to an AdamW training step's;
* curvlinops + SciPy ``eigsh`` at the same tolerance, when importable, on models of at most
  ``--curvlinops-max-params`` parameters (its vectors make a round trip through host memory);
* α: ``curvature_exponents`` on ResNet-18 (batched per-layer products), seconds;
* Δ₂^(D): ``stabilization`` on GPT-11M (D = 10), seconds, products, convergence;
* inside training (issue 16's ResNet-18 of ``real_sizes.py``, 16-sample batches, through
  ``warm_start.py`` on a one-GPU ``Trainer``): the default ``LandscapeMonitor()`` round's median
  cost in training steps (target ≤ 100) over 120 steps, and the median products of a warm-started
  λ_max probe (target ≤ 5) over 200 steps, both probing every 20 steps;
* after GPT-98M, ``route="compiled"`` (``torch.compile`` of the functorch product) on ResNet-18
  and GPT-11M: the compilation and then seconds per product, against the double backward's
  product (``--no-compiled`` skips it);
* the default round again with ``Sharpness(criterion="eigenvalue")``
  (``default_round_in_steps_eigenvalue``, an option that was cheaper on the CPU);
* ``--peers`` (last, time permitting): the anchor file's own ``run()`` per model (PyHessian,
  hessian-eigenthings and its reference Lanczos, at ``--peer-ks``), its rows kept in ours (a peer
  it could not run is a skipped row, which does not fail the suite).

Sections run in that order while ``--budget-s`` seconds have not passed since the suite started
(after importing torch; later ones are written as skipped), and a long one (the compiled route,
the peers) only with enough time left before ``--deadline-s``, where the section running is
stopped (a ``SIGALRM``) and written as an error; each failure is a row of its own and the rest
goes on. ``--out`` (JSON) and ``--markdown`` (a RESULTS.md section) are replaced after every
row (the peers' rows as the anchor emits them), so a run cut short keeps what it measured. The
exit status is 1 if any section failed. ``--smoke`` runs tiny models on the CPU in seconds (used
by the test suite; ``torch.compile`` there uses the ``aot_eager`` backend); only there may the
anchor file be missing (``real_sizes.py``'s models stand in). On a lent device:
``benchmarks/gpu_prepare.sh`` here, then ``bash benchmarks/gpu_run.sh`` there (see
benchmarks/README.md).

    python benchmarks/gpu_suite.py --out benchmarks/results_gpu.json --markdown /tmp/gpu.md
    python benchmarks/gpu_suite.py --smoke
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import functools
import importlib.util
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

T_START = time.perf_counter()  # budgets count from here (CUDA start-up included; torch imported)
HERE = Path(__file__).resolve().parent
ANCHORS = (  # where gpu_prepare.sh copies it, a shared/ inside the checkout, the one beside it
    HERE.parent / ".gpu" / "anchor_gpu.py",
    HERE.parent / "shared" / "bench" / "anchor_gpu.py",
    HERE.parent.parent / "shared" / "bench" / "anchor_gpu.py",
)
sys.path.insert(0, str(HERE))

from bench_cpu import library_fingerprint, rel_err  # noqa: E402

import lightning_landscape as ll  # noqa: E402

TOL = 1e-4
TRUTH_M = {"resnet18": 120, "gpt": 120, "gpt2s": 80}  # 81 × 98 M float32 = 32 GB of basis


class Deadline(BaseException):
    """Raised by ``SIGALRM`` in the section running when ``--deadline-s`` is reached.

    Not an ``Exception``: the monitor's fault isolation and the anchor's per-peer ``try`` catch
    those, log them and go on, so a deadline raised inside them would not stop the section.
    """


def _replace_text(path: str, text: str) -> None:
    """Write ``path`` whole or not at all (a kill mid-write leaves the previous version)."""
    tmp = f"{path}.tmp"
    Path(tmp).write_text(text)
    os.replace(tmp, path)


class Recorder:
    """Rows printed as JSON lines and rewritten to ``--out`` / ``--markdown`` after each one.

    ``budget``: no section starts after that many seconds since the suite started;
    ``deadline``: a section running then is stopped (where ``SIGALRM`` exists: not on Windows).
    """

    def __init__(
        self,
        meta: dict[str, Any],
        out: str | None,
        md: str | None,
        budget: float,
        deadline: float | None = None,
    ):
        self.meta, self.out, self.md, self.budget = meta, out, md, budget
        self.deadline = deadline
        self.rows: list[dict[str, Any]] = []
        self.t0 = T_START

    def emit(self, **row: Any) -> None:
        row = json.loads(json.dumps(row, default=str))  # e.g. a tensor as its text, not a crash
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        if self.out:
            _replace_text(self.out, json.dumps({"meta": self.meta, "rows": self.rows}, indent=1))
        if self.md:
            _replace_text(self.md, markdown(self.rows, self.meta))

    def section(self, model: str, what: str, fn: Callable[[], None], needs_s: float = 0.0) -> bool:
        """Run ``fn`` unless the budget is spent or fewer than ``needs_s`` seconds are left
        before the deadline; a failure (the deadline too) becomes a row. True if it ran clean."""
        spent = time.perf_counter() - self.t0
        if spent > self.budget:
            self.emit(model=model, what=what, skipped=f"time budget spent ({spent:.0f} s)")
            return False
        left = None if self.deadline is None else self.deadline - spent
        if left is not None and left < needs_s:
            self.emit(
                model=model,
                what=what,
                skipped=f"{left:.0f} s left, the section needs {needs_s:.0f}",
            )
            return False
        alarm = left is not None and hasattr(signal, "SIGALRM")
        if alarm:
            assert left is not None

            def stop(signum: int, frame: Any) -> None:
                raise Deadline(f"deadline reached after {time.perf_counter() - self.t0:.0f} s")

            signal.signal(signal.SIGALRM, stop)
            signal.setitimer(signal.ITIMER_REAL, max(left, 0.001))
        try:
            fn()
        except (Exception, Deadline) as err:  # report, keep going
            self.emit(model=model, what=what, error=repr(err)[:500])
            return False
        finally:
            if alarm:
                signal.setitimer(signal.ITIMER_REAL, 0)
        return True


def find_anchor(path: str | None) -> Path | None:
    candidates = [Path(path)] if path else list(ANCHORS)
    return next((p for p in candidates if p.is_file()), None)


def load_anchor(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("anchor_gpu", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["anchor_gpu"] = mod  # importable by name: torch.compile looks its classes up
    spec.loader.exec_module(mod)
    return mod


def build(anchor: ModuleType | None, name: str, device: str, smoke: bool) -> tuple[Any, ...]:
    """``(model, loss_fn(model, batch), batch, criterion)`` for one anchor model."""
    torch.manual_seed(0)  # as the anchor's run() does: the same initial weights as its rows
    if anchor is not None:
        model, crit, x, y = anchor.problem(name, device, smoke)
    else:  # --smoke without the anchor file: real_sizes.py's models at smoke size
        from real_sizes import make_gpt27m, make_resnet18

        prob = (make_resnet18 if name == "resnet18" else make_gpt27m)(smoke)
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


def calibrated_route(model: nn.Module, loss_fn: Any, batch: Any) -> tuple[str, dict[str, float]]:
    """The route ``auto`` takes on this device, and each route's seconds per product there."""
    with ll.curvature_context(model):
        op = ll.HessianOperator(model, loss_fn, [batch], calibrate=True)
        op.matvec(torch.ones(op.size, dtype=op.dtype, device=op.device))
        route, seconds = str(op.route), dict(op.route_seconds)
        op.release()
    return route, seconds


def bench_model(
    rec: Recorder, anchor: ModuleType | None, name: str, ks: list[int], args: argparse.Namespace
) -> None:
    device = args.device
    model, loss_fn, batch, crit = build(anchor, name, device, args.smoke)
    n = sum(p.numel() for p in model.parameters())

    def emit(**kw: Any) -> None:
        rec.emit(model=name, params=n, **kw)

    def train_step() -> None:
        """An AdamW step's time and memory, on a copy: the probed weights stay the anchor's."""
        twin = copy.deepcopy(model)
        opt = torch.optim.AdamW(twin.parameters(), lr=1e-4)

        def step() -> None:
            twin.train()
            opt.zero_grad(set_to_none=True)
            loss_fn(twin, batch).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()
        _, secs, peak = timed(step, device)
        emit(what="adamw_train_step", seconds=secs, peak_mib=peak)

    def anchor_steps() -> None:
        """The SGD steps (lr 1e-3) the anchor's run() takes before its truth, the same here.

        12 timed in train mode; on CUDA one more in eval mode, for its peak memory.
        """
        assert anchor is not None
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            loss_fn(model, batch).backward()
            opt.step()

        secs = anchor.timeit(step, device)
        model.eval()
        peak = None
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() / 2**20
        emit(what="sgd_train_step", seconds=secs, peak_mib_total=peak)
        model.zero_grad(set_to_none=True)

    truth: list[float] = []

    def reference() -> None:
        assert anchor is not None
        m = args.truth_m or TRUTH_M[name]

        def solve() -> Any:  # the retained graph is freed on return
            hvp = anchor.Counted(model, crit, *batch)
            return anchor.ref_lanczos(hvp, hvp.n, max(ks), device, fixed_m=m)

        (vals, _), secs, _ = timed(solve, device)
        truth.extend(sorted((float(v) for v in vals), reverse=True)[: max(ks)])
        emit(what="truth", m=m, seconds=secs, top=truth[:3])

    route = ["auto"]

    def calibration() -> None:
        route[0], seconds = calibrated_route(model, loss_fn, batch)
        emit(what="route", route=route[0], seconds_per_product=seconds)

    def symmetry() -> None:
        """The monitor's product check on this device (tolerance 1e-2): correct products' defect."""
        with ll.curvature_context(model):
            op = ll.HessianOperator(model, loss_fn, [batch], route=route[0])
            res = ll.symmetry_defect(op)
            op.release()
        emit(what="product_symmetry", route=route[0], defect=res.defect, seconds=res.seconds)

    rec.section(name, "adamw_train_step", train_step)
    if anchor is not None:
        rec.section(name, "sgd_train_step", anchor_steps)
        rec.section(name, "truth", reference)
    rec.section(name, "route", calibration)
    rec.section(name, "product_symmetry", symmetry)

    def ours(k: int) -> None:
        res, secs, peak = timed(
            lambda: ll.hessian_eigenvalues(
                model, loss_fn, batch, k, tol=TOL, route=route[0], return_eigenvectors=True
            ),
            device,
        )
        vals = res.eigenvalues.tolist()
        emit(
            what="ours",
            k=k,
            route=route[0],
            seconds=secs,
            hvps=res.num_hvps,
            peak_mib=peak,
            converged=bool(res.converged.all()),
            rel_err=rel_err(vals, truth[:k]) if truth else None,
            top=vals[:3],
        )

    def curvlinops(k: int) -> None:
        from bench_cpu import FlatLogits, Problem, run_curvlinops

        flat = FlatLogits(model)  # what curvlinops sees: CrossEntropyLoss on flat logits
        prob = Problem(name, "", model, loss_fn, batch, flat, (batch[0], batch[1].reshape(-1)))
        cl, secs, peak = timed(lambda: run_curvlinops(prob, k, TOL), device)
        emit(
            what="curvlinops_eigsh",
            k=k,
            seconds=secs,
            hvps=cl["hvps"],
            peak_mib=peak,
            rel_err=rel_err(cl["vals"], truth[:k]) if truth else None,
        )

    with_curvlinops = args.curvlinops and n <= args.curvlinops_max_params
    warm_up = lambda: ll.hessian_eigenvalues(model, loss_fn, batch, 1, tol=TOL, route=route[0])  # noqa: E731
    rec.section(name, "ours_warmup", warm_up)
    for k in ks:
        rec.section(name, "ours", lambda k=k: ours(k))
        if with_curvlinops and k <= args.curvlinops_max_k:
            rec.section(name, "curvlinops_eigsh", lambda k=k: curvlinops(k))

    def alpha() -> None:
        top = 4 if args.smoke else 20
        _, secs, peak = timed(
            lambda: ll.curvature_exponents(model, loss_fn, batch, top_k=top, route=route[0]),
            device,
        )
        emit(what="alpha_curvature_exponents", top_k=top, seconds=secs, peak_mib=peak)

    def delta2() -> None:
        d = 3 if args.smoke else 10
        res, secs, peak = timed(
            lambda: ll.stabilization(
                model, loss_fn, batch, max(1, len(batch[0]) // 2), D=d, route=route[0]
            ),
            device,
        )
        emit(
            what="delta2_stabilization",
            D=d,
            seconds=secs,
            hvps=res.num_hvps,
            converged=res.converged,
            peak_mib=peak,
        )

    if name == "resnet18":
        rec.section(name, "alpha_curvature_exponents", alpha)
    if name == "gpt":
        rec.section(name, "delta2_stabilization", delta2)


def compiled_route(
    rec: Recorder, anchor: ModuleType | None, name: str, args: argparse.Namespace
) -> None:
    """``route="compiled"`` on one model: the compilation (the first product), then seconds per
    product (median of 5), the same for blocks of 4 vectors (a second, vmapped graph; median of
    3), and the single product's distance from the double backward's on the same vector."""
    device = args.device
    model, loss_fn, batch, _ = build(anchor, name, device, args.smoke)
    model.eval()
    with ll.curvature_context(model):
        op = ll.HessianOperator(model, loss_fn, [batch], route="compiled")
        v = torch.randn(op.size, generator=torch.Generator().manual_seed(3)).to(op.device)
        first, compile_secs, _ = timed(lambda: op.matvec(v), device)
        times = [timed(lambda: op.matvec(v), device)[1] for _ in range(5)]
        block = torch.randn(op.size, 4, generator=torch.Generator().manual_seed(4)).to(op.device)
        _, block_compile_secs, _ = timed(lambda: op.matmat(block), device)  # a vmapped graph
        block_times = [timed(lambda: op.matmat(block), device)[1] / 4 for _ in range(3)]
        reference = ll.HessianOperator(model, loss_fn, [batch], route="double_backward")
        exact = reference.matvec(v)
        reference.release()
        op.release()
    rec.emit(
        model=name,
        params=op.size,
        what="compiled_route",
        route=op.route,  # "functorch" if it fell back (the warning says why)
        compile_seconds=compile_secs,
        seconds_per_product=sorted(times)[2],
        block_compile_seconds=block_compile_secs,
        block_seconds_per_vector=sorted(block_times)[1],
        rel_diff=float((first - exact).norm() / exact.norm()),
    )


def in_training(rec: Recorder, args: argparse.Namespace, criterion: str = "residual") -> None:
    """Issue 16's in-training figures on the suite's device, through ``warm_start.py``.

    With the default ``criterion``: the default round and the warm λ_max probe; with
    ``"eigenvalue"``: the default round again with ``Sharpness(criterion="eigenvalue")``.
    """
    smoke = args.smoke
    accelerator = "gpu" if args.device == "cuda" else "cpu"
    every = "10" if smoke else "20"
    try:  # outside a section: a failure here is still a row, not the end of the run
        import warm_start

        ns = warm_start.options(
            ["--every", every, "--tol", str(TOL), "--accelerator", accelerator]
            + (["--quick"] if smoke else [])
        )
    except Exception as err:
        rec.emit(model="resnet18", what=f"in_training ({criterion})", error=repr(err)[:500])
        return

    def default_round() -> None:
        ns.steps, ns.criterion = (30 if smoke else 120), criterion
        d = warm_start.run_default_monitor("resnet18", ns)
        rec.emit(
            model="resnet18",
            params=d["params"],
            what="default_round_in_steps" + ("" if criterion == "residual" else f"_{criterion}"),
            value=d["median_round_in_steps"],
            target=100,
            seconds=d["median_round_seconds"],
            step_seconds=d["median_step_seconds"],
            round_hvps=d["round_hvps"],
            probe_in_steps=d["median_probe_in_steps"],
            every_n_steps=ns.every,
            criterion=d["sharpness_criterion"],
        )

    def warm_lambda_max() -> None:
        ns.steps = 40 if smoke else 200
        w = warm_start.run("resnet18", 1, True, ns)
        rec.emit(
            model="resnet18",
            params=w["params"],
            what="warm_lambda_max_hvps",
            value=w["median_hvps"],
            target=5,
            seconds=w["median_seconds"],
            hvps_per_probe=w["hvps"],
            converged=w["all_converged"],
            every_n_steps=ns.every,
        )

    if criterion != "residual":
        rec.section("resnet18", f"default_round_in_steps_{criterion}", default_round)
        return
    rec.section("resnet18", "default_round_in_steps", default_round)
    rec.section("resnet18", "warm_lambda_max_hvps", warm_lambda_max)


def peers(
    rec: Recorder, anchor: ModuleType, name: str, ks: list[int], args: argparse.Namespace
) -> None:
    """The anchor file's own ``run()``: its rows (PyHessian, hessian-eigenthings, ...) kept.

    Each row reaches ``rec`` as the anchor emits it (a run stopped by the deadline keeps the rows
    before), and the models it built lose their ``.grad`` afterwards: PyHessian's
    ``backward(create_graph=True)`` leaves gradients that hold their graph in a reference cycle
    the garbage collector does not free, which would keep the model and graph on the GPU.
    """
    emit, problem = anchor.emit, anchor.problem
    built: list[nn.Module] = []
    params: Any = None

    def forward(**row: Any) -> None:  # its "secs" as our "seconds"; a peer it lacks is skipped
        nonlocal params
        emit(**row)  # the anchor's own list too
        what = f"anchor:{row.get('what', '')}"
        if row.get("what") == "params":
            params = row.get("value")
        if "max_iter" in row:  # hessian-eigenthings: its default basis (2k) or 4k + 20
            what += f" (max_iter {row['max_iter'] or 'default'})"
        row = {"model": name, "params": params, **row, "what": what}
        if "secs" in row:
            row["seconds"] = row.pop("secs")
        if "error" in row:
            row["skipped"] = row.pop("error")
        rec.emit(**row)

    def capture(*a: Any, **kw: Any) -> Any:
        made = problem(*a, **kw)
        built.append(made[0])
        return made

    anchor.emit, anchor.problem = forward, capture
    try:
        anchor.run(name, args.device, args.smoke, ks, args.truth_m or TRUTH_M[name], False)
    finally:
        anchor.emit, anchor.problem = emit, problem
        for model in built:
            for p in model.parameters():
                p.grad = None


def _num(value: Any, spec: str) -> str:
    return "" if value is None else format(value, spec)


def _millions(row: dict[str, Any]) -> str:
    params = row.get("params")
    return "" if not params else format(params / 1e6, ".3g")


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        f"## GPU suite ({meta['device_name']}, {meta['date_utc'][:10]})",
        "",
        f"Command: `{meta['command']}`; torch {meta['torch']}; source `{meta['source']}`; "
        f"float32, TF32 off; tol {TOL:g}.",
        "",
        "| model | params | what | k | seconds | HVPs | rel. error | peak MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    failed = [r for r in rows if "error" in r or "skipped" in r]
    trained = [r for r in rows if "target" in r and r not in failed]
    routes = [r for r in rows if r.get("what") == "route" and r not in failed]
    checks = [r for r in rows if r.get("what") == "product_symmetry" and r not in failed]
    compiled = [r for r in rows if r.get("what") == "compiled_route" and r not in failed]
    for r in rows:
        if r in failed or r in trained or r in routes or r in checks or "seconds" not in r:
            continue
        lines.append(
            f"| {r['model']} | {_millions(r)} M | {r['what']} | "
            f"{r.get('k', '')} | {_num(r['seconds'], '.3f')} | {r.get('hvps', '')} | "
            f"{_num(r.get('rel_err'), '.1e')} | {_num(r.get('peak_mib'), '.0f')} |"
        )
    for r in routes:
        per = ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in r["seconds_per_product"].items())
        per = per or "not calibrated"
        lines.append(f"\n{r['model']}: route `{r['route']}` ({per} per product).")
    for r in compiled:
        lines.append(
            f"\n{r['model']}: route `compiled` (torch.compile) "
            f"{r['seconds_per_product'] * 1e3:.1f} ms per product after "
            f"{r['compile_seconds']:.1f} s for the first (compilation), "
            f"{r['block_seconds_per_vector'] * 1e3:.1f} ms per vector in blocks of 4 after "
            f"{r['block_compile_seconds']:.1f} s; {r['rel_diff']:.1e} off the double backward"
            + ("." if r["route"] == "compiled" else f"; it fell back to `{r['route']}`.")
        )
    for r in checks:
        lines.append(
            f"\n{r['model']}: the products' symmetry defect {r['defect']:.1e} by `{r['route']}` "
            "(the monitor's check; tolerance 1e-2)."
        )
    if trained:
        lines += [
            "",
            f"Inside training (SGD, a probe round every {trained[0].get('every_n_steps')} steps; "
            "medians after the first round):",
            "",
            "| model | params | what | value | target | round or probe seconds |",
            "|---|---|---|---|---|---|",
        ]
        for r in trained:
            lines.append(
                f"| {r['model']} | {_millions(r)} M | {r['what']} | "
                f"{_num(r['value'], '.4g')} | ≤ {r['target']} | {_num(r.get('seconds'), '.3f')} |"
            )
    if failed:
        lines += ["", "Not measured:", ""]
        lines += [
            f"- {r.get('model', '')} {r.get('what', '')}: {r.get('error') or r.get('skipped')}"
            for r in failed
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny models on the CPU (seconds)")
    ap.add_argument("--anchor", default=None, help="path of anchor_gpu.py (default: searched)")
    ap.add_argument("--truth-m", type=int, default=None, help="reference Lanczos steps")
    ap.add_argument("--peers", action="store_true", help="also run the anchor's own peers, last")
    ap.add_argument("--peer-ks", default="1,5", help="the peers' k (GPT-98M: the first only)")
    ap.add_argument("--no-curvlinops", dest="curvlinops", action="store_false")
    ap.add_argument("--curvlinops-max-k", type=int, default=20)
    ap.add_argument("--curvlinops-max-params", type=float, default=30e6)
    ap.add_argument(
        "--no-compiled",
        dest="compiled",
        action="store_false",
        help="skip timing route='compiled' (torch.compile of the functorch product)",
    )
    ap.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="start no section after this many seconds since the suite started (default 430)",
    )
    ap.add_argument(
        "--deadline-s",
        type=float,
        default=None,
        help="stop the section running at this many seconds (default 560; gpu_run.sh's limit "
        "is 590 s for the whole command)",
    )
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
    if args.smoke:
        args.truth_m = args.truth_m or 80
        # The compiled route's section through dynamo and AOT autograd as on the GPU, without
        # inductor's C++ code generation (39-76 s per smoke model on the 2-core CPU).
        torch.compile = functools.partial(torch.compile, backend="aot_eager")
    path = find_anchor(args.anchor)
    if path is None and not args.smoke:
        print(
            "gpu_suite: anchor_gpu.py not found (looked in "
            f"{', '.join(str(p) for p in ([Path(args.anchor)] if args.anchor else ANCHORS))}); "
            "run benchmarks/gpu_prepare.sh first",
            file=sys.stderr,
        )
        return 2
    anchor = None if path is None else load_anchor(path)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    from bench_cpu import _curvlinops

    if args.curvlinops and _curvlinops() is None:
        args.curvlinops = False
        missing = "curvlinops or scipy not importable"
    else:
        missing = ""
    meta = {
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "source": library_fingerprint(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "anchor": str(path) if path is not None else None,
        "compile_backend": "aot_eager" if args.smoke else "inductor",
    }
    print(json.dumps(meta), flush=True)
    budget = args.budget_s if args.budget_s is not None else (1e9 if args.smoke else 430.0)
    deadline = args.deadline_s if args.deadline_s is not None else (None if args.smoke else 560.0)
    rec = Recorder(meta, args.out, args.markdown, budget, deadline)
    long_s = 0.0 if args.smoke else 150.0  # the compiled route, the peers: a minute or more

    def free() -> None:  # after a fatal CUDA error this raises too: not a reason to stop
        if args.device == "cuda":
            try:
                torch.cuda.empty_cache()
            except RuntimeError as err:
                print(f"gpu_suite: empty_cache failed: {err!r}", file=sys.stderr, flush=True)

    if missing:
        rec.emit(model="", what="curvlinops_eigsh", skipped=missing)
    if args.smoke:
        plan = [("resnet18", [1, 2]), ("gpt", [1, 2])]
    else:
        plan = [("resnet18", [1, 5, 20]), ("gpt", [1, 5, 20])]
    for name, ks in plan:
        run = lambda name=name, ks=ks: bench_model(rec, anchor, name, ks, args)  # noqa: E731
        rec.section(name, "model", run)
        free()
    if args.in_training:
        in_training(rec, args)
    if not args.smoke:
        rec.section("gpt2s", "model", lambda: bench_model(rec, anchor, "gpt2s", [10], args))
    if args.compiled:  # after the issue's own rows: each compilation can take a minute
        for name, _ in plan:
            run = lambda name=name: compiled_route(rec, anchor, name, args)  # noqa: E731
            rec.section(name, "compiled_route", run, needs_s=long_s)
            free()
    if args.in_training:  # an option, after the issue's own rows (RESULTS.md: cheaper on a CPU)
        in_training(rec, args, "eigenvalue")
    if args.peers and anchor is not None:
        peer_ks = [int(k) for k in args.peer_ks.split(",")]
        for name, _ in [*plan, ("gpt2s", [10])] if not args.smoke else plan:
            ks = peer_ks[:1] if name == "gpt2s" else peer_ks
            run = lambda name=name, ks=ks: peers(rec, anchor, name, ks, args)  # noqa: E731
            rec.section(name, "anchor_peers", run, needs_s=long_s)
            free()
    return 0 if not any("error" in r for r in rec.rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
