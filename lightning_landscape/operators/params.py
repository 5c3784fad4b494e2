"""Which parameters a curvature operator acts on, and moving them in place safely."""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn


def select_parameters(
    model: nn.Module, params: Sequence[str] | Sequence[Tensor] | None = None
) -> list[tuple[str, Tensor]]:
    """Resolve the parameter subset a curvature operator acts on.

    Args:
        model: the module.
        params: ``None`` for every parameter with ``requires_grad``; a sequence of names or
            ``fnmatch`` patterns (``"encoder.*"``, ``"*.weight"``); or a sequence of the parameter
            tensors themselves.

    Returns:
        ``(name, parameter)`` pairs in ``model.named_parameters()`` order.

    Raises:
        ValueError: if a name or pattern matches nothing, a tensor is not a parameter of
            ``model``, or the selection is empty.
    """
    named: list[tuple[str, Tensor]] = list(model.named_parameters())
    if params is None:
        chosen = [(n, p) for n, p in named if p.requires_grad]
        if not chosen:
            raise ValueError(
                "The model has no trainable parameters (none with requires_grad=True); "
                "unfreeze some or pass `params=` explicitly."
            )
        return chosen
    wanted: list[str | Tensor] = list(params)
    if not wanted:
        raise ValueError("`params` is empty; pass None for all trainable parameters.")
    if all(isinstance(p, str) for p in wanted):
        keep: set[str] = set()
        for pattern in wanted:
            assert isinstance(pattern, str)
            hits = [n for n, _ in named if n == pattern or fnmatch.fnmatchcase(n, pattern)]
            if not hits:
                sample = ", ".join(n for n, _ in named[:8])
                raise ValueError(
                    f"Parameter name or pattern {pattern!r} matches no parameter of the model. "
                    f"Known names start with: {sample}{', ...' if len(named) > 8 else ''}"
                )
            keep.update(hits)
        return [(n, p) for n, p in named if n in keep]
    if all(isinstance(p, Tensor) for p in wanted):
        ids = {id(p) for p in wanted}
        chosen = [(n, p) for n, p in named if id(p) in ids]
        if len(chosen) != len(ids):
            raise ValueError("Some tensors in `params` are not parameters of the model.")
        return chosen
    raise ValueError("`params` must be all names/patterns (str) or all parameter tensors.")


@contextlib.contextmanager
def differentiable(params: Sequence[Tensor]) -> Iterator[None]:
    """Let autograd differentiate w.r.t. ``params`` that are frozen (``requires_grad`` restored).

    Args:
        params: the probed parameters.
    """
    frozen = [p for p in params if not p.requires_grad]
    for p in frozen:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(False)


@contextlib.contextmanager
def restored_parameters(params: Sequence[Tensor]) -> Iterator[list[Tensor]]:
    """Let a block move ``params`` in place; put their values back bit-for-bit on exit.

    Args:
        params: the parameters that will be modified in place.

    Yields:
        Copies of the original values (to displace from: ``p.copy_(orig).add_(d)``).
    """
    saved = [p.detach().clone() for p in params]
    try:
        yield saved
    finally:
        with torch.no_grad():
            for p, orig in zip(params, saved, strict=True):
                p.copy_(orig)
