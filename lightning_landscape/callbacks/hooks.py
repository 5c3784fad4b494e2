"""What hooks receive after each probe round (:class:`ProbeReport`) and the hook protocol."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import lightning.pytorch as pl

from ..probes import SharpnessResult
from ..solvers import DensityResult, TraceResult


@dataclass(frozen=True)
class ProbeReport:
    """What one round of :class:`~lightning_landscape.LandscapeMonitor` probes measured.

    Attributes:
        step: trainer global step at the probe.
        epoch: trainer epoch at the probe.
        eigenvalues: the top-k Hessian eigenvalues, descending (λ_max first).
        lambda_min: the algebraically smallest eigenvalue, or ``None`` if not computed.
        trace: Hutch++ trace estimate, or ``None``.
        trace_stderr: its standard error, or ``None``.
        stability_threshold: the optimizer's stability threshold: ``(2 + 2β)/η`` on λ_max for
            SGD with heavy-ball momentum ``β`` (``2/η`` without); ``(2 + 2β₁)/((1 − β₁)η)`` on
            the preconditioned λ₁(P⁻¹H) for Adam/AdamW; ``None`` for other optimizers, for
            Adam before its first step, and while η is 0 (no edge).
        stability_ratio: sharpness over ``stability_threshold`` (``> 1``: past the edge); 0
            while η is 0.
        probe_loss: the loss on the probe data at the probe (eval mode).
        converged: whether every eigenvalue met the residual tolerance.
        max_residual: largest relative Ritz residual among the reported eigenvalues.
        num_hvps: Hessian-vector products of the round's probes on the shared Hessian operator
            (sharpness, trace, density).
        seconds: their wall-clock time.
        negative_mass: fraction of the spectrum below zero from the probe's spectral density
            (stochastic Lanczos quadrature), or ``None`` when no density was computed.
        negative_mass_bounds: ``(lower, upper)`` that the quadrature guarantees for it
            (:meth:`~lightning_landscape.solvers.DensityResult.negative_mass_bounds`): act on
            ``negative_mass`` only when they are close. ``None`` without a density.
        preconditioned_lambda_max: λ₁(P⁻¹H) for an Adam-family or RMSprop optimizer, else
            ``None``.
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
    negative_mass: float | None = None
    preconditioned_lambda_max: float | None = None
    negative_mass_bounds: tuple[float, float] | None = None

    @property
    def lambda_max(self) -> float:
        """The largest Hessian eigenvalue (sharpness)."""
        return self.eigenvalues[0]

    @classmethod
    def from_results(
        cls, step: int, epoch: int, results: Mapping[str, Any], cost: tuple[float, int]
    ) -> ProbeReport | None:
        """The report of one round (``None`` without a ``Sharpness`` result in it).

        Args:
            step: the global step.
            epoch: the epoch.
            results: the round's results by probe name (``"sharpness"``, ``"trace"``,
                ``"density"`` are read).
            cost: seconds and Hessian-vector products of the round's shared-operator probes.

        Returns:
            The report.
        """
        sharp = results.get("sharpness")
        if not isinstance(sharp, SharpnessResult):
            return None
        trace = results.get("trace")
        density = results.get("density")
        trace = trace if isinstance(trace, TraceResult) else None
        return cls(
            step=step,
            epoch=epoch,
            eigenvalues=sharp.eigenvalues,
            lambda_min=sharp.lambda_min,
            trace=None if trace is None else trace.trace,
            trace_stderr=None if trace is None else trace.stderr,
            stability_threshold=sharp.stability_threshold,
            stability_ratio=sharp.stability_ratio,
            probe_loss=sharp.probe_loss,
            converged=sharp.converged,
            max_residual=sharp.max_residual,
            num_hvps=cost[1],
            seconds=cost[0],
            negative_mass=density.negative_mass() if isinstance(density, DensityResult) else None,
            preconditioned_lambda_max=sharp.preconditioned_lambda_max,
            negative_mass_bounds=(
                density.negative_mass_bounds() if isinstance(density, DensityResult) else None
            ),
        )


@runtime_checkable
class LandscapeHook(Protocol):
    """Anything registered with ``LandscapeMonitor(hooks=[...])`` that acts on probe reports.

    The monitor calls ``on_landscape`` on every rank after each successful probe, in the order
    the hooks were given, with the same report on every rank (under DDP the probe measures the
    global Hessian), so hooks that change the optimizer take the same action everywhere. A hook
    may also define ``state_dict() -> dict`` and ``load_state_dict(dict)``: the monitor saves
    them in its checkpoint state, so a resumed run takes the same actions; and
    ``check(trainer, pl_module)``, called when training starts (before the first optimizer step),
    to refuse a run it cannot serve by raising. A hook that raises during training is skipped
    with a warning (``landscape/probe_failed`` is logged); training goes on. A plain callable
    ``fn(trainer, pl_module, report)`` is accepted too.
    """

    def on_landscape(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, report: ProbeReport
    ) -> None:
        """React to one probe's report (e.g. rescale the learning rate)."""


def call_hook(
    hook: Any, trainer: pl.Trainer, pl_module: pl.LightningModule, report: ProbeReport
) -> None:
    """Call ``hook.on_landscape`` or, for a plain callable, ``hook(trainer, pl_module, report)``."""
    method = getattr(hook, "on_landscape", None)
    if callable(method):
        method(trainer, pl_module, report)
    else:
        hook(trainer, pl_module, report)


def check_hook(hook: Any, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """Call the hook's optional ``check(trainer, pl_module)`` (it raises to refuse the run)."""
    method = getattr(hook, "check", None)
    if callable(method):
        method(trainer, pl_module)


def check_hooks(hooks: Any) -> list[Any]:
    """Validate ``hooks=``: a list of objects with ``on_landscape`` or plain callables.

    Raises:
        ValueError: naming the offending entry.
    """
    if hooks is None:
        return []
    if not isinstance(hooks, (list, tuple)):
        raise ValueError(f"hooks must be a list of hooks, got {type(hooks).__name__}")
    for i, hook in enumerate(hooks):
        if not (callable(getattr(hook, "on_landscape", None)) or callable(hook)):
            raise ValueError(
                f"hooks[{i}] ({type(hook).__name__}) has no on_landscape(trainer, pl_module, "
                "report) method and is not callable"
            )
    return list(hooks)


def hook_states(hooks: list[Any]) -> list[dict[str, Any] | None]:
    """Each hook's ``state_dict()`` (``None`` for hooks without state)."""
    return [h.state_dict() if callable(getattr(h, "state_dict", None)) else None for h in hooks]


def load_hook_states(hooks: list[Any], states: list[dict[str, Any] | None]) -> None:
    """Give each stateful hook its saved state back (matched by position).

    Raises:
        ValueError: if the checkpoint holds state for a different number of hooks.
    """
    if len(states) != len(hooks):
        raise ValueError(
            f"The checkpoint holds state for {len(states)} monitor hooks but the monitor has "
            f"{len(hooks)}: resume with the same hooks, in the same order."
        )
    for hook, state in zip(hooks, states, strict=True):
        if state is not None and callable(getattr(hook, "load_state_dict", None)):
            hook.load_state_dict(state)
