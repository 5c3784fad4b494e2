"""Curvature along the step the optimizer just took, for any optimizer."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from ..report import tags
from ..report.layout import SHARPNESS, Layout, multiline
from ..solvers._orthogonality import dot, vector_norm
from .base import Probe, ProbeContext, Row, fmt


@dataclass(frozen=True)
class UpdateCurvatureResult:
    """The curvature of the probe loss along the last optimizer step ``u = θ_t − θ_{t−1}``.

    Attributes:
        curvature: ``uᵀHu / uᵀu``, the Hessian's Rayleigh quotient along the step (directional
            sharpness); at most λ_max.
        overshoot: ``uᵀHu / (−2 gᵀu)`` with ``g`` the probe gradient at ``θ_t``: on the quadratic
            model along ``u``, repeating the step lowers the probe loss iff ``overshoot < 1``
            (``> 1``: it would overshoot the minimum along ``u`` and raise the loss). ``None``
            when ``gᵀu ≥ 0`` (the step does not point downhill from ``θ_t``: every repeat raises
            the loss to first order).
        step_norm: ``‖u‖``.
        descent: ``−gᵀu / (‖g‖ ‖u‖)``, the cosine between the step and the negative gradient.
        num_hvps: Hessian-vector products (1).
        seconds: wall-clock time of the product and the gradient.
    """

    curvature: float
    overshoot: float | None
    step_norm: float
    descent: float
    num_hvps: int
    seconds: float


class UpdateCurvature(Probe):
    r"""Curvature of the probe loss along the step the optimizer just took.

    With ``u = θ_t − θ_{t−1}`` the last step over the probed parameters (whatever the optimizer:
    SGD, Adam, Lion, Muon, Adafactor, SAM, ...) and ``g = ∇L_probe(θ_t)``, logs
    ``landscape/update/curvature`` ``= uᵀHu / uᵀu`` (Pan & Li 2023's directional sharpness) and
    ``landscape/update/overshoot`` ``= uᵀHu / (−2 gᵀu)``: along ``u`` the quadratic model gives
    ``L(θ + u) − L(θ) ≈ gᵀu + ½ uᵀHu``, so an overshoot above 1 means repeating the same step
    would raise the probe loss. Also ``landscape/update/step_norm`` and
    ``landscape/update/descent`` (the cosine between ``u`` and ``−g``).

    Cost: one Hessian-vector product on the round's shared operator and one gradient, plus one
    copy of the probed parameters that the monitor takes just before the optimizer step that
    precedes each of this probe's measurements (before every step under the monitor's
    ``max_overhead``, where the next probe step is not known ahead). A measurement with no step
    behind it (at the start of training, on a checkpoint) reports nothing.

    Args:
        every_n_steps: see :class:`~lightning_landscape.probes.Cadence`.
        every_n_epochs: see :class:`~lightning_landscape.probes.Cadence`.
        on_train_end: see :class:`~lightning_landscape.probes.Cadence` (measured only if the
            last step was preceded by a copy, i.e. was itself a probe step).

    Raises:
        ValueError: on an invalid cadence.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from lightning_landscape.probes import ProbeContext, UpdateCurvature
        >>> model = nn.Linear(2, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(torch.tensor([[1.0, 1.0]]))
        >>> x = torch.diag(torch.tensor([1.0, 2.0]))
        >>> loss_fn = lambda m, b: 0.5 * (m(b) ** 2).sum()  # H = diag(1, 4), g = Hθ
        >>> previous = torch.tensor([1.0, 1.5])  # the step was u = (0, -0.5)
        >>> ctx = ProbeContext(model, loss_fn, [x], previous=previous)
        >>> result = UpdateCurvature().run(ctx)
        >>> result.curvature, result.overshoot  # uᵀHu/uᵀu = 4; 1 / (-2 · -2) = 0.25
        (4.0, 0.25)
    """

    name = "update"
    supports_sharding = True
    order = 5
    needs_previous = True

    def __init__(
        self,
        *,
        every_n_steps: int | None = 100,
        every_n_epochs: int | None = None,
        on_train_end: bool = True,
    ) -> None:
        super().__init__(
            every_n_steps=every_n_steps,
            every_n_epochs=every_n_epochs,
            on_train_start=False,
            on_train_end=on_train_end,
        )

    def run(self, ctx: ProbeContext) -> UpdateCurvatureResult | None:
        """One product ``Hu`` and the probe gradient, or ``None`` without a step behind.

        Raises:
            ProbeFailure: as :meth:`ProbeContext.operator`.
        """
        if ctx.previous is None:
            return None
        op = ctx.operator()
        start = time.perf_counter()
        u = ctx.parameters_flat().to(dtype=op.dtype, device=op.device)
        u = u - ctx.previous.to(dtype=op.dtype, device=op.device)
        sh = op.sharding  # inner products over every process's slices when sharded
        uu = dot(u, u, sh)
        if uu == 0.0:
            return None  # no step (e.g. a learning rate of 0, or a skipped step)
        uhu = dot(u, op @ u, sh)
        g = ctx.gradient()
        gu = dot(g, u, sh)
        gnorm = vector_norm(g, sh)
        return UpdateCurvatureResult(
            curvature=uhu / uu,
            overshoot=uhu / (-2.0 * gu) if gu < 0 else None,
            step_norm=math.sqrt(uu),
            descent=-gu / (gnorm * math.sqrt(uu)) if gnorm > 0 else 0.0,
            num_hvps=1,
            seconds=time.perf_counter() - start,
        )

    def is_finite(self, result: UpdateCurvatureResult) -> bool:
        """Whether the curvature and the overshoot are finite."""
        values = (result.curvature, result.descent, result.overshoot or 0.0)
        return all(math.isfinite(v) for v in values)

    def scalars(self, result: UpdateCurvatureResult) -> dict[str, float]:
        """Curvature, overshoot (when the step points downhill), step norm and descent."""
        out = {
            tags.UPDATE_CURVATURE: result.curvature,
            tags.UPDATE_STEP_NORM: result.step_norm,
            tags.UPDATE_DESCENT: result.descent,
        }
        if result.overshoot is not None:
            out[tags.UPDATE_OVERSHOOT] = result.overshoot
        return out

    def charts(self) -> Layout:
        """The curvature along the update next to λ_max, and the overshoot."""
        return {
            SHARPNESS: {
                "curvature along the update uᵀHu/uᵀu (≤ λ_max)": multiline(
                    tags.exact(tags.UPDATE_CURVATURE), tags.exact(tags.LAMBDA_MAX)
                ),
                "update overshoot uᵀHu/(−2gᵀu)  (> 1: repeating the step raises the loss)": (
                    multiline(tags.exact(tags.UPDATE_OVERSHOOT))
                ),
            }
        }

    def rows(self, result: UpdateCurvatureResult) -> list[Row]:
        """Curvature, overshoot and the step."""
        return [
            ["update curvature", fmt(result.curvature), "uᵀHu / uᵀu"],
            ["update overshoot", fmt(result.overshoot), "uᵀHu / (−2 gᵀu); > 1 overshoots"],
            ["update step norm", fmt(result.step_norm), f"descent cosine {result.descent:.3f}"],
        ]

    def summary(self, result: UpdateCurvatureResult) -> dict[str, Any]:
        """All fields."""
        return dict(vars(result))
