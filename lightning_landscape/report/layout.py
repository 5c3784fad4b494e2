"""TensorBoard's *Custom Scalars* layout of the ``landscape/`` charts, composed from the probes.

Every probe contributes its own charts (``Probe.charts()``) to a category; :func:`compose_layout`
merges them with the monitor's own (cost, and the hooks' actions) in a fixed category order, so
TensorBoard shows exactly the charts of what is measured.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from . import tags

Layout = dict[str, dict[str, list[Any]]]
"""``{category: {chart title: ["Multiline", [tag regexes]] or ["Margin", [3 tags]]}}``, as
:meth:`torch.utils.tensorboard.SummaryWriter.add_custom_scalars` takes it."""

SHARPNESS = "landscape: sharpness"
SPECTRUM = "landscape: spectrum"
ALPHA = "landscape: α (curvature exponent)"
DELTA2 = "landscape: stabilization Δ₂^(D)"
COST = "landscape: cost"
CATEGORIES = (SHARPNESS, SPECTRUM, ALPHA, DELTA2, COST)


def multiline(*patterns: str) -> list[Any]:
    """One chart with a line per tag matching one of ``patterns`` (regular expressions)."""
    return ["Multiline", list(patterns)]


def margin(value: str, lower: str, upper: str) -> list[Any]:
    """One chart of ``value`` in a band from ``lower`` to ``upper`` (exact tags, not patterns)."""
    return ["Margin", [value, lower, upper]]


def cost_charts() -> Layout:
    """The cost category: overhead, and seconds and products per cost group.

    Returns:
        A layout fragment.
    """
    seconds, hvps = tags.cost_seconds(".*_cost"), tags.cost_hvps(".*_cost")
    return {
        COST: {
            "overhead (fraction of training time)": multiline(tags.exact(tags.OVERHEAD)),
            "seconds per measurement": multiline(
                tags.exact(tags.cost_seconds(tags.COST)), seconds + "$"
            ),
            "Hessian-vector products per measurement": multiline(
                tags.exact(tags.cost_hvps(tags.COST)), hvps + "$"
            ),
        }
    }


def control_charts() -> Layout:
    """The chart of the hooks' actions (learning-rate scale, SAM's ρ).

    Returns:
        A layout fragment.
    """
    return {
        SHARPNESS: {
            "curvature control (LR scale, SAM ρ)": multiline(
                tags.exact(tags.CONTROL_LR_SCALE), tags.exact(tags.CONTROL_RHO)
            )
        }
    }


def compose_layout(fragments: Iterable[Layout]) -> Layout:
    """Merge layout fragments: categories in :data:`CATEGORIES` order, charts in given order.

    A chart title given twice keeps its first definition.

    Args:
        fragments: the probes' charts, the cost and control charts.

    Returns:
        The layout; categories without charts are left out.

    Example:
        >>> sorted(compose_layout([cost_charts(), control_charts()]))
        ['landscape: cost', 'landscape: sharpness']
    """
    merged: dict[str, dict[str, list[Any]]] = {}
    for fragment in fragments:
        for category, charts in fragment.items():
            target = merged.setdefault(category, {})
            for title, chart in charts.items():
                target.setdefault(title, chart)
    order = {c: i for i, c in enumerate(CATEGORIES)}
    return {
        c: merged[c] for c in sorted(merged, key=lambda c: order.get(c, len(order))) if merged[c]
    }
