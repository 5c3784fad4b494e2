"""Reporting: tag names, the TensorBoard custom-scalars layout and the figures (no Lightning)."""

from . import figures, layout, tags

__all__ = ["figures", "layout", "tags"]
