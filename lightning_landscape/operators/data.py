"""Parameter selection, probe batches and loss validation for curvature operators."""

from __future__ import annotations

import contextlib
import copy
import fnmatch
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

LossFn = Callable[[nn.Module, Any], Tensor]
"""``loss_fn(model, batch) -> scalar Tensor``: the loss whose Hessian is probed."""


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


class _LossModule(nn.Module):
    """Wraps ``loss_fn(model, batch)`` so ``torch.func.functional_call`` can reparametrise it."""

    def __init__(self, inner: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.inner = inner
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> Tensor:
        return self.loss_fn(self.inner, batch)


def batch_size(batch: Any) -> int:
    """Number of samples in a batch: the leading dimension of its first tensor.

    Args:
        batch: a tensor or a (nested) tuple, list or dict containing tensors.

    Returns:
        The size of dimension 0 of the first tensor found.

    Raises:
        ValueError: if the batch contains no tensor with at least one dimension.
    """
    for t in _iter_tensors(batch):
        if t.ndim > 0:
            return int(t.shape[0])
    raise ValueError(
        "Cannot infer the number of samples of a batch without tensors; pass `weights=`."
    )


def split_batch(batch: Any, max_size: int) -> list[Any]:
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
    if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 1:
        raise ValueError(
            f"max_size must be an integer >= 1 (the largest number of samples per "
            f"micro-batch), got {max_size!r}; pass e.g. max_size=32."
        )
    sizes = {path: int(t.shape[0]) for path, t in _tensor_paths(batch, "batch") if t.ndim > 0}
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
    return [_slice_batch(batch, start, min(start + max_size, n)) for start in range(0, n, max_size)]


def _tensor_paths(obj: Any, path: str) -> Iterator[tuple[str, Tensor]]:
    """``(path, tensor)`` for every tensor in a nested batch, e.g. ``("batch[0]", x)``."""
    if isinstance(obj, Tensor):
        yield path, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from _tensor_paths(value, f"{path}[{key!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from _tensor_paths(value, f"{path}[{i}]")


def _slice_batch(obj: Any, start: int, stop: int) -> Any:
    """Samples ``start:stop`` of every tensor with a sample dimension, same container types."""
    if isinstance(obj, Tensor):
        return obj[start:stop] if obj.ndim > 0 else obj
    if isinstance(obj, dict):
        out = copy.copy(obj)  # keeps the mapping type (OrderedDict, defaultdict's factory, ...)
        for key, value in obj.items():
            out[key] = _slice_batch(value, start, stop)
        return out
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(_slice_batch(v, start, stop) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_slice_batch(v, start, stop) for v in obj)
    return obj


def _take_batch(obj: Any, index: Tensor) -> Any:
    """Samples ``index`` (a 1-D long tensor) of every tensor with a sample dimension."""
    if isinstance(obj, Tensor):
        return obj.index_select(0, index.to(obj.device)) if obj.ndim > 0 else obj
    if isinstance(obj, dict):
        out = copy.copy(obj)
        for key, value in obj.items():
            out[key] = _take_batch(value, index)
        return out
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(_take_batch(v, index) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_take_batch(v, index) for v in obj)
    return obj


def _iter_tensors(obj: Any) -> Iterator[Tensor]:
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _iter_tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _iter_tensors(value)


def _normal_tensors(obj: Any) -> Any:
    """Clone inference-mode tensors so autograd may save them for backward."""
    if isinstance(obj, Tensor):
        return obj.clone() if obj.is_inference() else obj
    if isinstance(obj, dict):
        return type(obj)((k, _normal_tensors(v)) for k, v in obj.items())
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(_normal_tensors(v) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_normal_tensors(v) for v in obj)
    return obj


def check_scalar_loss(loss: Any) -> Tensor:
    """Validate that ``loss_fn`` produced a scalar tensor.

    Args:
        loss: what the loss function returned.

    Returns:
        The loss tensor.

    Raises:
        TypeError: if it is not a tensor.
        ValueError: if it is not a scalar with a floating dtype.
    """
    if not isinstance(loss, Tensor):
        raise TypeError(
            f"loss_fn must return a scalar torch.Tensor, got {type(loss).__name__}. "
            "Return the mean loss of the batch, e.g. `F.cross_entropy(model(x), y)`."
        )
    if loss.numel() != 1:
        raise ValueError(
            f"loss_fn must return a scalar loss, got a tensor of shape {tuple(loss.shape)}. "
            "Reduce it (e.g. `.mean()`) so the Hessian is that of the mean loss."
        )
    if not loss.is_floating_point():
        raise ValueError(f"loss_fn returned a {loss.dtype} tensor; a floating loss is required.")
    return loss.reshape(())


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
