"""Trace: a Hutch++ estimate of tr(H) with its standard error."""

from __future__ import annotations

import math
from typing import Any

from .._validate import integer
from ..report import tags
from ..report.layout import SPECTRUM, Layout, multiline
from ..solvers import TraceResult, hutchpp_trace
from .base import Probe, ProbeContext, Row, fmt


class Trace(Probe):
    """The Hessian trace by Hutch++ (:func:`~lightning_landscape.hutchpp_trace`).

    Runs on the round's Hessian operator (under DDP the global Hessian). Logs
    ``landscape/trace`` and ``landscape/trace_stderr``; trust the estimate when the standard
    error is far below ``|trace|`` (raise ``num_hvps`` otherwise).

    Args:
        num_hvps: Hessian-vector products (at least 3).
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

    def run(self, ctx: ProbeContext) -> TraceResult:
        """Hutch++ on the round's operator."""
        return hutchpp_trace(ctx.operator(), self.num_hvps, seed=ctx.seed)

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
        note = f"± {fmt(result.stderr, 3)} (Hutch++, {result.num_hvps} HVPs)"
        return [["trace", fmt(result.trace), note]]

    def summary(self, result: TraceResult) -> dict[str, Any]:
        """Estimate, standard error and cost."""
        return {
            "trace": result.trace,
            "stderr": result.stderr,
            "num_hvps": result.num_hvps,
            "seconds": result.seconds,
        }
