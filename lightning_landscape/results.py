"""Frozen result types returned by the solvers and the functional API.

Every result carries its own quality evidence (residuals, convergence flags, standard errors) and
its cost (Hessian-vector products and wall-clock seconds), so a caller never has to guess whether a
number can be trusted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

Which = Literal["largest", "smallest"]


@dataclass(frozen=True)
class EigenResult:
    """Extreme eigenpairs of a symmetric operator (e.g. a Hessian).

    Attributes:
        eigenvalues: 1-D tensor (float64, CPU). For ``which="largest"`` the k algebraically largest
            eigenvalues in descending order; for ``which="smallest"`` the k algebraically smallest
            (most negative) in ascending order.
        eigenvectors: ``(n, k)`` tensor of orthonormal Ritz vectors on the operator's device and
            dtype, column ``i`` belonging to ``eigenvalues[i]``; ``None`` when not requested.
        residuals: 1-D tensor (float64, CPU) of relative Ritz residuals
            ``‖A v_i − λ_i v_i‖ / max(|λ_i|, ε‖A‖)``, where ``‖A‖`` is estimated by the largest
            Ritz value magnitude seen and ``ε = 1e-6``. The eigenvalue error is bounded by
            roughly ``residual² · |λ| / gap``.
        converged: 1-D bool tensor, ``residuals[i] <= tol``.
        which: ``"largest"`` or ``"smallest"``.
        tol: the relative residual tolerance that was asked for.
        num_hvps: operator applications (Hessian-vector products) spent.
        num_restarts: thick restarts of the Krylov basis.
        seconds: wall-clock time of the solve.
    """

    eigenvalues: Tensor
    eigenvectors: Tensor | None
    residuals: Tensor
    converged: Tensor
    which: Which
    tol: float
    num_hvps: int
    num_restarts: int
    seconds: float

    @property
    def all_converged(self) -> bool:
        """Whether every requested eigenpair met the residual tolerance."""
        return bool(self.converged.all())

    @property
    def is_finite(self) -> bool:
        """Whether all eigenvalues and residuals are finite numbers."""
        return bool(torch.isfinite(self.eigenvalues).all() and torch.isfinite(self.residuals).all())


@dataclass(frozen=True)
class TraceResult:
    """A stochastic trace estimate.

    Attributes:
        trace: the estimate of ``tr(A)``.
        stderr: standard error of the estimate (0 when it is exact, e.g. when the sketch spans the
            whole space).
        num_hvps: operator applications spent.
        num_samples: random probe vectors used by the Hutchinson part of the estimator.
        method: ``"hutch++"``.
        seconds: wall-clock time.
    """

    trace: float
    stderr: float
    num_hvps: int
    num_samples: int
    method: str
    seconds: float


@dataclass(frozen=True)
class ProbeReport:
    """What one :class:`~lightning_landscape.LandscapeMonitor` probe measured.

    Attributes:
        step: trainer global step at the probe.
        epoch: trainer epoch at the probe.
        eigenvalues: the top-k Hessian eigenvalues, descending (λ_max first).
        lambda_min: the algebraically smallest eigenvalue, or ``None`` if not computed.
        trace: Hutch++ trace estimate, or ``None``.
        trace_stderr: its standard error, or ``None``.
        stability_threshold: the optimizer's stability threshold ``(2 + 2β)/η`` for SGD with
            heavy-ball momentum ``β`` (``2/η`` without), or ``None`` for optimizers where the raw
            Hessian does not set stability (Adam and other adaptive methods).
        stability_ratio: ``λ_max / stability_threshold`` (``> 1``: past the edge of stability).
        probe_loss: the loss on the probe data at the probe (eval mode).
        converged: whether every eigenvalue met the residual tolerance.
        max_residual: largest relative Ritz residual among the reported eigenvalues.
        num_hvps: Hessian-vector products spent by the whole probe.
        seconds: wall-clock time of the whole probe.
    """

    step: int
    epoch: int
    eigenvalues: tuple[float, ...]
    lambda_min: float | None
    trace: float | None
    trace_stderr: float | None
    stability_threshold: float | None
    stability_ratio: float | None
    probe_loss: float
    converged: bool
    max_residual: float
    num_hvps: int
    seconds: float

    @property
    def lambda_max(self) -> float:
        """The largest Hessian eigenvalue (sharpness)."""
        return self.eigenvalues[0]
