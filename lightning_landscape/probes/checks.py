"""A round's Hessian-vector products checked for symmetry before anything is measured on them.

See :func:`~lightning_landscape.solvers.symmetry_defect` for why: an operation whose backward pass
autograd cannot differentiate (a fused kernel) makes double-backward products silently wrong, and
not symmetric. :func:`check_products` measures that once on a round's shared operator and, where
allowed, moves the round (and, through the monitor, the run) to finite differences of the
gradient, which need first-order gradients only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..operators import HVPRoute
from ..solvers import SymmetryResult, symmetry_defect
from .base import ProbeContext


@dataclass(frozen=True)
class ProductCheck:
    """The outcome of :func:`check_products`.

    Attributes:
        route: the exact route whose products were checked (``"double_backward"``,
            ``"functorch"`` or ``"compiled"``).
        exact: the symmetry check of those products.
        finite_difference: the same check of finite-difference products, measured only when the
            exact products failed and switching was allowed (``None`` otherwise).
        switched: whether the operator now uses ``"finite_difference"``.
    """

    route: HVPRoute
    exact: SymmetryResult
    finite_difference: SymmetryResult | None
    switched: bool

    @property
    def inconclusive(self) -> bool:
        """Whether the exact products were not finite (the probes report that themselves)."""
        return math.isnan(self.exact.defect)

    @property
    def passed(self) -> bool:
        """Whether the exact products are symmetric (``True`` also when :attr:`inconclusive`)."""
        return self.exact.symmetric or self.inconclusive

    def summary(self) -> dict[str, Any]:
        """The check as plain numbers (for ``summary.json``)."""
        fd = self.finite_difference
        return {
            "route": self.route,
            "defect": self.exact.defect,
            "tolerance": self.exact.tolerance,
            "num_hvps": self.exact.num_hvps + (0 if fd is None else fd.num_hvps),
            "finite_difference_defect": None if fd is None else fd.defect,
            "switched": self.switched,
        }

    def message(self, opt_out: str | None = None) -> str | None:
        """What to tell the user (``None`` when the check passed).

        Args:
            opt_out: how this caller's user keeps the exact route anyway (e.g. a keyword), if
                they can.

        Returns:
            The warning text, or ``None``.
        """
        if self.passed:
            return None
        head = (
            f"Hessian-vector products by {self.route} are not symmetric (defect "
            f"{self.exact.defect:.2g}, tolerance {self.exact.tolerance:.2g}): an operation's "
            "backward pass is not differentiable by autograd (a fused kernel: a custom "
            "torch.autograd.Function whose backward calls its own kernel or runs under no_grad, "
            "or one marked @once_differentiable), so double backward silently drops the "
            "second-order terms through it."
        )
        fd = self.finite_difference
        if self.switched and fd is not None:
            return (
                f"{head} Finite differences of the gradient are symmetric (defect "
                f"{fd.defect:.2g}): probing with route='finite_difference' from now on (4 or "
                "more gradients per product). For exact products use the operation's "
                "differentiable reference implementation while probing"
                + (f"; {opt_out} to keep {self.route}." if opt_out else ".")
            )
        if fd is not None and math.isnan(fd.defect):
            return (
                f"{head} Finite differences of the gradient were not finite either; kept "
                f"{self.route}: the curvature measured on this model is not reliable."
            )
        if fd is not None:
            return (
                f"{head} Finite differences of the gradient are not symmetric either (defect "
                f"{fd.defect:.2g}): the gradient itself is not that of a function (a custom "
                "backward that is not the derivative of its forward?). Kept "
                f"{self.route}; the curvature measured on this model is not reliable."
            )
        return (
            f"{head} The curvature measured with this route is not reliable: use "
            "route='finite_difference' (or route='auto', which switches by itself), or the "
            "operation's differentiable reference implementation while probing."
        )


def check_products(
    ctx: ProbeContext, *, switch: bool, num_vectors: int = 4, seed: int = 0
) -> ProductCheck | None:
    """Check the symmetry of the round's products; on failure maybe switch to finite differences.

    Costs ``num_vectors`` products of the round's route (and as many finite-difference products
    when those fail and ``switch`` is set). Under data parallelism the products are the global
    ones, so every rank measures the same numbers and takes the same decision.

    Args:
        ctx: the round's context (the operator is built if it was not).
        switch: when the exact products are not symmetric, measure finite differences on the
            same vectors and, if those are symmetric, keep them for the rest of the round
            (:meth:`ProbeContext.use_route`: ``ctx.route`` and ``ctx.resolved_route`` then say
            ``"finite_difference"``); otherwise the routes are left as they were.
        num_vectors: random vectors of the check (see
            :func:`~lightning_landscape.solvers.symmetry_defect`).
        seed: seed of the check's private generator.

    Returns:
        A :class:`ProductCheck`, or ``None`` when there is nothing to check: the products are
        already finite differences (sharded parameters, or that route chosen).

    Raises:
        ProbeFailure: as :meth:`ProbeContext.operator`; any error of a product.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from lightning_landscape.probes import ProbeContext
        >>> from lightning_landscape.probes.checks import check_products
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
        >>> loss_fn = lambda m, b: m(b).pow(2).mean()
        >>> check = check_products(ProbeContext(model, loss_fn, [torch.randn(8, 3)]), switch=True)
        >>> check.passed, check.switched
        (True, False)
    """
    op = ctx.operator()
    route = ctx.resolved_route
    if route is None or route == "finite_difference" or ctx.sharded:
        return None
    exact = symmetry_defect(op, num_vectors, seed=seed)
    route = ctx.resolved_route or route  # "auto" settles on its first product
    check = ProductCheck(route, exact, None, switched=False)
    if check.passed or not switch:
        return check
    configured = ctx.route

    def restore() -> None:
        ctx.use_route(route)
        ctx.route = configured  # what the round's own operators (α, Δ₂) were given

    ctx.use_route("finite_difference")
    try:
        fd = symmetry_defect(op, num_vectors, seed=seed)
    except BaseException:
        restore()
        raise
    if not fd.symmetric:
        restore()
    return ProductCheck(route, exact, fd, switched=fd.symmetric)
