#!/usr/bin/env python
"""Warm-start cost inside training: HVPs per `LandscapeMonitor` probe, warm vs cold.

Trains the two models of ``bench_cpu.py`` (ResNet-style CNN on ``load_digits``, small GPT on the
synthetic modular task) inside a Lightning ``Trainer`` with
``LandscapeMonitor(probes=[Sharpness(K, tol=1e-4, lambda_min=False, warm_start=...,
every_n_steps=N)])`` for K = 1 and K = 20, warm-started and (the control) cold. With neither
λ_min nor the trace, a probe's ``num_hvps`` is exactly its eigensolve. The first probe is always
cold, so the statistics exclude it. Targets (issue 5): median HVPs for λ_max <= 5, for top-20
<= 30 with the warm start.

``--variants`` adds a second table from one extra warm-started run per model and K (so the main
table's counts stay clean): at each probe the same operator and the same previous Ritz vectors
also go to other ``lanczos`` settings (random start, no noise, block starts, looser tol, the probe
batch's gradient as the start), and the residual of the previous top vector on the new Hessian and
the alignment of that vector and of the gradient with the new top eigenvector are measured. The
main solve's vectors still carry over, and training is unchanged.

    python benchmarks/warm_start.py                       # 300 steps, probe every 20
    python benchmarks/warm_start.py --quick               # < 60 s smoke run
    python benchmarks/warm_start.py --variants --out benchmarks/results_warm_start.json
    python benchmarks/warm_start.py --models resnet18 --ks 1 --no-cold --steps 200  # issue 16
    python benchmarks/warm_start.py --models resnet18 --default-monitor --steps 120

``--default-monitor`` instead trains with the default ``LandscapeMonitor()`` probes (top-5 sharpness
with λ_min, update curvature, trace) every ``--every`` steps and reports a probe round's median
seconds in units of the median training step, and each probe's (``median_probe_in_steps``),
with every trace estimate and its standard error (``traces``).
``--sharpness NAME=VALUE`` (repeatable) changes one setting of that round's ``Sharpness`` probe
(e.g. ``top_k=1``, ``tol=0.01``, ``max_basis=40``) to see what each costs. ``--reference`` also
solves every round's operator again, cold, to tol 1e-5 and records how far the probe's eigenvalues
and λ_min are from those (``reference``); its rounds then include the extra solves, so their
seconds are not reported.

    python benchmarks/warm_start.py --models resnet18 --default-monitor --steps 120 \
        --threads 2 --sharpness tol=0.01 --reference
"""

from __future__ import annotations

import argparse
import ast
import datetime as dt
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_cpu's models and data
from bench_cpu import (
    ROOT,
    SmallResNet,
    TinyGPT,
    cnn_loss,
    cpu_model,
    fib_mod_batch,
    gpt_loss,
    library_fingerprint,
)

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
import lightning_landscape as ll
from lightning_landscape.probes.base import warm_vectors
from lightning_landscape.solvers import lanczos, lanczos_ends

TOL = 1e-4
TARGET = {1: 5, 20: 30}
REFERENCE_TOL = 1e-5
_CADENCE = ("every_n_steps", "every_n_epochs", "on_train_start", "on_train_end")


class Module(pl.LightningModule):
    def __init__(self, net: nn.Module, loss_fn: Any, lr: float) -> None:
        super().__init__()
        self.net, self.loss_fn, self.lr = net, loss_fn, lr

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss: Tensor = self.loss_fn(self.net, batch)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def setup(
    name: str, steps: int, quick: bool, probe_samples: int = 16, seed: int = 0
) -> tuple[Module, DataLoader, DataLoader, float]:
    """(module, train loader, probe loader, grad clip): bench_cpu's models, data and probes.

    ``probe_samples`` (a multiple of 16) sizes the ResNet-18's probe set: held-out samples in
    batches of 16, the training batch size, so that BatchNorm normalises each as in training.
    The training data and the first 16 probe samples do not depend on it; the others come from
    a generator of their own. ``seed`` seeds the networks' initialisation (not the data).
    """
    torch.manual_seed(seed)
    if name == "resnet":
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        x = (x - x.mean()) / x.std()
        y = torch.tensor(digits.target, dtype=torch.long)
        train = TensorDataset(x[:-128], y[:-128])
        probe = TensorDataset(x[-128:], y[-128:])  # bench_cpu's held-out probe batch
        loader = DataLoader(
            train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(1)
        )
        net: nn.Module = SmallResNet(width=12 if quick else 16)
        return Module(net, cnn_loss, 0.05), loader, DataLoader(probe, batch_size=128), 0.0
    if name == "resnet18":  # issue 16: real size, 16-sample probe batch
        from real_sizes import TorchvisionResNet18

        g = torch.Generator().manual_seed(4)
        templates = torch.randn(10, 3, 32, 32, generator=g)  # a learnable synthetic task
        y = torch.randint(0, 10, (16 * steps + 16,), generator=g)
        x = templates[y] + 2.0 * torch.randn(len(y), 3, 32, 32, generator=g)
        train = TensorDataset(x[:-16], y[:-16])
        px, py = x[-16:], y[-16:]
        if probe_samples > 16:  # more of the same task, without changing the training data
            h = torch.Generator().manual_seed(5)
            more = torch.randint(0, 10, (probe_samples - 16,), generator=h)
            noise = torch.randn(len(more), 3, 32, 32, generator=h)
            px, py = torch.cat([px, templates[more] + 2.0 * noise]), torch.cat([py, more])
        probe = TensorDataset(px, py)
        net = TorchvisionResNet18(width=16 if quick else 64)
        loader = DataLoader(train, batch_size=16)  # a fresh batch every step
        return Module(net, cnn_loss, 0.05), loader, DataLoader(probe, batch_size=16), 0.0
    vocab, t = 61, 32
    net = TinyGPT(vocab, t, 48 if quick else 64, 4, 2)
    xs, ys = fib_mod_batch(32 * steps, t, vocab, torch.Generator().manual_seed(2))
    probe = TensorDataset(*fib_mod_batch(8, t, vocab, torch.Generator().manual_seed(3)))
    loader = DataLoader(TensorDataset(xs, ys), batch_size=32)  # a fresh batch every step
    return Module(net, gpt_loss, 0.1), loader, DataLoader(probe, batch_size=8), 1.0


def _trainer(
    steps: int, clip: float, callbacks: list[pl.Callback], accelerator: str = "cpu"
) -> pl.Trainer:
    """A quiet one-device ``Trainer`` for ``steps`` optimizer steps (clipping if ``clip``)."""
    return pl.Trainer(
        accelerator=accelerator,
        devices=1,
        max_steps=steps,
        max_epochs=-1,
        gradient_clip_val=clip or None,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )


class VariantSharpness(ll.Sharpness):
    """Also solves each probe's operator with other start strategies (results only recorded)."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.rows: list[dict[str, Any]] = []

    def run(self, ctx: ll.probes.ProbeContext) -> ll.probes.SharpnessResult:
        op = ctx.operator()
        start = warm_vectors(self.warm_top, op.size, op.device)  # the previous probe's vectors
        out = super().run(ctx)
        if start is None:
            return out
        k = self.top_k
        row: dict[str, Any] = {"default": out.top.num_hvps, "default_conv": out.top.all_converged}
        v = start[:, 0] / start[:, 0].norm()  # residual of the old top vector on the new H
        hv = op.matmat(v[:, None])[:, 0]
        theta = float(v @ hv)
        row["start_resid_top1"] = float((hv - theta * v).norm()) / abs(theta)
        # The probe batch's gradient, which SGD keeps mostly inside the top eigenspace
        # (Gur-Ari et al. 2018): how well each start is aligned with the new top eigenvector.
        grad = ctx.gradient()
        grad = grad / grad.norm()
        top = out.top.eigenvectors
        if top is not None:
            row["cos_previous_top1"] = abs(float(v @ top[:, 0]))
            row["cos_gradient_top1"] = abs(float(grad @ top[:, 0]))
        variants: dict[str, dict[str, Any]] = {
            "cold": {"start": None},
            "noise0": {"start_noise": 0.0},
            "tol1e-3": {"tol": 1e-3},
            "tol1e-2": {"tol": 1e-2},
            "gradient": {"start": grad[:, None]},
            "warm+gradient": {"start": torch.cat([start, grad[:, None]], dim=1)},
            "gradient_tol1e-3": {"start": grad[:, None], "tol": 1e-3},
        }
        if k > 1:
            variants["block_k"] = {"block_size": k, "max_basis": 3 * k}
            variants["top1_only"] = {"start": start[:, :1]}
            variants["block_4"] = {"block_size": 4, "max_basis": 2 * k + 12}
        for name, kw in variants.items():
            kw = {"tol": self.tol, "start": start, "seed": ctx.seed, **kw}
            res = lanczos(op, k, **kw)
            row[name], row[name + "_conv"] = res.num_hvps, res.all_converged
            ref = out.top.eigenvalues  # the tol 1e-4 values: how far off is this variant?
            row[name + "_err"] = float(((res.eigenvalues - ref).abs() / ref.abs()).max())
        self.rows.append(row)
        return out


def run(
    name: str, k: int, warm: bool, args: argparse.Namespace, variants: bool = False
) -> dict[str, Any]:
    pl.seed_everything(0, verbose=False)
    module, loader, probe, clip = setup(name, args.steps, args.quick, args.probe_samples)
    module.lr = args.lr or module.lr
    cls = VariantSharpness if variants else ll.Sharpness
    sharpness = cls(
        k,
        tol=args.tol,
        criterion=args.criterion,
        lambda_min=False,
        warm_start=warm,
        histogram=False,
        every_n_steps=args.every,
        on_train_end=False,
    )
    monitor = ll.LandscapeMonitor(
        probes=[sharpness], probe_dataloader=probe, tensorboard_layout=False
    )
    trainer = _trainer(args.steps, clip, [monitor], args.accelerator)
    t0 = time.perf_counter()
    trainer.fit(module, loader)
    hist = monitor.history
    rest = hist[1:]
    hv = sorted(r.num_hvps for r in rest)
    row: dict[str, Any] = {
        "model": name,
        "k": k,
        "warm_start": warm,
        "params": sum(p.numel() for p in module.parameters()),
        "probes": len(hist),
        "first_hvps": hist[0].num_hvps if hist else None,
        "median_hvps": statistics.median(hv) if hv else None,
        "p90_hvps": hv[min(len(hv) - 1, int(0.9 * len(hv)))] if hv else None,
        "max_hvps": hv[-1] if hv else None,
        "all_converged": all(r.converged for r in hist),
        "median_seconds": statistics.median(r.seconds for r in rest) if rest else None,
        "hvps": [r.num_hvps for r in hist],
        "steps": [r.step for r in hist],
        "lambda_max": [r.lambda_max for r in hist],
        "probe_loss": [r.probe_loss for r in hist],
        "fit_seconds": time.perf_counter() - t0,
    }
    if isinstance(sharpness, VariantSharpness):
        row["variants"] = sharpness.rows
    print(
        f"  {name} k={k} warm={warm}{' (variants)' if variants else ''}: hvps {row['hvps']}  "
        f"lambda_max {row['lambda_max'][0]:.4g} -> {row['lambda_max'][-1]:.4g}",
        flush=True,
    )
    return row


class _StepTimer(pl.Callback):
    """Wall time of each training step alone (listed before the monitor, so its probes at
    ``on_train_batch_end`` fall outside the interval)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._t0 = 0.0

    def on_train_batch_start(self, *args: Any) -> None:
        _synchronize()
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, *args: Any) -> None:
        _synchronize()
        self.seconds.append(time.perf_counter() - self._t0)


def _synchronize() -> None:
    """Wait for queued CUDA work, so that wall time measures it (a no-op on the CPU)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _count_products(probe: ll.Probe, counts: list[int], seconds: list[float] | None = None) -> None:
    """Record the products (and wall time) each measurement of ``probe`` spends.

    The wall time includes building the round's operator when ``probe`` is the first to ask
    for it (the default round's ``Sharpness``).
    """
    run = probe.run

    def counted(ctx: Any) -> Any:
        _synchronize()
        t0 = time.perf_counter()
        op = ctx.operator()
        before = op.num_matvecs
        out = run(ctx)
        counts.append(op.num_matvecs - before)
        _synchronize()
        if seconds is not None:
            seconds.append(time.perf_counter() - t0)
        return out

    probe.run = counted  # type: ignore[method-assign]


def _after_each(probe: ll.Probe, record: Callable[[Any, Any], None]) -> None:
    """Call ``record(ctx, result)`` after each measurement of ``probe`` (inside its round)."""
    run = probe.run

    def recorded(ctx: Any) -> Any:
        out = run(ctx)
        record(ctx, out)
        return out

    probe.run = recorded  # type: ignore[method-assign]


def _reference(ctx: Any, out: Any) -> dict[str, Any]:
    """Solve the round's operator again cold to :data:`REFERENCE_TOL` (both ends, a basis of
    40) and compare the probe's eigenvalues and λ_min (``out``) with that solve's."""
    op = ctx.operator()
    before = op.num_matvecs
    got = out.top.eigenvalues.double().tolist()  # the probe's top_k eigenvalues
    top, bottom = lanczos_ends(
        op, len(got), 1, tol=REFERENCE_TOL, max_basis=40, max_hvps=1000, seed=12345
    )
    ref = top.eigenvalues.double().tolist()
    lmin = float(bottom.eigenvalues[0])
    return {
        "step": ctx.step,
        "eigenvalues": got,
        "reference": ref,
        "relative_errors": [_relative(g, r) for g, r in zip(got, ref, strict=True)],
        "lambda_min": out.lambda_min,
        "reference_lambda_min": lmin,
        "lambda_min_relative_error": (
            None if out.lambda_min is None else _relative(out.lambda_min, lmin)
        ),
        "reference_converged": bool(top.all_converged and bottom.all_converged),
        "reference_hvps": op.num_matvecs - before,
    }


def _trace_row(ctx: Any, out: Any) -> dict[str, Any]:
    """One trace estimate: the step, the trace, its standard error and the method."""
    return {"step": ctx.step, "trace": out.trace, "stderr": out.stderr, "method": out.method}


def _relative(got: float, ref: float) -> float | None:
    """``|got − ref| / |ref|``, or ``None`` for a zero reference."""
    return abs(got - ref) / abs(ref) if ref != 0.0 else None


def _sharpness_settings(ap: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, Any]:
    """``--sharpness NAME=VALUE`` pairs as ``Sharpness`` keyword arguments (values as Python
    literals, else strings), checked by building the probe; a bad pair ends with a usage error."""
    settings: dict[str, Any] = {}
    for pair in args.sharpness:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            ap.error(f"--sharpness expects NAME=VALUE, got {pair!r}")
        if name in _CADENCE:
            ap.error(f"--sharpness {name}: the cadence is --every's")
        try:
            settings[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            settings[name] = value  # a plain string, e.g. criterion=eigenvalue
    if "criterion" in settings and args.criterion != "residual":
        ap.error("give the criterion once: --criterion or --sharpness criterion=...")
    try:
        ll.Sharpness(**settings)
    except (TypeError, ValueError) as err:
        ap.error(f"--sharpness: {err}")
    return settings


def run_default_monitor(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """A probe round of the default ``LandscapeMonitor()`` probes, in training steps.

    With ``--criterion eigenvalue`` or ``--sharpness NAME=VALUE`` the same probes, but the
    ``Sharpness`` probe built with those settings; with ``--reference`` each round's eigenvalues
    are also checked against a tight cold solve (see :func:`_reference`).
    """
    pl.seed_everything(0, verbose=False)
    module, loader, probe, clip = setup(name, args.steps, args.quick, args.probe_samples)
    module.lr = args.lr or module.lr
    monitor = ll.LandscapeMonitor(
        every_n_steps=args.every, probe_dataloader=probe, tensorboard_layout=False
    )
    overrides = dict(args.sharpness_settings)
    if args.criterion != "residual":  # read here: gpu_suite sets it after parsing
        overrides["criterion"] = args.criterion
    if overrides:  # the default probes, with another Sharpness probe
        sharpness = ll.Sharpness(every_n_steps=args.every, **overrides)
        others = [p for p in monitor.probes if not isinstance(p, ll.Sharpness)]
        monitor = ll.LandscapeMonitor(
            probes=[sharpness, *others], probe_dataloader=probe, tensorboard_layout=False
        )
    timer = _StepTimer()
    per_probe: dict[str, list[int]] = {type(p).__name__: [] for p in monitor.probes}
    probe_seconds: dict[str, list[float]] = {type(p).__name__: [] for p in monitor.probes}
    reference: list[dict[str, Any]] = []
    traces: list[dict[str, Any]] = []
    for probe in monitor.probes:
        name_ = type(probe).__name__
        _count_products(probe, per_probe[name_], probe_seconds[name_])
        if args.reference and isinstance(probe, ll.Sharpness):
            _after_each(probe, lambda ctx, out: reference.append(_reference(ctx, out)))
        if isinstance(probe, ll.Trace):
            _after_each(probe, lambda ctx, out: traces.append(_trace_row(ctx, out)))
    trainer = _trainer(args.steps, clip, [timer, monitor], args.accelerator)
    trainer.fit(module, loader)
    step = statistics.median(timer.seconds[1:])
    rounds = [r.seconds for r in monitor.history[1:]]  # after the first (cold) round
    timed = bool(rounds) and not args.reference  # reference solves run inside the rounds
    assert monitor.sharpness is not None
    row = {
        "model": name,
        "params": sum(p.numel() for p in module.parameters()),
        "probes": [type(p).__name__ for p in monitor.probes],
        "sharpness_criterion": monitor.sharpness.criterion,
        "sharpness_overrides": overrides,
        "median_step_seconds": step,
        "round_seconds": [r.seconds for r in monitor.history] if timed else None,
        "round_hvps": [r.num_hvps for r in monitor.history],
        "probe_hvps": per_probe,
        "probe_seconds": probe_seconds if timed else None,
        # each probe's median after the first (cold) round, in training steps
        "median_probe_in_steps": {
            p: statistics.median(s[1:]) / step for p, s in probe_seconds.items() if len(s) > 1
        }
        if timed
        else None,
        "median_round_seconds": statistics.median(rounds) if timed else None,
        "median_round_in_steps": statistics.median(rounds) / step if timed else None,
        "reference": reference or None,
        "traces": traces,
    }
    print(json.dumps(row), flush=True)
    return row


def variant_summary(row: dict[str, Any]) -> dict[str, Any]:
    vs = row.get("variants") or []
    out: dict[str, Any] = {}
    for key in [c for c in (vs[0] if vs else {}) if not c.endswith(("_conv", "_err"))]:
        vals = [v[key] for v in vs]
        conv = all(v.get(key + "_conv", True) for v in vs)
        err = max((v.get(key + "_err", 0.0) for v in vs), default=0.0)
        out[key] = (statistics.median(vals), max(vals), conv, err)
    return out


def options(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line's settings (``argv``, or ``sys.argv`` if ``None``), every default filled
    in: what ``run`` and ``run_default_monitor`` read. Other benchmarks pass their own ``argv``."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps (default 300)")
    ap.add_argument("--every", type=int, default=None, help="probe cadence (default 20)")
    ap.add_argument(
        "--models", default="resnet,gpt", help="comma list from: resnet, gpt, resnet18 (11.2 M)"
    )
    ap.add_argument("--ks", default="1,20", help="comma list of top_k")
    ap.add_argument("--no-cold", action="store_true", help="skip the warm_start=False control")
    ap.add_argument("--variants", action="store_true", help="also try other start strategies")
    ap.add_argument(
        "--default-monitor",
        action="store_true",
        help="instead: the default LandscapeMonitor() probe round's cost in training steps",
    )
    ap.add_argument(
        "--probe-samples",
        type=int,
        default=16,
        help="resnet18's probe samples, a multiple of 16, in batches of 16 (default 16; the "
        "monitor's own default num_probe_samples is 256)",
    )
    ap.add_argument("--out", default=None, help="write rows + metadata to this JSON path")
    ap.add_argument("--quick", action="store_true", help="small smoke run (< 60 s)")
    ap.add_argument(
        "--criterion",
        choices=("residual", "eigenvalue"),
        default="residual",
        help="lanczos stopping rule of the Sharpness solves (default residual; also applies to "
        "--default-monitor's Sharpness)",
    )
    ap.add_argument(
        "--tol", type=float, default=TOL, help=f"the λ_max probes' tolerance (default {TOL})"
    )
    ap.add_argument(
        "--sharpness",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="--default-monitor only: one setting of its Sharpness probe, e.g. top_k=1, "
        "tol=0.01 or max_basis=40 (repeatable)",
    )
    ap.add_argument(
        "--reference",
        action="store_true",
        help="--default-monitor only: check each round's eigenvalues against a cold solve to "
        f"tol {REFERENCE_TOL} (the rounds' seconds are then not reported)",
    )
    ap.add_argument(
        "--lr",
        type=float,
        default=None,
        help="SGD learning rate (default: the model's, 0.05 for the CNNs, 0.1 for the GPT)",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: tiny training steps "
        "slow down ~8x when 2 threads compete with another process for 2 cores)",
    )
    ap.add_argument(
        "--accelerator",
        choices=("cpu", "gpu"),
        default="cpu",
        help="the Trainer's one device (default cpu; gpu: the first CUDA device)",
    )
    args = ap.parse_args(argv)
    if (args.sharpness or args.reference) and not args.default_monitor:
        ap.error("--sharpness and --reference go with --default-monitor")
    args.sharpness_settings = _sharpness_settings(ap, args)
    if args.probe_samples < 16 or args.probe_samples % 16:
        ap.error(f"--probe-samples must be a positive multiple of 16, got {args.probe_samples}")
    args.steps = args.steps or (60 if args.quick else 300)
    args.every = args.every or (15 if args.quick else 20)
    return args


def main() -> None:
    args = options()
    torch.set_num_threads(args.threads)
    ks = [int(k) for k in args.ks.split(",")]
    if args.quick:
        ks = [min(k, 5) for k in ks]
    meta = {
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "cpu": cpu_model(),
        "gpu": torch.cuda.get_device_name() if args.accelerator == "gpu" else None,
        "cpu_count": os.cpu_count(),
        "loadavg_start": os.getloadavg(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "accelerator": args.accelerator,
        "lightning_landscape_src_sha256_16": library_fingerprint(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "malloc_env": {
            k: v for k, v in os.environ.items() if k.startswith(("MALLOC_", "THP_MEM_"))
        },
        "steps": args.steps,
        "every_n_steps": args.every,
        "lr": args.lr,
        "tol": args.tol,
        "criterion": args.criterion,
        "probe_samples": args.probe_samples,
        "sharpness": args.sharpness,
        "reference": args.reference,
    }
    if args.default_monitor:
        drows = [run_default_monitor(name, args) for name in args.models.split(",")]
        meta["loadavg_end"] = os.getloadavg()
        if args.out:
            Path(args.out).write_text(json.dumps({"meta": meta, "rows": drows}, indent=1) + "\n")
        return
    rows, vrows = [], []
    for name in args.models.split(","):
        for k in ks:
            for warm in (True,) if args.no_cold else (True, False):
                rows.append(run(name, k, warm, args))
            if args.variants:  # a separate run: its extra solves would inflate the probe counts
                vrows.append(run(name, k, True, args, variants=True))
    meta["loadavg_end"] = os.getloadavg()

    print(
        f"\n{'model':<7} {'k':>3} {'start':<5} {'probes':>6} {'cold':>5} {'median':>6} "
        f"{'p90':>4} {'max':>4} {'conv':>4} {'med s':>6} {'target':>6}"
    )
    for r in rows:
        tgt = TARGET.get(r["k"])
        met = (
            "-"
            if tgt is None or not r["warm_start"]
            else ("met" if r["median_hvps"] <= tgt else "MISS")
        )
        print(
            f"{r['model']:<7} {r['k']:>3} {'warm' if r['warm_start'] else 'cold':<5} "
            f"{r['probes']:>6} {r['first_hvps']:>5} {r['median_hvps']:>6} {r['p90_hvps']:>4} "
            f"{r['max_hvps']:>4} {'yes' if r['all_converged'] else 'NO':>4} "
            f"{r['median_seconds']:>6.3f} {met:>6}"
        )
    if args.variants:
        print("\nwarm-start variants on the same operators and start vectors: median / max HVPs")
        for r in vrows:
            for key, (med, mx, conv, err) in variant_summary(r).items():
                unit = "" if key.startswith(("start_resid", "cos_")) else " HVPs"
                fmt = f"{med:.2e} / {mx:.2e}" if unit == "" else f"{med:g} / {mx:g}"
                print(
                    f"  {r['model']:<7} k={r['k']:<3} {key:<16} {fmt}{unit}"
                    + (f"  max rel diff vs default {err:.1e}" if unit else "")
                    + ("" if conv else "  (not all converged)")
                )
    print(f"load average: start {meta['loadavg_start']}, end {meta['loadavg_end']}")
    if args.out:
        Path(args.out).write_text(
            json.dumps({"meta": meta, "rows": rows, "variants": vrows}, indent=1) + "\n"
        )
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
