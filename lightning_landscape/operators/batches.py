"""Probe batches: nested containers of tensors that share a leading sample dimension."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from .._validate import is_int


def batch_size(batch: Any) -> int:
    """Number of samples in a batch: the leading dimension of its first tensor.

    Args:
        batch: a tensor or a (nested) tuple, list or dict containing tensors.

    Returns:
        The size of dimension 0 of the first tensor found.

    Raises:
        ValueError: if the batch contains no tensor with at least one dimension.
    """
    for t in iter_tensors(batch):
        if t.ndim > 0:
            return int(t.shape[0])
    raise ValueError(
        "Cannot infer the number of samples of a batch without tensors; pass `weights=`."
    )


def split_batch(batch: Any, max_size: int, min_size: int = 1) -> list[Any]:
    """Split a batch into consecutive micro-batches of at most ``max_size`` samples.

    Use it to cap the memory of a curvature probe: ``HessianOperator(model, loss_fn,
    split_batch(batch, 32))`` weights the pieces by their number of samples, so its Hessian is
    that of the mean loss over the whole batch (exactly so for a loss that is a per-sample mean
    and a model whose forward pass does not couple samples, e.g. no BatchNorm in train mode),
    while only one micro-batch's activations and gradient graph are alive at a time.

    Every tensor with at least one dimension is sliced along dimension 0 (the pieces are views,
    so the inputs are not copied); tensors may sit in (nested) tuples, lists, dicts and
    namedtuples, which are rebuilt with the same types. Non-tensor leaves and 0-d tensors are
    repeated (the same object) in every piece.

    Args:
        batch: a tensor, or a (nested) tuple/list/dict/namedtuple whose tensors share their
            leading (sample) dimension.
        max_size: the largest number of samples per micro-batch (``>= 1``).
        min_size: the fewest samples of the last micro-batch: a smaller remainder joins the
            micro-batch before it (e.g. ``2`` where train-mode BatchNorm needs two samples).

    Returns:
        The micro-batches, in order: ``ceil(n / max_size)`` pieces of ``max_size`` samples, the
        last one holding the remainder. A batch of at most ``max_size`` samples gives a single
        piece equal to it.

    Raises:
        ValueError: if ``max_size < 1``, the batch holds no tensor with a sample dimension, its
            tensors disagree on the number of samples, or it has no samples.

    Example:
        >>> import torch
        >>> from lightning_landscape.operators import split_batch
        >>> x, y = torch.arange(10.0).reshape(5, 2), torch.arange(5)
        >>> pieces = split_batch({"x": x, "y": y, "tag": "train"}, 2)
        >>> [piece["y"].tolist() for piece in pieces]
        [[0, 1], [2, 3], [4]]
        >>> pieces[2]["x"], pieces[2]["tag"]
        (tensor([[8., 9.]]), 'train')
    """
    if not is_int(max_size) or max_size < 1:
        raise ValueError(
            f"max_size must be an integer >= 1 (the largest number of samples per "
            f"micro-batch), got {max_size!r}; pass e.g. max_size=32."
        )
    sizes = {path: int(t.shape[0]) for path, t in tensor_paths(batch, "batch") if t.ndim > 0}
    if not sizes:
        raise ValueError(
            "Cannot split a batch without a tensor that has a sample (leading) dimension."
        )
    distinct = set(sizes.values())
    if len(distinct) > 1:
        listed = ", ".join(f"{path}: {n}" for path, n in sizes.items())
        raise ValueError(
            "All tensors of a batch must share their leading (sample) dimension to be split "
            f"into micro-batches; got {listed}. Move per-batch constants out of the batch or "
            "make them 0-d tensors or non-tensor values (which are repeated in every piece)."
        )
    n = distinct.pop()
    if n == 0:
        raise ValueError("Cannot split a batch with 0 samples.")
    starts = list(range(0, n, max_size))
    if len(starts) > 1 and n - starts[-1] < min_size:
        starts.pop()  # a too-small remainder joins the piece before it
    ends = [*starts[1:], n]
    return [slice_batch(batch, start, end) for start, end in zip(starts, ends, strict=True)]


def tensor_paths(obj: Any, path: str = "batch") -> Iterator[tuple[str, Tensor]]:
    """``(path, tensor)`` for every tensor in a nested batch, e.g. ``("batch[0]", x)``.

    Args:
        obj: a tensor or a (nested) tuple, list or dict containing tensors.
        path: the name of ``obj`` itself in the paths.

    Yields:
        The tensors in depth-first order, with where they sit.
    """
    if isinstance(obj, Tensor):
        yield path, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from tensor_paths(value, f"{path}[{key!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from tensor_paths(value, f"{path}[{i}]")


def iter_tensors(obj: Any) -> Iterator[Tensor]:
    """Every tensor in a nested batch, depth first.

    Args:
        obj: a tensor or a (nested) tuple, list or dict containing tensors.

    Yields:
        The tensors.
    """
    for _, t in tensor_paths(obj):
        yield t


def map_tensors(obj: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """Apply ``fn`` to every tensor of a nested batch, rebuilding its containers.

    Mapping types (``OrderedDict``, ``defaultdict``'s factory, ...), namedtuples, tuples and
    lists keep their types; non-tensor leaves are kept as they are (the same object).

    Args:
        obj: a tensor or a (nested) tuple, list, dict or namedtuple.
        fn: the function applied to each tensor.

    Returns:
        The batch with every tensor replaced by ``fn(tensor)``.
    """
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        out = copy.copy(obj)  # keeps the mapping type (OrderedDict, defaultdict's factory, ...)
        for key, value in obj.items():
            out[key] = map_tensors(value, fn)
        return out
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(map_tensors(v, fn) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_tensors(v, fn) for v in obj)
    return obj


def join_batches(batches: list[Any]) -> Any | None:
    """The batches as one batch: their tensors concatenated along the sample dimension.

    The inverse of :func:`split_batch`: every batch must have the same containers (tuples,
    lists, dicts, namedtuples), each tensor with a sample dimension the same dtype, device and
    trailing shape in every batch, and every other leaf (0-d tensors, strings, numbers) equal in
    all of them. Anything else (ragged sequence lengths, a container type these functions do not
    look into) cannot be joined.

    Args:
        batches: one or more batches.

    Returns:
        The joined batch (the batch itself when there is one), or ``None`` if they cannot be
        joined.

    Example:
        >>> import torch
        >>> from lightning_landscape.operators import join_batches
        >>> a = (torch.zeros(2, 3), torch.tensor([0, 1]), "train")
        >>> b = (torch.ones(1, 3), torch.tensor([2]), "train")
        >>> x, y, tag = join_batches([a, b])
        >>> x.shape, y.tolist(), tag
        (torch.Size([3, 3]), [0, 1, 2], 'train')
        >>> join_batches([a, (torch.ones(1, 4), torch.tensor([2]), "train")]) is None
        True
    """
    if not batches:
        return None
    if len(batches) == 1:
        return batches[0]
    try:
        return _joined(batches)
    except _Ragged:
        return None


class _Ragged(Exception):
    """Batches that :func:`join_batches` cannot join."""


def _joined(parts: list[Any]) -> Any:
    first = parts[0]
    if isinstance(first, Tensor):
        if not all(isinstance(p, Tensor) for p in parts):
            raise _Ragged
        if first.ndim == 0:
            if all(p.ndim == 0 and bool(torch.equal(p, first)) for p in parts):
                return first
            raise _Ragged
        if any(
            p.ndim == 0 or p.shape[1:] != first.shape[1:] or p.dtype != first.dtype
            or p.device != first.device
            for p in parts
        ):  # fmt: skip
            raise _Ragged
        return torch.cat(parts, dim=0)
    if any(type(p) is not type(first) for p in parts):
        raise _Ragged
    if isinstance(first, dict):
        if any(list(p.keys()) != list(first.keys()) for p in parts):
            raise _Ragged
        out = copy.copy(first)  # the mapping type, as map_tensors keeps it
        for key in first:
            out[key] = _joined([p[key] for p in parts])
        return out
    if isinstance(first, (list, tuple)):
        if any(len(p) != len(first) for p in parts):
            raise _Ragged
        items = [_joined([p[i] for p in parts]) for i in range(len(first))]
        if isinstance(first, tuple) and hasattr(first, "_fields"):  # namedtuple
            return type(first)(*items)
        return type(first)(items)
    try:
        same = all(p is first or bool(p == first) for p in parts)
    except Exception:  # a leaf whose == is not a truth value
        same = False
    if not same:
        raise _Ragged
    return first


def slice_batch(batch: Any, start: int, stop: int) -> Any:
    """Samples ``start:stop`` of every tensor with a sample dimension (views, same containers).

    Args:
        batch: a tensor or a (nested) tuple, list, dict or namedtuple.
        start: the first sample.
        stop: one past the last sample.

    Returns:
        The sliced batch; 0-d tensors and non-tensor leaves are repeated.
    """
    return map_tensors(batch, lambda t: t[start:stop] if t.ndim > 0 else t)


def take_batch(batch: Any, index: Tensor) -> Any:
    """Samples ``index`` (a 1-D long tensor) of every tensor with a sample dimension.

    Args:
        batch: a tensor or a (nested) tuple, list, dict or namedtuple.
        index: the sample indices, in the order wanted.

    Returns:
        The selected samples; 0-d tensors and non-tensor leaves are repeated.
    """
    return map_tensors(batch, lambda t: t.index_select(0, index.to(t.device)) if t.ndim > 0 else t)


def normal_tensors(batch: Any) -> Any:
    """Clone inference-mode tensors so autograd may save them for backward.

    Args:
        batch: a tensor or a (nested) tuple, list, dict or namedtuple.

    Returns:
        The batch, with every inference-mode tensor replaced by a normal clone.
    """
    return map_tensors(batch, lambda t: t.clone() if t.is_inference() else t)
