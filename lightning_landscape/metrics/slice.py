"""Loss-surface slices: the loss on a 1-D line or a 2-D plane through the current weights.

``L(w + a d₁)`` or ``L(w + a d₁ + b d₂)`` on a square grid of coordinates in ``[−span, span]``,
along random directions normalised as in Li et al., "Visualizing the Loss Landscape of Neural
Nets" (NeurIPS 2018), along the top Hessian eigenvectors (as PyHessian's tutorial and Landscaper
do), or along directions the caller supplies. Parameters are moved in place under ``no_grad`` and
restored bit-for-bit, also on error.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .._validate import choice, integer, real
from ..context import NormStatistics, check_norm_statistics, curvature_context
from ..functional import hessian_eigenvalues
from ..operators import LossFn, check_scalar_loss, restored_parameters, select_parameters

Normalization = Literal["filter", "layer", "none"]
NORMALIZATIONS: tuple[str, ...] = ("filter", "layer", "none")


@dataclass(frozen=True)
class SliceResult:
    """The loss on a grid through the weights ``w``.

    Attributes:
        coords: 1-D float64 CPU tensor of the ``steps`` coordinates of each axis, ``−span`` to
            ``span``.
        losses: float64 CPU tensor, ``(steps,)`` with ``losses[i] = L(w + coords[i] d₁)`` or
            ``(steps, steps)`` with ``losses[i, j] = L(w + coords[i] d₁ + coords[j] d₂)`` (first
            index along ``d₁``). Non-finite losses far from ``w`` are kept as they are.
        directions: ``"random"``, ``"eigen"`` or ``"explicit"``.
        dims: 1 or 2.
        vectors: ``(dims, N)`` directions ``d₁[, d₂]`` over the flattened probed parameters (in
            :func:`~lightning_landscape.operators.select_parameters` order), parameter dtype and
            device; ``dims × N`` numbers, drop the result if that memory matters.
        normalization: the normalisation of random directions, else ``None``.
        eigenvalues: for ``"eigen"``, the Hessian eigenvalues (float64, descending) belonging
            to ``d₁[, d₂]``; else ``None``.
        converged: for ``"eigen"``, whether every eigenpair met the tolerance; else ``None``.
        center_loss: ``L(w)``.
        num_evals: loss evaluations (``steps ** dims`` plus one at the centre).
        num_hvps: Hessian-vector products of the eigensolver (0 unless ``"eigen"``).
        seconds: wall-clock time of the whole call.
    """

    coords: Tensor
    losses: Tensor
    directions: str
    dims: int
    vectors: Tensor
    normalization: str | None
    eigenvalues: Tensor | None
    converged: bool | None
    center_loss: float
    num_evals: int
    num_hvps: int
    seconds: float

    @property
    def direction_cosine(self) -> float | None:
        """Cosine of the angle between ``d₁`` and ``d₂`` (``None`` for a 1-D slice).

        Independent random directions are not orthogonalised (that would undo their per-filter
        normalisation); in ``N`` dimensions their cosine is of order ``1/√N``.
        """
        if self.dims != 2:
            return None
        d1, d2 = self.vectors[0].to(torch.float64), self.vectors[1].to(torch.float64)
        return float(d1 @ d2) / max(float(d1.norm() * d2.norm()), 1e-300)


def _check_grid(dims: int, steps: int, span: float) -> None:
    choice("dims", dims, (1, 2))
    integer("steps", steps, minimum=2)
    real("span", span, low=0)


def _random_direction(
    probed: Sequence[Tensor], normalization: str, ignore: bool, gen: torch.Generator
) -> Tensor:
    """One Gaussian direction, normalised per filter / per tensor / to unit norm, flattened."""
    pieces: list[Tensor] = []
    for p in probed:
        # drawn in float64 on the CPU: the same direction on every device and dtype
        d = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.device)
        w = p.detach().to(torch.float64)
        if p.ndim <= 1 and ignore:
            d.zero_()
        elif normalization == "filter" and p.ndim >= 2:
            scale = w.flatten(1).norm(dim=1) / d.flatten(1).norm(dim=1).clamp_min(1e-300)
            d.mul_(scale.view(-1, *([1] * (p.ndim - 1))))
        elif normalization != "none":  # "layer", and 1-D tensors under "filter": one block
            d.mul_(w.norm() / d.norm().clamp_min(1e-300))
        pieces.append(d.reshape(-1))
    flat = torch.cat(pieces)
    norm = float(flat.norm())
    if not norm > 0:
        raise ValueError(
            "the random direction is zero: every probed tensor is 1-D (zeroed by "
            "ignore_biases_and_norms=True) or has zero weights (filter/layer normalisation "
            "scales to the weights' norm); pass ignore_biases_and_norms=False or other params"
        )
    if normalization == "none":
        flat = flat / norm
    return flat.to(probed[0].dtype)


def _explicit(directions: Any, size: int, like: Tensor) -> list[Tensor]:
    if isinstance(directions, Tensor):
        vecs = list(directions.unbind(0)) if directions.ndim == 2 else [directions]
    elif isinstance(directions, Sequence):
        vecs = list(directions)
    else:
        vecs = []
    if not vecs or len(vecs) > 2 or not all(isinstance(v, Tensor) for v in vecs):
        raise ValueError(
            "directions must be 'random', 'eigen' or a sequence of one or two flat tensors "
            f"(one entry per probed parameter), got {directions!r}"
        )
    out = []
    for i, v in enumerate(vecs):
        if v.numel() != size:
            raise ValueError(
                f"direction {i} has {v.numel()} entries; the probed parameters have {size}"
            )
        if not bool(torch.isfinite(v).all()):
            raise ValueError(f"direction {i} has NaN/inf entries")
        out.append(v.detach().reshape(-1).to(device=like.device, dtype=like.dtype))
    return out


def _loss(model: nn.Module, loss_fn: LossFn, batch: Any) -> float:
    return float(check_scalar_loss(loss_fn(model, batch)).detach().to(torch.float64))


def loss_slice(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    *,
    directions: Literal["random", "eigen"] | Sequence[Tensor] | Tensor = "random",
    dims: int | None = None,
    steps: int = 21,
    span: float = 1.0,
    normalization: Normalization = "filter",
    ignore_biases_and_norms: bool = True,
    params: Sequence[str] | Sequence[Tensor] | None = None,
    tol: float = 1e-6,
    seed: int = 0,
    eval_mode: bool = True,
    norm_statistics: NormStatistics = "running",
) -> SliceResult:
    """The loss on a 1-D line or 2-D plane through the current weights.

    Evaluates ``L(w + a d₁)`` (``dims=1``) or ``L(w + a d₁ + b d₂)`` (``dims=2``) for ``a, b``
    on ``steps`` evenly spaced coordinates in ``[−span, span]``, under ``no_grad`` inside
    :func:`~lightning_landscape.curvature_context`. The weights, ``.grad``, modes, buffers and
    global RNG are left exactly as they were (the weights also on error). Directions:

    * ``"random"``: Gaussian, from a private generator seeded with ``seed``, normalised by
      ``normalization``: ``"filter"`` (Li et al. 2018): each filter (slice along dimension 0) of
      a tensor with two or more dimensions, e.g. a conv kernel's output channel or a linear
      layer's row, is rescaled to the norm of the same filter of the weights, so coordinates are
      relative to the weights' scale; 1-D tensors are rescaled as one block; ``"layer"``: each
      tensor rescaled to the norm of its weights; ``"none"``: the whole direction rescaled to
      unit norm (coordinates in parameter units). With ``ignore_biases_and_norms`` (Li et al.'s
      ``biasbn``) the direction is zero on every 1-D tensor (biases, BatchNorm/LayerNorm
      scales and shifts), so those stay at their values. Two random directions are not
      orthogonalised (that would undo the normalisation); in ``N`` dimensions their cosine is
      of order ``1/√N`` (see :attr:`SliceResult.direction_cosine`).
    * ``"eigen"``: the ``dims`` algebraically largest Hessian eigenvectors (unit norm, from
      :func:`~lightning_landscape.hessian_eigenvalues` on ``batch`` with tolerance ``tol``), so
      coordinates are distances in parameter units; ``normalization`` and
      ``ignore_biases_and_norms`` do not apply. Their signs are arbitrary.
    * explicit: one or two flat tensors of ``N`` entries (or a ``(dims, N)`` tensor), used as
      given.

    The batch is evaluated as it is on this process (no all-reduce across ranks).

    Args:
        model: the network at the weights ``w``.
        loss_fn: ``loss_fn(model, batch) -> scalar Tensor``.
        batch: the probe batch, already on the model's device.
        directions: ``"random"``, ``"eigen"`` or explicit flat direction tensors.
        dims: 1 or 2; default the number of explicit directions, else 1.
        steps: grid points per axis (``>= 2``; odd puts ``0`` on the grid).
        span: coordinates run over ``[−span, span]`` (``> 0``).
        normalization: ``"filter"``, ``"layer"`` or ``"none"`` (random directions).
        ignore_biases_and_norms: zero random directions on 1-D parameters.
        params: parameter subset (see :func:`~lightning_landscape.operators.select_parameters`).
        tol: relative residual tolerance of the eigensolver (``"eigen"``).
        seed: seeds the random directions or the eigensolver's start.
        eval_mode: evaluate with every submodule in ``eval()`` (restored afterwards).
        norm_statistics: ``"running"`` (default): BatchNorm-type layers normalise with their
            running statistics; ``"batch"`` (needs ``eval_mode``): every evaluation normalises
            the whole ``batch`` with its own statistics, as
            :class:`~lightning_landscape.LandscapeMonitor`'s slices do by default (the
            ``"eigen"`` directions then come from that Hessian too). That is training's
            normalisation when ``batch`` has the training batch size; for a larger set, pass a
            ``loss_fn`` that averages the loss over training-size chunks. See
            :func:`~lightning_landscape.hessian_eigenvalues`.

    Returns:
        A :class:`SliceResult`.

    Raises:
        ValueError: for ``dims`` not 1 or 2 (or not the number of explicit directions),
            ``steps < 2``, ``span <= 0``, an unknown ``directions`` or ``normalization``,
            explicit directions of the wrong size, a random direction that is zero, an
            unknown ``norm_statistics``, or ``"batch"`` with ``eval_mode=False`` on a model with
            normalisation layers.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from lightning_landscape.metrics import loss_slice
        >>> model = nn.Linear(2, 1, bias=False)
        >>> loss_fn = lambda m, x: 0.5 * (m(x) ** 2).sum()
        >>> with torch.no_grad():
        ...     _ = model.weight.zero_()
        >>> d = torch.tensor([1.0, 0.0])
        >>> r = loss_slice(model, loss_fn, torch.eye(2), directions=[d], steps=3)
        >>> r.losses  # ½ a² at a = -1, 0, 1
        tensor([0.5000, 0.0000, 0.5000], dtype=torch.float64)
    """
    t0 = time.perf_counter()
    kind = directions if isinstance(directions, str) else "explicit"
    if kind not in ("random", "eigen", "explicit"):
        raise ValueError(
            f"directions must be 'random', 'eigen' or a sequence of flat tensors, got {kind!r}"
        )
    if kind == "random":
        choice("normalization", normalization, NORMALIZATIONS)
    check_norm_statistics(model, eval_mode, norm_statistics)
    probed = [p for _, p in select_parameters(model, params)]
    size = sum(p.numel() for p in probed)
    explicit = _explicit(directions, size, probed[0]) if kind == "explicit" else None
    if dims is None:
        dims = 1 if explicit is None else len(explicit)
    _check_grid(dims, steps, span)
    if explicit is not None and len(explicit) != dims:
        raise ValueError(f"dims={dims} but {len(explicit)} explicit direction(s) were given")
    eigenvalues: Tensor | None = None
    converged: bool | None = None
    num_hvps = 0
    if kind == "eigen":
        eig = hessian_eigenvalues(
            model,
            loss_fn,
            batch,
            k=dims,
            tol=tol,
            params=params,
            return_eigenvectors=True,
            seed=seed,
            eval_mode=eval_mode,
            norm_statistics=norm_statistics,
            distributed=False,
        )
        assert eig.eigenvectors is not None
        vectors = eig.eigenvectors.T.contiguous()
        eigenvalues, converged, num_hvps = eig.eigenvalues, eig.all_converged, eig.num_hvps
    elif kind == "random":
        gen = torch.Generator().manual_seed(seed)
        vectors = torch.stack(
            [
                _random_direction(probed, normalization, ignore_biases_and_norms, gen)
                for _ in range(dims)
            ]
        )
    else:
        assert explicit is not None
        vectors = torch.stack(explicit)
    coords = torch.linspace(-float(span), float(span), steps, dtype=torch.float64)
    grid = coords.tolist()
    numels = [p.numel() for p in probed]
    split = [torch.split(v, numels) for v in vectors]
    losses = torch.empty((steps,) * dims, dtype=torch.float64)
    with curvature_context(model, eval_mode=eval_mode, norm_statistics=norm_statistics):
        with restored_parameters(probed) as saved, torch.no_grad():
            center = _loss(model, loss_fn, batch)
            for index in torch.cartesian_prod(*[torch.arange(steps)] * dims).view(-1, dims):
                idx = tuple(int(i) for i in index)
                for k, (p, w0) in enumerate(zip(probed, saved, strict=True)):
                    p.copy_(w0)
                    for axis, i in enumerate(idx):
                        p.add_(split[axis][k].view_as(p), alpha=grid[i])
                losses[idx] = _loss(model, loss_fn, batch)
    return SliceResult(
        coords=coords,
        losses=losses,
        directions=kind,
        dims=dims,
        vectors=vectors,
        normalization=normalization if kind == "random" else None,
        eigenvalues=eigenvalues,
        converged=converged,
        center_loss=center,
        num_evals=steps**dims + 1,
        num_hvps=num_hvps,
        seconds=time.perf_counter() - t0,
    )
