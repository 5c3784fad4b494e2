"""Batch sharpness: what sits at 2/η under mini-batch SGD."""

from __future__ import annotations

import math
from typing import Any

from .._validate import integer, optional_integer, real
from ..metrics.batch_sharpness import BatchSharpnessResult, batch_sharpness
from ..operators import ProbeFailure, batch_size, select_parameters
from ..operators.distributed import count_failures, weighted_mean_tensor
from ..optim.thresholds import probed_stability
from ..report import tags
from ..report.layout import SHARPNESS, Layout, multiline
from .base import Probe, ProbeContext, Row, fmt

_BATCH_SEED = 15485863  # the draws use their own stream, apart from the solvers'


class BatchSharpness(Probe):
    r"""Batch sharpness ``E_B[g_Bᵀ H_B g_B / ‖g_B‖²]`` over batches of the training batch size.

    Each draw takes a batch of the training batch size from the probe data, its gradient ``g_B``
    and the product of its own Hessian ``H_B`` with it
    (:func:`~lightning_landscape.metrics.batch_sharpness`); draws go on until the relative
    standard error reaches ``rtol`` or ``max_batches`` were drawn. Under mini-batch SGD this is
    the quantity that rises to the edge of stability ``2/η`` (``(2 + 2β)/η`` with momentum),
    while the full-batch λ_max stays below it (Andreyev & Beneventano), so with SGD it is logged
    next to that threshold. With BatchNorm in the monitor's default ``norm_statistics="batch"``
    each drawn batch is normalised with its own statistics, as in training. Under data
    parallelism every rank draws its own batch: the estimate is that of the global batch. When
    the round's route is ``"finite_difference"`` (chosen, or switched to by the monitor's product
    check), the products are finite differences of each batch's gradient; otherwise double
    backward.

    Logs ``landscape/batch_sharpness``, ``landscape/batch_sharpness_stderr`` and, under SGD,
    ``landscape/stability_threshold``.

    Args:
        batch_size: samples per drawn batch (per process); default the training batch size
            (required outside training, e.g. in ``analyze``).
        rtol: relative standard error at which to stop, in (0, 1).
        min_batches: draws before stopping is considered (at least 2).
        max_batches: the most draws per measurement (each about one training step's forward and
            backward plus one Hessian-vector product).
        every_n_steps: see :class:`~lightning_landscape.probes.Cadence`.
        every_n_epochs: see :class:`~lightning_landscape.probes.Cadence`.
        on_train_start: see :class:`~lightning_landscape.probes.Cadence`.
        on_train_end: see :class:`~lightning_landscape.probes.Cadence`.

    Raises:
        ValueError: on invalid settings.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from lightning_landscape.probes import BatchSharpness, ProbeContext
        >>> model = nn.Linear(2, 1, bias=False)
        >>> loss_fn = lambda m, b: 0.5 * (m(b) ** 2).mean()
        >>> probe = BatchSharpness(batch_size=4, min_batches=4, max_batches=8)
        >>> result = probe.run(ProbeContext(model, loss_fn, [torch.randn(64, 2)]))
        >>> 4 <= result.num_batches <= 8
        True
    """

    name = "batch_sharpness"
    order = 15

    def __init__(
        self,
        batch_size: int | None = None,
        *,
        rtol: float = 0.01,
        min_batches: int = 10,
        max_batches: int = 200,
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
        self.batch_size = optional_integer("batch_size", batch_size)
        self.rtol = real("rtol", rtol, low=0, high=1, high_open=True)
        self.min_batches = integer("min_batches", min_batches, minimum=2)
        self.max_batches = integer("max_batches", max_batches, minimum=self.min_batches)
        self.threshold: float | None = None  # SGD's threshold at the last measurement

    def run(self, ctx: ProbeContext) -> BatchSharpnessResult:
        """Draw batches from the probe data until the standard error is small enough.

        Raises:
            ProbeFailure: if the batch size is unknown, or the probe data is too small.
        """
        size = self.batch_size or ctx.batch_size
        if size is None:
            raise ProbeFailure(
                "has no batch size: the training batch size is unknown, set "
                "BatchSharpness(batch_size=...)"
            )
        pool = batch_size(ctx.single_batch)
        if count_failures(pool <= size, timeout=ctx.timeout):  # every rank decides alike
            raise ProbeFailure(
                f"has too little probe data: batches of {size} samples are drawn from the probe "
                f"data, which holds {pool} on this rank; raise the monitor's num_probe_samples "
                f"(or the samples its probe_dataloader yields) above {size}"
            )

        def average(compute: Any, like: Any) -> Any:
            return weighted_mean_tensor(compute, 1.0, like, timeout=ctx.timeout)

        try:
            result = batch_sharpness(
                ctx.model,
                ctx.loss_fn,
                ctx.single_batch,
                size,
                params=ctx.params,
                rtol=self.rtol,
                min_batches=self.min_batches,
                max_batches=self.max_batches,
                seed=ctx.seed + _BATCH_SEED,
                average=average if ctx.world_size > 1 else None,
                route="double_backward" if ctx.route != "finite_difference" else ctx.route,
            )
        except ValueError as err:
            raise ProbeFailure(str(err)) from err
        self.threshold = None
        if ctx.optimizers:
            probed = [p for _, p in select_parameters(ctx.model, ctx.params)]
            stability, _ = probed_stability(ctx.optimizers, probed)
            if stability is not None and stability.kind == "raw":  # None while η is 0
                self.threshold = stability.edge
        return result

    def is_finite(self, result: BatchSharpnessResult) -> bool:
        """Whether the estimate is finite."""
        return math.isfinite(result.value)

    def scalars(self, result: BatchSharpnessResult) -> dict[str, float]:
        """The estimate, its standard error and (SGD) the threshold it is compared with."""
        out = {tags.BATCH_SHARPNESS: result.value}
        if math.isfinite(result.stderr):
            out[tags.BATCH_SHARPNESS_STDERR] = result.stderr
        if self.threshold is not None:
            out[tags.STABILITY_THRESHOLD] = self.threshold
        return out

    def charts(self) -> Layout:
        """Batch sharpness with SGD's threshold, and its standard error."""
        return {
            SHARPNESS: {
                "SGD: batch sharpness E[gᵀHg/gᵀg] and the threshold (2+2β)/η": multiline(
                    tags.exact(tags.BATCH_SHARPNESS), tags.exact(tags.STABILITY_THRESHOLD)
                ),
                "batch sharpness standard error": multiline(
                    tags.exact(tags.BATCH_SHARPNESS_STDERR)
                ),
            }
        }

    def rows(self, result: BatchSharpnessResult) -> list[Row]:
        """The estimate with its error and draws."""
        state = "converged" if result.converged else "NOT converged"
        note = f"± {fmt(result.stderr, 3)}, {result.num_batches} batches of {result.batch_size}"
        return [["batch sharpness", fmt(result.value), f"{note}, {state}"]]

    def summary(self, result: BatchSharpnessResult) -> dict[str, Any]:
        """The estimate, its error, draws and cost."""
        out = {k: v for k, v in vars(result).items() if k != "samples"}
        out["stability_threshold"] = self.threshold
        return out
