#!/usr/bin/env python
"""CPU benchmark: top-k Hessian eigenvalues with lightning_landscape vs PyHessian vs eigenthings.

One run, one CPU, float32, models in ``eval()`` mode, one fixed probe batch per model. For each
model and each k the script times

* ``lightning_landscape.hessian_eigenvalues(..., k, tol=1e-4, which="largest")`` with
  ``route="auto"`` and with each explicit route;
* PyHessian 0.1 deflated power iteration, ``hessian(...).eigenvalues(top_n=k)`` with its defaults
  (maxIter=100, tol=1e-3), the object construction (one forward + backward) included;
* hessian-eigenthings 1.0.0a5 Lanczos with its defaults (m = 2k steps) and with the tuned setting
  m = 4k + 20 with full reorthogonalisation (as in ``anchor_gpu.py``), if installed;
* curvlinops 3.0.1 ``HessianLinearOperator(...).to_scipy()`` + SciPy ``eigsh(which="LA",
  tol=1e-4)``, its documented top-k path, if installed;

and compares the k algebraically largest eigenvalues with a reference ("truth") computed
independently of all three libraries: a plain fully reorthogonalised Lanczos (two classical
Gram-Schmidt passes per step) of ``--truth-m`` steps on a float64 copy of the model, with
double-backward Hessian-vector products on a retained graph.

Run ``python benchmarks/bench_cpu.py --help`` for the options; ``--quick`` is a < 60 s smoke test.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import hashlib
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without an editable install
    sys.path.insert(0, str(ROOT))

import lightning_landscape as ll  # noqa: E402
from lightning_landscape import functional as ll_functional  # noqa: E402

OUR_TOL = 1e-4
ROUTES = ("auto", "functorch", "double_backward")


# --------------------------------------------------------------------------------------- models
class Block(nn.Module):
    """Pre-activation-free ResNet basic block (conv-BN-ReLU-conv-BN + shortcut)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.sc: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.sc = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.b1(self.c1(x)))
        return F.relu(self.b2(self.c2(y)) + self.sc(x))


class SmallResNet(nn.Module):
    """ResNet-style CNN for 1×8×8 digits: stem + 3 basic blocks (w, 2w, 4w) + linear head."""

    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(
            nn.Conv2d(1, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU()
        )
        self.layers = nn.Sequential(Block(w, w, 1), Block(w, 2 * w, 2), Block(2 * w, 4 * w, 2))
        self.fc = nn.Linear(4 * w, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layers(self.stem(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class CausalSelfAttention(nn.Module):
    """Explicit softmax attention (no fused SDPA kernel, so every library can double-backward)."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.h = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.o = nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.h, c // self.h).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(c // self.h)
        mask = torch.ones(t, t, device=x.device, dtype=torch.bool).tril()
        att = att.masked_fill(~mask, float("-inf")).softmax(-1)
        return self.o((att @ v).transpose(1, 2).reshape(b, t, c))


class GPTBlock(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, heads)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """GPT-style decoder: token + learned position embeddings, pre-LN blocks, untied head."""

    def __init__(self, vocab: int, t: int, d: int, heads: int, layers: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(0.02 * torch.randn(1, t, d))
        self.blocks = nn.Sequential(*[GPTBlock(d, heads) for _ in range(layers)])
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.tok(idx) + self.pos[:, : idx.shape[1]]
        return self.head(self.ln(self.blocks(x)))


class FlatLogits(nn.Module):
    """PyHessian adapter: ``criterion(model(x), y)`` with logits ``(B·T, V)`` and flat targets."""

    def __init__(self, gpt: TinyGPT) -> None:
        super().__init__()
        self.gpt = gpt

    def forward(self, idx: Tensor) -> Tensor:
        out: Tensor = self.gpt(idx)
        return out.reshape(-1, out.shape[-1])


def cnn_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def gpt_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


@dataclass
class Problem:
    name: str
    desc: str
    model: nn.Module
    loss_fn: Callable[[nn.Module, Any], Tensor]
    batch: tuple[Tensor, Tensor]
    ph_model: nn.Module  # what PyHessian sees: criterion(ph_model(x), y)
    ph_data: tuple[Tensor, Tensor]
    train: dict[str, Any] = field(default_factory=dict)

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)


def make_cnn(quick: bool, steps: int) -> Problem:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x_all = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x_all = (x_all - x_all.mean()) / x_all.std()
    y_all = torch.tensor(digits.target, dtype=torch.long)
    b = 128
    x_train, y_train = x_all[:-b], y_all[:-b]
    probe = (x_all[-b:].clone(), y_all[-b:].clone())  # fixed held-out probe batch

    torch.manual_seed(0)
    model = SmallResNet(width=12 if quick else 16)
    g = torch.Generator().manual_seed(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, x_train.shape[0], (64,), generator=g)
        opt.zero_grad(set_to_none=True)
        loss = cnn_loss(model, (x_train[idx], y_train[idx]))
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    with torch.no_grad():
        acc = float((model(probe[0]).argmax(1) == probe[1]).float().mean())
    return Problem(
        name="resnet-digits",
        desc=f"ResNet-style CNN (BN, width {model.stem[0].out_channels}), load_digits 1x8x8, B={b}",
        model=model,
        loss_fn=cnn_loss,
        batch=probe,
        ph_model=model,
        ph_data=probe,
        train={
            "optimizer": "SGD lr=0.05 momentum=0.9, minibatch 64, train mode",
            "steps": steps,
            "loss_first": losses[0] if losses else None,
            "loss_last": losses[-1] if losses else None,
            "probe_accuracy": acc,
        },
    )


def fib_mod_batch(n: int, t: int, p: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """Sequences with s[i+1] = (s[i] + s[i-1]) mod p from random (s0, s1): next-token task."""
    s = torch.empty(n, t + 1, dtype=torch.long)
    s[:, :2] = torch.randint(0, p, (n, 2), generator=g)
    for i in range(2, t + 1):
        s[:, i] = (s[:, i - 1] + s[:, i - 2]) % p
    return s[:, :-1].contiguous(), s[:, 1:].contiguous()


def train_fib_gpt(
    model: nn.Module,
    steps: int,
    batch: int,
    t: int,
    vocab: int,
    g: torch.Generator,
    device: str | torch.device = "cpu",
) -> list[float]:
    """SGD (lr 0.1, momentum 0.9, clip 1.0) on fresh fib-mod batches; leaves the model in eval()."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    losses = []
    for _ in range(steps):
        x, y = (s.to(device) for s in fib_mod_batch(batch, t, vocab, g))
        opt.zero_grad(set_to_none=True)
        loss = gpt_loss(model, (x, y))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def make_gpt(quick: bool, steps: int) -> Problem:
    vocab, t, d, heads, layers, b = 61, 32, (48 if quick else 64), 4, 2, 8
    torch.manual_seed(0)
    model = TinyGPT(vocab, t, d, heads, layers)
    g = torch.Generator().manual_seed(2)
    probe = fib_mod_batch(b, t, vocab, torch.Generator().manual_seed(3))
    losses = train_fib_gpt(model, steps, 32, t, vocab, g)
    adapter = FlatLogits(model).eval()
    return Problem(
        name="gpt-fibmod",
        desc=(
            f"GPT ({layers} layers, d={d}, {heads} heads, explicit causal attention, "
            f"vocab {vocab}), s[i+1]=(s[i]+s[i-1]) mod {vocab}, B={b}x{t} tokens"
        ),
        model=model,
        loss_fn=gpt_loss,
        batch=probe,
        ph_model=adapter,
        ph_data=(probe[0], probe[1].reshape(-1)),
        train={
            "optimizer": "SGD lr=0.1 momentum=0.9, clip 1.0, fresh batch of 32x32 per step",
            "steps": steps,
            "loss_first": losses[0] if losses else None,
            "loss_last": losses[-1] if losses else None,
        },
    )


# ---------------------------------------------------------------------------------------- truth
def truth_lanczos(prob: Problem, k: int, m: int, stop_resid: float = 1e-12) -> dict[str, Any]:
    """Independent reference: fully reorthogonalised Lanczos on a float64 model copy.

    Runs until the top-k relative Ritz residuals are below ``stop_resid`` (checked every 10
    steps) or for ``m`` steps. The eigenvalue error is about residual² · |λ| / gap.
    """
    model = copy.deepcopy(prob.model).double().eval()
    x, y = prob.batch
    batch = (x.double() if x.is_floating_point() else x, y)
    params = [p for p in model.parameters() if p.requires_grad]
    n = sum(p.numel() for p in params)
    m = min(m, n)
    t0 = time.perf_counter()
    grads = torch.autograd.grad(prob.loss_fn(model, batch), params, create_graph=True)

    def hvp(v: Tensor) -> Tensor:
        pieces = torch.split(v, [p.numel() for p in params])
        vs = [c.view_as(p) for c, p in zip(pieces, params, strict=True)]
        hv = torch.autograd.grad(grads, params, grad_outputs=vs, retain_graph=True)
        return torch.cat([h.reshape(-1) for h in hv])

    g = torch.Generator().manual_seed(12345)
    q = torch.empty(m + 1, n, dtype=torch.float64)
    v = torch.randn(n, generator=g, dtype=torch.float64)
    q[0] = v / v.norm()
    alpha: list[float] = []
    beta: list[float] = []

    def ritz() -> tuple[Tensor, Tensor, Tensor]:
        tri = torch.diag(torch.tensor(alpha, dtype=torch.float64))
        off = torch.tensor(beta[:-1], dtype=torch.float64)
        tri += torch.diag(off, 1) + torch.diag(off, -1)
        theta, s = torch.linalg.eigh(tri)
        order = theta.argsort(descending=True)[:k]
        vals = theta[order]
        return vals, (beta[-1] * s[-1, order]).abs() / vals.abs(), theta

    for j in range(m):
        w = hvp(q[j])
        alpha.append(float(w @ q[j]))
        for _ in range(2):  # two classical Gram-Schmidt passes against the whole basis
            w = w - q[: j + 1].T @ (q[: j + 1] @ w)
        beta.append(float(w.norm()))
        q[j + 1] = w / beta[-1]
        if j + 1 >= k + 20 and (j + 1) % 10 == 0 and float(ritz()[1].max()) < stop_resid:
            break
    vals, resid, theta = ritz()
    return {
        "m": len(alpha),
        "m_max": m,
        "dtype": "float64",
        "seconds": time.perf_counter() - t0,
        "top": vals.tolist(),
        "rel_residuals": resid.tolist(),
        "max_rel_residual": float(resid.max()),
        "lambda_min_ritz": float(theta.min()),
    }


def rel_err(vals: list[float], truth: list[float]) -> float:
    """Largest relative error of the k algebraically largest eigenvalues vs the truth."""
    vals = sorted(vals, reverse=True)
    if len(vals) < len(truth):
        return float("inf")
    return max(abs(a - b) / max(abs(b), 1e-30) for a, b in zip(vals, truth, strict=False))


# -------------------------------------------------------------------------------------- methods
class _CountingHessianOperator(ll.HessianOperator):
    """Records the operator built inside ``hessian_eigenvalues`` to read ``num_matvecs``."""

    last: ll.HessianOperator | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _CountingHessianOperator.last = self


def run_ours(prob: Problem, k: int, route: str, tol: float = OUR_TOL) -> dict[str, Any]:
    saved = ll_functional.HessianOperator
    ll_functional.HessianOperator = _CountingHessianOperator  # type: ignore[misc]
    try:
        t0 = time.perf_counter()
        res = ll.hessian_eigenvalues(
            prob.model, prob.loss_fn, prob.batch, k, tol=tol, which="largest", route=route
        )
        secs = time.perf_counter() - t0
    finally:
        ll_functional.HessianOperator = saved  # type: ignore[misc]
    op = _CountingHessianOperator.last
    return {
        "seconds": secs,
        "hvps": op.num_matvecs if op is not None else res.num_hvps,
        "hvps_reported": res.num_hvps,
        "vals": res.eigenvalues.tolist(),
        "converged": bool(res.converged.all()),
        "max_residual": float(res.residuals.max()),
        "restarts": res.num_restarts,
        "route_used": op.route if op is not None else route,
        "route_seconds": dict(op.route_seconds) if op is not None else {},
    }


def _pyhessian() -> tuple[Any, Any] | None:
    try:
        import pyhessian  # noqa: F401  (its __init__ shadows the submodule with the class)
    except Exception:
        return None
    return sys.modules["pyhessian.hessian"], sys.modules["pyhessian.hessian"].hessian


def run_pyhessian(prob: Problem, k: int) -> dict[str, Any]:
    found = _pyhessian()
    assert found is not None
    phmod, ph_cls = found
    count = {"n": 0}
    orig = phmod.hessian_vector_product

    def counted(*a: Any, **kw: Any) -> Any:
        count["n"] += 1
        return orig(*a, **kw)

    phmod.hessian_vector_product = counted
    crit = nn.CrossEntropyLoss()
    torch.manual_seed(0)  # PyHessian draws its start vectors from the global RNG
    try:
        t0 = time.perf_counter()
        with warnings.catch_warnings():  # its backward(create_graph=True) warns about .grad cycles
            warnings.simplefilter("ignore", UserWarning)
            ph = ph_cls(prob.ph_model, crit, data=prob.ph_data, cuda=False)
        vals, _ = ph.eigenvalues(top_n=k)
        secs = time.perf_counter() - t0
    finally:
        phmod.hessian_vector_product = orig
        for p in prob.model.parameters():  # PyHessian leaves graph-carrying .grad tensors
            p.grad = None
    return {"seconds": secs, "hvps": count["n"], "vals": [float(v) for v in vals]}


def _eigenthings() -> Any:
    try:
        import hessian_eigenthings
    except Exception:
        return None
    return hessian_eigenthings


def run_eigenthings(prob: Problem, k: int, tuned: bool) -> dict[str, Any]:
    he = _eigenthings()
    op = he.HessianOperator(prob.model, [prob.batch], prob.loss_fn)
    count = {"n": 0}
    orig = op.matvec

    def counted(v: Tensor) -> Tensor:
        count["n"] += 1
        return orig(v)

    op.matvec = counted
    kw: dict[str, Any] = {"max_iter": 4 * k + 20, "reorthogonalize": True} if tuned else {}
    n = op.size
    if tuned:
        kw["max_iter"] = min(kw["max_iter"], n - 1)
    t0 = time.perf_counter()
    res = he.lanczos(op, k=k, seed=0, which="LA", **kw)
    secs = time.perf_counter() - t0
    return {
        "seconds": secs,
        "hvps": count["n"],
        "vals": [float(v) for v in res.eigenvalues],
        "converged": bool(res.converged.all()),
    }


def _curvlinops() -> Any:
    try:
        import curvlinops
        from scipy.sparse.linalg import eigsh  # noqa: F401
    except Exception:
        return None
    return curvlinops


def run_curvlinops(prob: Problem, k: int, tol: float = OUR_TOL) -> dict[str, Any]:
    """curvlinops' documented top-k path: ``HessianLinearOperator(...).to_scipy()`` + ``eigsh``.

    ``eigsh(which="LA", tol=tol)`` (ARPACK's defaults otherwise: ncv = max(2k + 1, 20)); the
    operator is built inside the timing (one pass over the data checks determinism by default,
    which is switched off here as for a fixed batch it only adds products).
    """
    from scipy.sparse.linalg import LinearOperator, eigsh

    cl = _curvlinops()
    params = [p for p in prob.model.parameters() if p.requires_grad]
    t0 = time.perf_counter()
    op = cl.HessianLinearOperator(
        prob.ph_model,
        nn.CrossEntropyLoss(),
        params,
        [prob.ph_data],
        check_deterministic=False,
    ).to_scipy()
    count = {"n": 0}

    def counted(v: Any) -> Any:
        count["n"] += 1
        return op.matvec(v)

    lin = LinearOperator(op.shape, matvec=counted, dtype=op.dtype)
    vals = eigsh(lin, k=k, which="LA", tol=tol, return_eigenvectors=False)
    secs = time.perf_counter() - t0
    return {"seconds": secs, "hvps": count["n"], "vals": [float(v) for v in vals]}


# ------------------------------------------------------------------------------------- harness
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def library_fingerprint() -> str:
    h = hashlib.sha256()
    for path in sorted((ROOT / "lightning_landscape").rglob("*.py")):
        h.update(path.relative_to(ROOT).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def run_metadata(**extra: Any) -> dict[str, Any]:
    """What a results file records about its run: UTC date, CPU, torch threads and version, the
    library's source fingerprint and the command line; then ``extra``."""
    return {
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "lightning_landscape_src_sha256_16": library_fingerprint(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        **extra,
    }


def write_results(path: str | None, meta: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """``{"meta": meta, "rows": rows}`` as JSON to ``path`` (nothing when ``None``)."""
    if path:
        Path(path).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
        print(f"wrote {path}")


def version_of(dist: str) -> str | None:
    import importlib.metadata as md

    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def fmt_secs(s: float) -> str:
    return f"{s:.3f}" if s < 10 else f"{s:.2f}"


def print_table(rows: list[dict[str, Any]]) -> None:
    head = (
        f"{'model':<14} {'params':>7} {'method':<34} {'k':>3} {'seconds':>8} {'HVPs':>5} "
        f"{'max rel err':>11} {'conv':>5} {'vs PyHessian':>12}"
    )
    print(head)
    print("-" * len(head))
    last = None
    for r in rows:
        if last is not None and (r["model"], r["k"]) != last:
            print()
        last = (r["model"], r["k"])
        speed = f"{r['speedup_vs_pyhessian']:.2f}x" if r.get("speedup_vs_pyhessian") else "-"
        conv = r.get("converged")
        conv_s = "-" if conv is None else ("yes" if conv else "NO")
        print(
            f"{r['model']:<14} {r['params']:>7} {r['method']:<34} {r['k']:>3} "
            f"{fmt_secs(r['seconds']):>8} {r['hvps']:>5} {r['rel_err']:>11.1e} {conv_s:>5} "
            f"{speed:>12}"
        )


def bench_problem(
    prob: Problem,
    ks: list[int],
    args: argparse.Namespace,
    have_ph: bool,
    have_he: bool,
    have_cl: bool = False,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    n = prob.params
    print(f"\n== {prob.name}: {prob.desc}; {n} params; trained {prob.train}", flush=True)

    # the same mean loss for all libraries
    with torch.no_grad():
        ours_loss = float(prob.loss_fn(prob.model, prob.batch))
        ph_loss = float(nn.CrossEntropyLoss()(prob.ph_model(prob.ph_data[0]), prob.ph_data[1]))
    if abs(ours_loss - ph_loss) > 1e-5 * max(1.0, abs(ours_loss)):
        raise RuntimeError(f"loss mismatch: ours {ours_loss} vs PyHessian view {ph_loss}")

    kmax = max(ks)
    truth = truth_lanczos(prob, kmax, args.truth_m)
    print(
        f"truth: {truth['m']}-step (cap {truth['m_max']}) float64 Lanczos "
        f"in {truth['seconds']:.1f} s, "
        f"top-{kmax} max rel residual {truth['max_rel_residual']:.1e}, "
        f"top-3 {[round(v, 6) for v in truth['top'][:3]]}, "
        f"lowest Ritz {truth['lambda_min_ritz']:.4g}",
        flush=True,
    )
    if truth["max_rel_residual"] > 1e-6:
        print("WARNING: truth not converged to 1e-6 relative residual; raise --truth-m")

    methods: list[tuple[str, Callable[[int], dict[str, Any]]]] = []
    for route in ROUTES:
        methods.append((f"ours route={route}", lambda k, r=route: run_ours(prob, k, r)))
    if args.loose_tol:  # roughly PyHessian's accuracy, for an equal-accuracy comparison
        methods.append(
            (
                f"ours route=auto tol={args.loose_tol:g}",
                lambda k: run_ours(prob, k, "auto", args.loose_tol),
            )
        )
    if have_ph:
        methods.append(("PyHessian power (defaults)", lambda k: run_pyhessian(prob, k)))
    if have_cl:
        methods.append(("curvlinops + scipy eigsh", lambda k: run_curvlinops(prob, k)))
    if have_he:
        methods.append(
            ("eigenthings lanczos (defaults)", lambda k: run_eigenthings(prob, k, False))
        )
        methods.append(
            ("eigenthings lanczos m=4k+20 reorth", lambda k: run_eigenthings(prob, k, True))
        )

    # warm-up: each method once (k = smallest k) before anything is timed
    for _, fn in methods:
        fn(min(ks))

    rows: list[dict[str, Any]] = []
    for k in ks:
        # repeats run round-robin over the methods, so background load hits them alike
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in methods}
        errors: dict[str, str] = {}
        for _ in range(args.repeats):
            for name, fn in methods:
                if name in errors:
                    continue
                try:
                    runs[name].append(fn(k))
                except Exception as err:  # report, keep going
                    errors[name] = f"{type(err).__name__}: {err}"
                    print(f"  {name} k={k}: FAILED {errors[name]}", flush=True)
        block = []
        for name, _ in methods:
            if name in errors:
                block.append(
                    {"model": prob.name, "params": n, "method": name, "k": k, "error": errors[name]}
                )
                continue
            secs = [r["seconds"] for r in runs[name]]
            r = dict(runs[name][len(secs) // 2])
            r["seconds"] = statistics.median(secs)
            r["seconds_all"] = secs
            row = {
                "model": prob.name,
                "params": n,
                "method": name,
                "k": k,
                **r,
                "rel_err": rel_err(r["vals"], truth["top"][:k]),
            }
            row["eigenvalues"] = sorted(row.pop("vals"), reverse=True)
            block.append(row)
            print(
                f"  {name:<34} k={k:<3} {fmt_secs(row['seconds']):>8} s  {row['hvps']:>4} HVPs  "
                f"err {row['rel_err']:.1e}  (all: {' '.join(f'{t:.3f}' for t in secs)})",
                flush=True,
            )
        ph = next(
            (b for b in block if b["method"].startswith("PyHessian") and "seconds" in b), None
        )
        for b in block:
            if ph is not None and "seconds" in b and not b["method"].startswith("PyHessian"):
                b["speedup_vs_pyhessian"] = ph["seconds"] / b["seconds"]
        rows += block
    return rows, {
        "name": prob.name,
        "desc": prob.desc,
        "params": n,
        "train": prob.train,
        "loss": ours_loss,
        "truth": truth,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="resnet,gpt", help="comma list from: resnet, gpt")
    ap.add_argument("--ks", default=None, help="comma list of k (default 1,5,20; quick: 1,3)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per cell, median")
    ap.add_argument("--truth-m", type=int, default=None, help="cap on reference Lanczos steps")
    ap.add_argument("--train-steps", type=int, default=None, help="SGD steps before probing")
    ap.add_argument(
        "--loose-tol",
        type=float,
        default=1e-2,
        help="also time ours (auto) at this residual tol, near PyHessian's accuracy; 0: skip",
    )
    ap.add_argument("--out", default=None, help="write rows + metadata to this JSON path")
    ap.add_argument("--quick", action="store_true", help="small smoke run (< 60 s)")
    ap.add_argument("--no-peers", action="store_true", help="only lightning_landscape")
    args = ap.parse_args()

    ks = [int(k) for k in (args.ks or ("1,3" if args.quick else "1,5,20")).split(",")]
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.truth_m = args.truth_m or (60 if args.quick else 250)
    steps = args.train_steps if args.train_steps is not None else (20 if args.quick else 60)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_default_dtype(torch.float32)

    have_ph = not args.no_peers and _pyhessian() is not None
    have_he = not args.no_peers and _eigenthings() is not None
    have_cl = not args.no_peers and _curvlinops() is not None
    meta = {
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "loadavg_start": os.getloadavg(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning_landscape": ll.__version__,
        "lightning_landscape_src_sha256_16": library_fingerprint(),
        "pyhessian": version_of("pyhessian") if have_ph else None,
        "hessian_eigenthings": version_of("hessian-eigenthings") if have_he else None,
        "curvlinops": version_of("curvlinops-for-pytorch") if have_cl else None,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "ks": ks,
        "repeats": args.repeats,
        "truth_m": args.truth_m,
        "our_tol": OUR_TOL,
        "dtype": "float32",
    }
    print(json.dumps(meta))
    if not args.no_peers and not have_ph:
        print("NOTE: pyhessian not importable; skipping it")
    if not args.no_peers and not have_he:
        print("NOTE: hessian_eigenthings not importable; skipping it")
    if not args.no_peers and not have_cl:
        print("NOTE: curvlinops (curvlinops-for-pytorch) not importable; skipping it")

    makers = {"resnet": make_cnn, "gpt": make_gpt}
    t_start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    problems = []
    for name in args.models.split(","):
        prob = makers[name](args.quick, steps)
        r, info = bench_problem(prob, ks, args, have_ph, have_he, have_cl)
        rows += r
        problems.append(info)
    meta["total_seconds"] = time.perf_counter() - t_start
    meta["loadavg_end"] = os.getloadavg()

    print()
    print_table([r for r in rows if "seconds" in r])
    for r in rows:
        if "error" in r:
            print(f"FAILED: {r['model']} {r['method']} k={r['k']}: {r['error']}")
    print(
        f"\ntotal {meta['total_seconds']:.1f} s; load average at start {meta['loadavg_start']}, "
        f"at end {meta['loadavg_end']} (other processes share these cores if it exceeds threads)"
    )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(
            json.dumps({"meta": meta, "problems": problems, "rows": rows}, indent=1) + "\n"
        )
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
