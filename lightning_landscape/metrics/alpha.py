"""Per-layer curvature exponent α: ``h_k = c·σ_k^α`` along the gradient's singular directions.

For a 2-D weight ``W`` (conv weights reshaped to ``(C_out, C_in·k_h·k_w)``) with mean-batch
gradient ``G = U Σ Vᵀ``, ``h_k = vec(u_k v_kᵀ)ᵀ H vec(u_k v_kᵀ)`` is the Rayleigh quotient of the
exact Hessian restricted to ``W`` along the unit rank-1 direction of the k-th singular pair (not
an eigenvalue), and α is the log-log slope of ``h_k`` on ``σ_k``, paired by SVD index.
"""

from __future__ import annotations

import fnmatch
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .._validate import integer
from ..context import NormStatistics, check_norm_statistics, curvature_context
from ..operators import HessianOperator, HVPRoute, LossFn, check_scalar_loss
from ..operators.hessian import eager_route
from ._fit import assess_fit, fit_power_law

LAYER_TYPES = ("conv", "attention", "mlp", "embedding", "head", "other")
_ATTENTION_MARKERS = (
    "attn",
    "attention",
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "qkv",
    "out_proj",
)
_EMBEDDING_MARKERS = ("embed", "wte", "wpe")
_HEAD_NAMES = ("head", "lm_head", "classifier")


@dataclass(frozen=True)
class AlphaResult:
    """Curvature exponent of one 2-D weight.

    Reliability rule: ``reliable`` is False when fewer than 5 pairs are kept, the kept σ span
    less than 1 decade, there is a leverage point (``σ₁/σ₂ > 10`` over kept pairs, so the OLS
    slope is dominated by k = 1) or the OLS and Theil–Sen slopes differ by more than 0.5;
    ``unreliable_reason`` lists every rule that fired. ``alpha`` is NaN with fewer than 2 kept
    pairs.

    Attributes:
        name: the parameter's qualified name (e.g. ``"layer1.0.conv1.weight"``).
        layer_type: ``"conv"``, ``"attention"``, ``"mlp"``, ``"embedding"``, ``"head"`` or
            ``"other"`` (see :func:`layer_type`).
        shape: shape ``(m, n)`` of the weight as a matrix.
        alpha: OLS slope of ``log h`` on ``log σ`` over kept pairs.
        intercept: OLS intercept ``log c`` (natural log).
        r2: R² of the OLS fit.
        alpha_theil_sen: robust Theil–Sen slope (median of pairwise slopes) over kept pairs.
        num_points: number of kept pairs.
        sigma_decades: ``log10(σ_max/σ_min)`` over kept pairs.
        sigma: 1-D float64 CPU tensor, the top-k singular values of the gradient in SVD order.
        h: 1-D float64 CPU tensor, the curvatures ``h_k`` paired with ``sigma``.
        kept: 1-D bool tensor, the pairs used by the fit (σ above the numerical-zero floor
            ``σ₁·max(m, n)·ε`` of the parameter dtype, ``h > 0``, both finite).
        reliable: whether the fit passes the reliability rule above.
        unreliable_reason: why not, or ``None``.
        num_hvps: Hessian-vector products spent on this layer (k).
        seconds: wall-clock time of this layer's SVD, products and fit (the shared gradient
            pass is not included).
    """

    name: str
    layer_type: str
    shape: tuple[int, int]
    alpha: float
    intercept: float
    r2: float
    alpha_theil_sen: float
    num_points: int
    sigma_decades: float
    sigma: Tensor
    h: Tensor
    kept: Tensor
    reliable: bool
    unreliable_reason: str | None
    num_hvps: int
    seconds: float


def is_transposed_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a linear layer storing its weight as ``(in, out)``.

    Hugging Face ``transformers``' ``Conv1D`` (GPT-2's attention and MLP projections, despite its
    name a linear layer) keeps ``weight`` as ``(in_features, out_features)``, the transpose of
    ``nn.Linear``. Recognised by duck typing (class name and its ``nf`` attribute), so
    ``transformers`` need not be installed.
    """
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__ == "Conv1D"
        and hasattr(module, "nf")
        and isinstance(weight, Tensor)
        and weight.ndim == 2
    )


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_transposed_linear(module)


def _out_features(module: nn.Module) -> int | None:
    if isinstance(module, nn.Linear):
        return int(module.out_features)
    if is_transposed_linear(module):
        return int(module.nf)  # type: ignore[arg-type]
    return None


def layer_type(name: str, module: nn.Module, *, is_head: bool = False) -> str:
    """Classify a weight by its owning module's type and its module path.

    Rules, first match wins: a ``Conv1d/2d/3d`` (or transposed) module is ``"conv"``; an
    ``nn.Embedding``, or a module whose path contains ``embed``, ``wte`` or ``wpe``, is
    ``"embedding"`` (a head tied to the embedding is typed by its own path, e.g. ``lm_head``);
    an ``nn.MultiheadAttention`` (its ``in_proj_weight``) or a module whose path contains
    ``attn``, ``attention``, ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, ``qkv`` or
    ``out_proj`` is ``"attention"`` (GPT-2's ``h.0.attn.c_attn`` and ``h.0.attn.c_proj``); a
    linear layer (``nn.Linear`` or ``transformers``' ``Conv1D``) flagged ``is_head``, named
    ``head``, ``lm_head`` or ``classifier`` (last path component) or a top-level ``fc`` is
    ``"head"``; any other linear layer is ``"mlp"`` (GPT-2's ``h.0.mlp.c_fc`` and
    ``h.0.mlp.c_proj``); everything else is ``"other"``. A bare output projection such as
    ``proj`` is not recognised as attention: override with ``layer_types=``.

    Args:
        name: qualified module path (``"transformer.h.0.attn.c_attn"``) or parameter name (its
            last component ``weight``/``bias``/``in_proj_weight`` is dropped).
        module: the module owning the parameter.
        is_head: the caller knows this is the model's output layer (see
            :func:`curvature_exponents`, which flags the last linear layer whose output size
            equals the model output's last dimension).

    Returns:
        One of :data:`LAYER_TYPES`.
    """
    parts = name.lower().split(".")
    if parts[-1] in ("weight", "bias", "in_proj_weight"):
        parts = parts[:-1]
    lowered = ".".join(parts)
    linear = _is_linear(module)
    if isinstance(module, nn.modules.conv._ConvNd):
        return "conv"
    if isinstance(module, nn.Embedding) or any(m in lowered for m in _EMBEDDING_MARKERS):
        return "embedding"
    if isinstance(module, nn.MultiheadAttention) or any(m in lowered for m in _ATTENTION_MARKERS):
        return "attention"
    if linear:
        last = parts[-1] if parts else ""
        if is_head or last in _HEAD_NAMES or lowered == "fc":
            return "head"
        return "mlp"
    return "other"


def layer_modules(model: nn.Module) -> dict[str, tuple[str, nn.Module]]:
    """The layer module behind each weight α can be measured on, by parameter name.

    Walks Linear, ``transformers``' ``Conv1D``, Conv and MultiheadAttention modules. A weight
    shared by several modules (an ``lm_head`` tied to the token embedding ``wte``) appears once,
    under its name in ``model.named_parameters()``, with the first layer module that uses it
    (``lm_head``: typed by that module, not by the embedding).

    Args:
        model: the module.

    Returns:
        ``{parameter name: (module path, module)}`` in ``model.named_parameters()`` order.
    """
    canonical = {id(p): n for n, p in model.named_parameters()}
    found: dict[str, tuple[str, nn.Module]] = {}
    for path, module in model.named_modules():
        attrs: tuple[str, ...] = ()
        if _is_linear(module) or isinstance(module, nn.modules.conv._ConvNd):
            attrs = ("weight",)
        elif isinstance(module, nn.MultiheadAttention):
            attrs = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
        for attr in attrs:
            p = getattr(module, attr, None)
            if isinstance(p, nn.Parameter) and p.ndim >= 2 and id(p) in canonical:
                found.setdefault(canonical[id(p)], (path, module))
    order = {n: i for i, n in enumerate(canonical.values())}
    return dict(sorted(found.items(), key=lambda item: order[item[0]]))


def resolve_layers(model: nn.Module, layers: Sequence[str] | None) -> list[str]:
    """The weights α is measured on: ``layers`` resolved against the model.

    Args:
        model: the module.
        layers: names or ``fnmatch`` patterns of weights (or of their modules), or ``None`` for
            every trainable weight of a layer module (see :func:`layer_modules`; tied weights
            once).

    Returns:
        Parameter names in ``model.named_parameters()`` order.

    Raises:
        ValueError: if a pattern matches no weight with at least 2 dimensions, or the default
            selection is empty.
    """
    if layers is None:
        params = dict(model.named_parameters())
        chosen = [n for n in layer_modules(model) if params[n].requires_grad]
        if not chosen:
            raise ValueError(
                "The model has no trainable Linear / Conv / attention weights (transformers' "
                "Conv1D included); name the weights with layers=[...]."
            )
        return chosen
    if isinstance(layers, str):
        layers = [layers]
    candidates = [n for n, p in model.named_parameters() if p.ndim >= 2]
    keep: set[str] = set()
    for pattern in layers:
        hits = [
            n
            for n in candidates
            if fnmatch.fnmatchcase(n, pattern) or fnmatch.fnmatchcase(n.rpartition(".")[0], pattern)
        ]
        if not hits:
            raise ValueError(
                f"Layer name or pattern {pattern!r} matches no parameter with >= 2 dimensions; "
                f"known: {', '.join(candidates[:8])}{', ...' if len(candidates) > 8 else ''}"
            )
        keep.update(hits)
    return [n for n in candidates if n in keep]


def _owner(model: nn.Module, name: str) -> tuple[str, nn.Module]:
    path = name.rpartition(".")[0]
    return path, model.get_submodule(path)


def _head_module(model: nn.Module, out_dim: int | None) -> str | None:
    """Path of the last linear layer with ``out_dim`` outputs (the last linear one if unknown)."""
    linears = [(n, m) for n, m in model.named_modules() if _is_linear(m)]
    if out_dim is not None:
        linears = [(n, m) for n, m in linears if _out_features(m) == out_dim]
    return linears[-1][0] if linears else None


def _layer_alpha(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    name: str,
    grad: Tensor,
    top_k: int,
    kind: str,
    route: HVPRoute,
    transposed: bool = False,
) -> AlphaResult:
    start = time.perf_counter()
    g = grad.detach().T if transposed else grad.detach()  # (out, in), as nn.Linear stores it
    g2 = g.reshape(g.shape[0], -1).to(torch.float64)
    m, n = g2.shape
    u, s, vh = torch.linalg.svd(g2, full_matrices=False)
    k = min(top_k, m, n)
    u, s, v = u[:, :k], s[:k], vh[:k].T
    outer = torch.einsum("ik,jk->ijk", u, v)  # (m, n, k): u_k v_kᵀ as (out, in) matrices
    if transposed:
        outer = outer.transpose(0, 1)  # back to the parameter's (in, out) storage
    directions = outer.reshape(m * n, k)
    directions = directions / directions.norm(dim=0, keepdim=True).clamp_min(1e-300)
    directions = directions.to(grad.dtype)
    op = HessianOperator(model, loss_fn, [batch], params=[name], route=eager_route(route))
    try:
        hd = op.matmat(directions)
    finally:
        op.release()
    h = (directions * hd).sum(0).detach().to("cpu", torch.float64)
    sigma = s.to("cpu")
    eps = torch.finfo(grad.dtype).eps if grad.dtype.is_floating_point else 0.0
    floor = (float(sigma[0]) if k else 0.0) * max(m, n) * eps
    fit = fit_power_law(sigma, h, sigma_floor=floor)
    reliable, reason = assess_fit(fit)
    return AlphaResult(
        name=name,
        layer_type=kind,
        shape=(m, n),
        alpha=fit.alpha,
        intercept=fit.intercept,
        r2=fit.r2,
        alpha_theil_sen=fit.alpha_theil_sen,
        num_points=fit.num_points,
        sigma_decades=fit.sigma_decades,
        sigma=sigma,
        h=h,
        kept=fit.kept,
        reliable=reliable,
        unreliable_reason=reason,
        num_hvps=k,
        seconds=time.perf_counter() - start,
    )


def curvature_exponents(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    top_k: int = 20,
    *,
    layers: Sequence[str] | None = None,
    layer_types: Mapping[str, str] | None = None,
    route: HVPRoute = "auto",
    eval_mode: bool = True,
    norm_statistics: NormStatistics = "running",
) -> dict[str, AlphaResult]:
    """Per-layer curvature exponent α on one fixed probe batch.

    For each selected weight ``W`` (as a matrix: conv weights ``(C_out, C_in·k_h·k_w)``) the
    mean-batch gradient ``G`` of ``loss_fn(model, batch)`` is decomposed, ``G = U Σ Vᵀ``; for the
    top-k singular triplets ``h_k = d_kᵀ H_W d_k`` with ``d_k = vec(u_k v_kᵀ)`` (unit norm) and
    ``H_W`` the exact Hessian restricted to ``W`` (one batched product of k vectors per layer);
    then ``h_k = c·σ_k^α`` is fitted in log-log space, pairs matched by SVD index. All gradients
    come from one backward pass. Runs inside :func:`~lightning_landscape.curvature_context`: the
    model, its ``.grad``, modes and RNGs are left as they were. Cost: ``k`` Hessian-vector
    products per layer plus one forward/backward.

    Args:
        model: the model.
        loss_fn: ``loss_fn(model, batch) -> scalar Tensor`` (the mean loss of the batch).
        batch: the probe batch, already on the model's device.
        top_k: number of singular directions per layer (capped at ``min(m, n)``).
        layers: ``None`` for every trainable weight of a ``Linear``/``Conv`` module,
            ``transformers``' ``Conv1D`` (its ``(in, out)`` weight is read transposed, as the
            ``(out, in)`` matrix of the linear map) and the input projections of
            ``nn.MultiheadAttention``, a weight tied between modules counted once; or parameter
            names / ``fnmatch`` patterns, matched against parameter names (``"fc1.weight"``,
            ``"*.conv*"``) and module names (``"fc1"``), restricted to parameters with at least
            2 dimensions.
        layer_types: overrides of the inferred :func:`layer_type`, by parameter name.
        route: HVP route of :class:`~lightning_landscape.operators.HessianOperator`
            (``"compiled"`` means ``"functorch"`` here: every layer has its own operator, which
            would compile a graph of its own).
        eval_mode: probe in ``eval()`` mode (default) or in the model's current modes.
        norm_statistics: how BatchNorm layers (and InstanceNorm with running statistics)
            normalise: ``"running"`` (default), or ``"batch"`` (needs ``eval_mode``) to
            normalise ``batch`` with its own statistics, as training does at that batch size,
            leaving the running statistics alone (see
            :func:`~lightning_landscape.hessian_eigenvalues`).

    Returns:
        ``{parameter name: AlphaResult}`` in ``model.named_parameters()`` order.

    Raises:
        ValueError: for ``top_k < 1``, a layer pattern that matches no parameter with at least 2
            dimensions, an unknown layer type in ``layer_types``, a non-scalar loss, an unknown
            ``norm_statistics``, or ``"batch"`` with ``eval_mode=False`` on a model with
            normalisation layers.

    Example::

        results = curvature_exponents(model, loss_fn, batch, top_k=20)
        for name, r in results.items():
            print(name, r.layer_type, r.alpha, r.r2, r.reliable, r.unreliable_reason)
        group_alphas(results)  # {"conv": 2.03, "head": 1.41, ...}
    """
    integer("top_k", top_k)
    check_norm_statistics(model, eval_mode, norm_statistics)
    overrides = dict(layer_types or {})
    bad = {t for t in overrides.values() if t not in LAYER_TYPES}
    if bad:
        raise ValueError(f"Unknown layer types {sorted(bad)}; expected one of {LAYER_TYPES}")
    names = resolve_layers(model, layers)
    params = dict(model.named_parameters())
    results: dict[str, AlphaResult] = {}
    with curvature_context(model, eval_mode=eval_mode, norm_statistics=norm_statistics):
        outputs: list[Any] = []
        hook = model.register_forward_hook(lambda _m, _i, out: outputs.append(out))
        try:
            for n in names:
                params[n].requires_grad_(True)  # frozen weights may be probed; restored on exit
            loss = check_scalar_loss(loss_fn(model, batch))
        finally:
            hook.remove()
        grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
        del loss
        out = outputs[0] if outputs else None
        out_dim = int(out.shape[-1]) if isinstance(out, Tensor) and out.ndim > 0 else None
        outputs.clear()
        head = _head_module(model, out_dim)
        modules = layer_modules(model)
        for n, g in zip(names, grads, strict=True):
            g = torch.zeros_like(params[n]) if g is None else g
            path, module = modules.get(n) or _owner(model, n)
            is_head = path == head and _is_linear(module)
            kind = overrides.get(n) or layer_type(path, module, is_head=is_head)
            transposed = is_transposed_linear(module) and n in modules
            results[n] = _layer_alpha(model, loss_fn, batch, n, g, top_k, kind, route, transposed)
    return results


def group_alphas(results: Mapping[str, AlphaResult]) -> dict[str, float]:
    """Mean α per layer type over the reliable layers.

    Args:
        results: the output of :func:`curvature_exponents`.

    Returns:
        ``{layer type: mean α}`` for every type present in ``results``; NaN for a type with no
        reliable layer with a finite α.
    """
    groups: dict[str, list[float]] = {}
    for r in results.values():
        values = groups.setdefault(r.layer_type, [])
        if r.reliable and math.isfinite(r.alpha):
            values.append(r.alpha)
    return {t: (sum(v) / len(v) if v else math.nan) for t, v in groups.items()}
