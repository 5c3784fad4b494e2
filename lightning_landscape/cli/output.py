"""Output of the ``analyze``/``compare`` commands: tables, PNGs, TensorBoard events, JSON."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from torch import Tensor

from ..report.layout import Layout

_ASCII = str.maketrans(
    {
        "λ": "lambda",
        "Δ": "Delta",
        "α": "alpha",
        "₂": "2",
        "±": "+/-",
        "×": "x",
        "²": "^2",
        "−": "-",
        "─": "-",
    }
)


def warn(message: str) -> None:
    """Print a warning of the command line to stderr.

    Args:
        message: what went wrong (without a prefix).
    """
    print(f"lightning-landscape: warning: {message}", file=sys.stderr, flush=True)


def _emit(text: str) -> None:
    """Print to stdout, spelling Greek letters out where the terminal cannot encode them."""
    try:
        print(text, flush=True)
    except UnicodeEncodeError:
        ascii_text = text.translate(_ASCII).encode("ascii", "replace").decode("ascii")
        print(ascii_text, flush=True)


def _align(headers: Sequence[str], align: str | None) -> str:
    """Per-column ``"l"``/``"r"``: default the first column left, the others right."""
    return align if align is not None else "l" + "r" * (len(headers) - 1)


def plain_table(
    title: str, headers: Sequence[str], rows: Sequence[Sequence[str]], align: str | None = None
) -> str:
    """An aligned text table.

    Args:
        title: a line above the table.
        headers: column names.
        rows: cells, one sequence per row.
        align: one ``"l"`` (left) or ``"r"`` (right) per column; default the first column left
            and the others right.

    Returns:
        The table as text.
    """
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=True)]
    sides = _align(headers, align)

    def line(cells: Sequence[str]) -> str:
        parts = [
            str(c).ljust(w) if side == "l" else str(c).rjust(w)
            for c, w, side in zip(cells, widths, sides, strict=True)
        ]
        return "  ".join(parts).rstrip()

    rule = "─" * (sum(widths) + 2 * (len(widths) - 1))
    return "\n".join([title, rule, line(headers), rule, *(line(r) for r in rows), rule])


def print_table(
    title: str, headers: Sequence[str], rows: Sequence[Sequence[str]], align: str | None = None
) -> None:
    """Print a table to stdout with ``rich`` when it is installed, else as plain aligned text.

    Args:
        title: the table's title.
        headers: column names.
        rows: cells, one sequence per row.
        align: one ``"l"`` or ``"r"`` per column (see :func:`plain_table`).
    """
    try:
        from rich.console import Console  # type: ignore[import-not-found,unused-ignore]
        from rich.table import Table  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        _emit(plain_table(title, headers, rows, align))
        return
    table = Table(title=title, title_justify="left")
    for h, side in zip(headers, _align(headers, align), strict=True):
        table.add_column(h, justify="left" if side == "l" else "right")
    for r in rows:
        table.add_row(*(str(c) for c in r))
    Console(soft_wrap=True).print(table)


def jsonable(value: Any) -> Any:
    """Plain JSON data: tensors as lists, tuples as lists, non-finite floats as ``None``.

    Args:
        value: nested dicts/lists of numbers, strings, tensors.

    Returns:
        The same structure with only JSON types (strict JSON, no NaN).
    """
    if isinstance(value, Tensor):
        return jsonable(value.detach().cpu().tolist())
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return str(value)


def write_summary(out: Path, summary: Mapping[str, Any]) -> Path:
    """Write ``summary.json`` (strict JSON, non-finite numbers as ``null``).

    Args:
        out: the output directory.
        summary: the numbers.

    Returns:
        The file written.
    """
    path = out / "summary.json"
    path.write_text(json.dumps(jsonable(summary), indent=2, allow_nan=False) + "\n")
    return path


def render(fig: Figure) -> np.ndarray:
    """Draw a figure once with the Agg backend.

    Args:
        fig: the figure (not attached to pyplot).

    Returns:
        The ``(height, width, 4)`` uint8 RGBA image.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()  # type: ignore[no-untyped-call,unused-ignore]
    buffer = canvas.buffer_rgba()  # type: ignore[no-untyped-call,unused-ignore]
    return np.array(buffer, dtype=np.uint8)


def save_png(image: np.ndarray, path: Path) -> Path:
    """Write an RGBA image as a PNG file.

    Args:
        image: the output of :func:`render`.
        path: the ``.png`` file.

    Returns:
        ``path``.
    """
    from matplotlib.image import imsave

    imsave(path, image, format="png")
    return path


def save_figure(fig: Figure, path: Path) -> Path:
    """Draw a figure and write it as a PNG file.

    Args:
        fig: the figure (not attached to pyplot).
        path: the ``.png`` file.

    Returns:
        ``path``.
    """
    return save_png(render(fig), path)


def write_tensorboard(
    out: Path,
    step: int,
    scalars: Mapping[str, float],
    images: Mapping[str, np.ndarray],
    layout: Layout,
) -> None:
    """Write scalars and figures as TensorBoard events at ``step``, with a custom-scalars layout.

    Args:
        out: the log directory.
        step: the global step.
        scalars: ``{tag: value}``; non-finite values are skipped.
        images: ``{tag: RGBA image}`` of rendered figures (see :func:`render`), logged as
            images as ``SummaryWriter.add_figure`` would.
        layout: the custom-scalars layout of the probes that ran.
    """
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(out))
    try:
        writer.add_custom_scalars(layout)
        for tag, value in scalars.items():
            if math.isfinite(value):
                writer.add_scalar(tag, value, global_step=step)
        for tag, image in images.items():
            writer.add_image(tag, image[..., :3], global_step=step, dataformats="HWC")
    finally:
        writer.close()


class Progress:
    """One progress line per probe on stderr (tqdm when importable), or nothing.

    Args:
        names: the probes, in order.
        enabled: ``False`` for ``--no-progress``.
    """

    def __init__(self, names: Sequence[str], enabled: bool) -> None:
        self.enabled = enabled
        self.bar: Any = None
        if not enabled:
            return
        try:
            from tqdm import tqdm  # type: ignore[import-untyped,unused-ignore]
        except ImportError:
            return
        self.bar = tqdm(total=len(names), unit="probe", file=sys.stderr, leave=True)

    def start(self, name: str) -> None:
        """Announce a probe.

        Args:
            name: the probe's name.
        """
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_description_str(name)
        else:
            print(f"{name} ...", file=sys.stderr, flush=True)

    def done(self) -> None:
        """Mark the current probe finished."""
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        """Close the bar."""
        if self.bar is not None:
            self.bar.set_description_str("done")
            self.bar.close()
