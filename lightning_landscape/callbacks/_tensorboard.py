"""The TensorBoard custom-scalars layout of the ``landscape/`` charts (callback layer only)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger

Layout = dict[str, dict[str, list[Any]]]


def landscape_layout(*, control: bool = True, alpha: bool = True, delta2: bool = True) -> Layout:
    """The grouped charts of TensorBoard's *Custom Scalars* tab.

    Each chart is a ``Multiline`` of scalar tags (regular expressions), so lines that belong
    together share axes: λ_max with the optimizer's stability threshold, the whole top-k
    spectrum, α by layer type, Δ₂^(D) with its four terms, and the probes' cost.

    Args:
        control: include the chart of the hooks' actions (LR scale, SAM ρ).
        alpha: include the α category.
        delta2: include the Δ₂^(D) category.

    Returns:
        ``{category: {chart: ["Multiline", [tag regexes]]}}`` as
        :meth:`torch.utils.tensorboard.SummaryWriter.add_custom_scalars` takes it.

    Example:
        >>> sorted(landscape_layout())  # doctest: +NORMALIZE_WHITESPACE
        ['landscape: cost', 'landscape: sharpness', 'landscape: spectrum',
         'landscape: stabilization Δ₂^(D)', 'landscape: α (curvature exponent)']
    """
    layout: Layout = {
        "landscape: sharpness": {
            "λ_max and stability threshold (2+2β)/η": [
                "Multiline",
                [r"landscape/lambda_max$", r"landscape/stability_threshold$"],
            ],
            "stability ratio η·λ_max/(2+2β)  (1 = edge of stability)": [
                "Multiline",
                [r"landscape/stability_ratio$", r"landscape/control/stability_ratio_effective$"],
            ],
            "curvature control (LR scale, SAM ρ)": [
                "Multiline",
                [r"landscape/control/lr_scale$", r"landscape/control/rho$"],
            ],
        },
        "landscape: spectrum": {
            "top-k eigenvalues": ["Multiline", [r"landscape/eigenvalues/\d+$"]],
            "λ_min (negative: saddle directions)": ["Multiline", [r"landscape/lambda_min$"]],
            "negative eigenvalue mass": ["Multiline", [r"landscape/negative_mass$"]],
            "trace (Hutch++)": ["Multiline", [r"landscape/trace$"]],
            "probe loss": ["Multiline", [r"landscape/probe_loss$"]],
        },
        "landscape: α (curvature exponent)": {
            "α by layer type": ["Multiline", [r"landscape/alpha_group/.*"]],
            "α by layer": ["Multiline", [r"landscape/alpha/.*"]],
            "fit R² by layer": ["Multiline", [r"landscape/alpha_r2/.*"]],
        },
        "landscape: stabilization Δ₂^(D)": {
            "Δ₂^(D)": ["Multiline", [r"landscape/delta2_D$"]],
            "Gaussian-moment terms": ["Multiline", [r"landscape/delta2/term_.*"]],
            "k-sweep slope (theory −2)": [
                "Multiline",
                [r"landscape/delta2/slope$", r"landscape/delta2/slope_stderr$"],
            ],
        },
        "landscape: cost": {
            "overhead (fraction of training time)": ["Multiline", [r"landscape/cost/overhead$"]],
            "seconds per measurement": [
                "Multiline",
                [r"landscape/cost/seconds$", r"landscape/.*_cost/seconds$"],
            ],
            "Hessian-vector products per measurement": [
                "Multiline",
                [r"landscape/cost/hvps$", r"landscape/.*_cost/hvps$"],
            ],
        },
    }
    if not control:
        del layout["landscape: sharpness"]["curvature control (LR scale, SAM ρ)"]
    if not alpha:
        del layout["landscape: α (curvature exponent)"]
    if not delta2:
        del layout["landscape: stabilization Δ₂^(D)"]
    return layout


def register_layout(trainer: pl.Trainer, layout: Layout | None = None) -> int:
    """Write a layout once to every TensorBoard logger of the run (rank zero).

    A ``SummaryWriter`` accepts one layout per writer, so a logger that already received one
    (e.g. from a second monitor or a resumed ``fit`` in the same process) is skipped.

    Args:
        trainer: the trainer whose loggers receive the layout.
        layout: the layout (default: :func:`landscape_layout` with every chart).

    Returns:
        The number of loggers the layout was written to.
    """
    if not trainer.is_global_zero:
        return 0
    count = 0
    for logger in trainer.loggers:
        if not isinstance(logger, TensorBoardLogger):
            continue
        writer = logger.experiment
        if getattr(writer, "_landscape_layout", False):
            continue
        writer.add_custom_scalars(landscape_layout() if layout is None else layout)
        writer._landscape_layout = True
        count += 1
    return count
