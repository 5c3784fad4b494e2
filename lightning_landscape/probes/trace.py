"""Trace: a Hutch++ estimate of tr(H) with its standard error."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .._validate import flag, integer
from ..report import tags
from ..report.layout import SPECTRUM, Layout, multiline
from ..solvers import EigenResult, TraceResult, deflated_trace, hutchpp_trace
from .base import Probe, ProbeContext, Row, fmt, join_columns
from .sharpness import SharpnessResult


class Trace(Probe):
    """The Hessian trace by Hutch++ (:func:`~lightning_landscape.hutchpp_trace`).

    Runs on the round's Hessian operator (under DDP the global Hessian). Logs
    ``landscape/trace`` and ``landscape/trace_stderr``; trust the estimate when the standard
    error is far below ``|trace|`` (raise ``num_hvps`` otherwise).

    When a :class:`~lightning_landscape.probes.Sharpness` probe measured in the same round and
    all its top-k pairs converged, their eigenvectors replace Hutch++'s sketch
    (:func:`~lightning_landscape.solvers.deflated_trace`): the trace over their span is the sum
    of the top-k eigenvalues. A converged λ_min below them is deflated as well: a strongly
    negative one adds ``λ_min²`` to the variance of the rest (on the ResNet-18 of
    ``benchmarks/warm_start.py`` the standard error fell by 2–18 % in six of seven rounds).
    Only Hutch++'s Hutchinson share of the budget (``num_hvps − 2⌊num_hvps/3⌋`` products, 10 of
    the default 30) is spent on the rest. The default monitor's round thus pays 10 products for
    its trace instead of 30.

    Args:
        num_hvps: Hessian-vector products (at least 3).
        reuse_eigenvectors: use the same round's converged sharpness eigenvectors as above
            (``False``: always Hutch++ with the whole budget).
        every_n_steps: see :class:`~lightning_landscape.probes.Cadence`.
        every_n_epochs: see :class:`~lightning_landscape.probes.Cadence`.
        on_train_start: see :class:`~lightning_landscape.probes.Cadence`.
        on_train_end: see :class:`~lightning_landscape.probes.Cadence`.

    Raises:
        ValueError: if ``num_hvps < 3`` or the cadence is invalid.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from lightning_landscape.probes import ProbeContext, Trace
        >>> model = nn.Linear(3, 1, bias=False)
        >>> loss_fn = lambda m, b: 0.5 * (m(b) ** 2).sum()  # H = I
        >>> round(Trace(num_hvps=9).run(ProbeContext(model, loss_fn, [torch.eye(3)])).trace, 6)
        3.0
    """

    name = "trace"
    supports_sharding = True
    order = 10

    def __init__(
        self,
        num_hvps: int = 30,
        *,
        reuse_eigenvectors: bool = True,
        every_n_steps: int | None = 100,
        every_n_epochs: int | None = None,
        on_train_start: bool = True,
        on_train_end: bool = True,
    ) -> None:
        super().__init__(
            every_n_steps=every_n_steps,
            every_n_epochs=every_n_epochs,
            on_train_start=on_train_start,
            on_train_end=on_train_end,
        )
        self.num_hvps = integer("num_hvps", num_hvps, minimum=3)
        self.reuse_eigenvectors = flag("reuse_eigenvectors", reuse_eigenvectors)

    def run(self, ctx: ProbeContext) -> TraceResult:
        """Hutch++ on the round's operator, or Hutchinson off the round's sharpness eigenvectors."""
        op = ctx.operator()
        sharpness = ctx.results.get("sharpness") if self.reuse_eigenvectors else None
        if isinstance(sharpness, SharpnessResult):
            top = sharpness.top
            if top.eigenvectors is not None and top.all_converged and top.is_finite:
                vectors, values = _with_bottom(top, sharpness.bottom)
                probes = self.num_hvps - 2 * (self.num_hvps // 3)
                return deflated_trace(op, vectors, values, max(probes, 2), seed=ctx.seed)
        return hutchpp_trace(op, self.num_hvps, seed=ctx.seed)

    def is_finite(self, result: TraceResult) -> bool:
        """Whether the estimate is finite."""
        return math.isfinite(result.trace)

    def scalars(self, result: TraceResult) -> dict[str, float]:
        """The trace and (when finite) its standard error."""
        out = {tags.TRACE: result.trace}
        if math.isfinite(result.stderr):
            out[tags.TRACE_STDERR] = result.stderr
        return out

    def charts(self) -> Layout:
        """The trace chart of the spectrum category."""
        return {SPECTRUM: {"trace (Hutch++)": multiline(tags.exact(tags.TRACE))}}

    def rows(self, result: TraceResult) -> list[Row]:
        """The estimate with its standard error."""
        how = "Hutch++" if result.method == "hutch++" else "deflated Hutchinson"
        note = f"± {fmt(result.stderr, 3)} ({how}, {result.num_hvps} HVPs)"
        return [["trace", fmt(result.trace), note]]

    def summary(self, result: TraceResult) -> dict[str, Any]:
        """Estimate, standard error and cost."""
        return {
            "trace": result.trace,
            "stderr": result.stderr,
            "num_hvps": result.num_hvps,
            "seconds": result.seconds,
        }


def _with_bottom(top: EigenResult, bottom: EigenResult | None) -> tuple[Tensor, Tensor]:
    """The top-k pairs, plus the λ_min pair when it converged below all of them.

    A strongly negative λ_min (a saddle direction) adds ``λ_min²`` to the Hutchinson variance of
    the rest, so it is deflated too. A λ_min equal to one of the top-k values (the top-k span the
    whole spectrum) would be counted twice, so it is left out.
    """
    assert top.eigenvectors is not None
    if (
        bottom is None
        or bottom.eigenvectors is None
        or not (bottom.all_converged and bottom.is_finite)
        or not float(bottom.eigenvalues.max()) < float(top.eigenvalues.min())
    ):
        return top.eigenvectors, top.eigenvalues
    vectors = join_columns([top.eigenvectors, bottom.eigenvectors])
    return vectors, torch.cat([top.eigenvalues, bottom.eigenvalues])  # both float64
