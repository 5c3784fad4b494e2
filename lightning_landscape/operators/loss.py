"""The loss a curvature operator differentiates: its signature and its validation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

LossFn = Callable[[nn.Module, Any], Tensor]
"""``loss_fn(model, batch) -> scalar Tensor``: the loss whose Hessian is probed."""


class LossModule(nn.Module):
    """Wrap ``loss_fn(model, batch)`` so ``torch.func.functional_call`` can reparametrise it."""

    def __init__(self, inner: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.inner = inner
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> Tensor:
        """The loss of the wrapped model on ``batch``."""
        return self.loss_fn(self.inner, batch)


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
