r"""Curvature-driven control: hooks for :class:`LandscapeMonitor` that act on its probe reports.

* :class:`StabilityLRGuard` scales the learning rate so that the stability ratio (SGD:
  ``η · λ_max / (2 + 2β)``; Adam, AdamW, RMSprop: the preconditioned ``λ₁(P⁻¹H)`` over its
  threshold) stays below a fraction of the edge of stability.
* :class:`SharpnessAdaptiveRho` sets the neighbourhood radius ρ of SAM from the measured
  sharpness.

Both are passed as ``LandscapeMonitor(hooks=[...])``; the monitor calls them on every rank after
each successful probe with the same report, and saves their ``state_dict`` in its checkpoint
state, so a resumed run takes the same actions.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from .._validate import choice, integer, real
from ..optim.sam import SAM
from ..optim.thresholds import stability_threshold
from ..report import tags
from .hooks import ProbeReport

SchedulerKind = Literal["chainable", "closed_form"]
_ADAPTIVE = (torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop)
_SCHEDULER_KINDS: tuple[SchedulerKind, ...] = ("chainable", "closed_form")


def _index(name: str, value: Any) -> int:
    return integer(name, value, minimum=0)


def _optimizer(trainer: pl.Trainer, index: int, who: str) -> torch.optim.Optimizer:
    optimizers = trainer.optimizers
    if index >= len(optimizers):
        raise ValueError(
            f"{who}: optimizer_index={index} but the trainer has {len(optimizers)} optimizer(s)."
        )
    return optimizers[index]


def _log(trainer: pl.Trainer, metrics: dict[str, float], step: int) -> None:
    if trainer.is_global_zero:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)


def _check_rho_groups(optimizer: torch.optim.Optimizer) -> None:
    missing = [i for i, group in enumerate(optimizer.param_groups) if "rho" not in group]
    if missing:
        raise TypeError(
            f"SharpnessAdaptiveRho drives SAM's neighbourhood radius, but "
            f"{type(optimizer).__name__} has no 'rho' in param_groups{missing}: use a SAM "
            "optimizer (e.g. lightning_landscape.optim.SAM) that keeps ρ per param group."
        )


def _set_hyper(group: dict[str, Any], key: str, value: float) -> None:
    """Write a hyper-parameter, in place when it is a tensor (e.g. ``capturable`` optimizers)."""
    current = group[key]
    if isinstance(current, Tensor):
        current.fill_(value)
    else:
        group[key] = value


class StabilityLRGuard:
    r"""Keep the optimizer below its edge of stability by scaling the learning rate.

    Gradient descent with heavy-ball momentum β on a quadratic is stable iff
    ``η · λ_max < 2 + 2β``; Adam is stable iff ``λ₁(P⁻¹H) < (2 + 2β₁)/((1 − β₁)η)``
    (RMSprop: ``(2 + 2β)/η``). Either way the *stability ratio* ``r`` (``η · λ_max / (2 + 2β)``
    for SGD, ``η(1 − β₁) λ₁(P⁻¹H) / (2 + 2β₁)`` for Adam, as the monitor's ``Sharpness`` probe
    logs it) is proportional to the learning rate, and the guard keeps it at or below ``target``
    by multiplying the learning rate of the selected param groups by a scale
    ``s ∈ [min_scale, 1]``. At each report, with ``η_u`` the unscaled learning rate (what it would
    be without the guard) and ``r_u`` the ratio at ``η_u`` (the largest over the selected
    groups):

    * if ``s · r_u > target`` (too sharp): ``s ← max(min_scale, target / r_u)``, i.e. the
      learning rate is cut to exactly ``target`` of the threshold at once;
    * otherwise (curvature allows): ``s ← max(min_scale, min(1, s · recovery, target / r_u))``,
      i.e. the scale recovers geometrically, never past 1 nor past the ratio ``target``.

    Each selected group's ``lr`` is then set to ``η_u · s``. The decision is made only at
    reports (the monitor's cadence); between them the learning rate is left alone, so probe often
    enough (``every_n_steps`` of a few steps) where sharpness can change fast. Every decision is
    logged through ``trainer.loggers`` on global rank zero at ``report.step`` as
    ``landscape/control/lr_scale`` and ``landscape/control/stability_ratio_effective``
    (``s · r_u``). The monitor's own ``landscape/stability_ratio`` is measured with the learning
    rate in the optimizer at the probe, i.e. before the guard's action.

    Learning-rate schedulers: the guard writes ``group["lr"]`` itself, so how it composes with a
    scheduler depends on how the scheduler computes the next rate (``scheduler=``):

    * ``"chainable"`` (default): the scheduler multiplies the current rate (``StepLR``,
      ``MultiStepLR``, ``ExponentialLR``, ``MultiplicativeLR``, ``LinearLR``, ``ConstantLR``,
      ``PolynomialLR``, ``ReduceLROnPlateau``; ``CosineAnnealingLR`` with ``eta_min=0``). The
      scale then persists through scheduler steps and the unscaled rate is
      ``η_u = group["lr"] / s``: the effective rate is always ``schedule × s``.
    * ``"closed_form"``: the scheduler overwrites the rate from its base rates (``LambdaLR``,
      ``OneCycleLR``, ``CyclicLR``, ``CosineAnnealingWarmRestarts``). Each scheduler step then
      drops the scale until the next report; at a report, a rate that differs from the one the
      guard last wrote is taken as the new unscaled rate (``η_u = group["lr"]``), otherwise
      ``η_u = group["lr"] / s``. Use ``every_n_steps=1`` for the scale to hold at every step (the
      monitor probes after the scheduler has stepped, so the guard has the last word).

    Supported optimizers: ``torch.optim.SGD``, ``Adam``, ``AdamW`` and ``RMSprop``, each also as
    the base optimizer of :class:`~lightning_landscape.optim.SAM`. For SGD the guard acts on the
    raw λ_max; for the adaptive ones on the preconditioned ratio, which the monitor's
    ``Sharpness`` probe measures from the optimizer's own state (from the first probe after the
    optimizer's first step; before it the guard leaves the rate alone). Since the preconditioned
    ratio is one number over all param groups, an adaptive optimizer's groups are scaled
    together (``param_groups`` must be left at all). Any other optimizer (Lion, Muon,
    Adafactor, ...) has no stability threshold here, so the guard refuses the run when training
    starts (:meth:`check`), before the first optimizer step, never mid-run.

    The state (scale and the rates last written) is saved by the monitor with its checkpoint
    state; together with the optimizer's own state (which holds the scaled ``lr``) a resumed run
    takes the same actions as an uninterrupted one.

    Args:
        target: the largest allowed stability ratio, in ``(0, 1]`` (``0.9``: 90% of the edge).
        min_scale: the smallest scale, in ``(0, 1]``; if even that leaves the ratio above
            ``target``, a warning says so (once).
        recovery: factor ``≥ 1`` by which the scale may grow per report when curvature allows
            (``1``: never recover).
        param_groups: indices of the param groups to scale (default all; SGD only). λ_max is
            the Hessian's over the probed parameters, so it is compared with each selected
            group's rate and the most restrictive group sets the common scale.
        optimizer_index: which of ``trainer.optimizers`` to control.
        scheduler: ``"chainable"`` or ``"closed_form"``: how the learning-rate scheduler of this
            optimizer (if any) computes the next rate (see above).
        log: log the decisions.

    Raises:
        ValueError: on invalid arguments.

    Example::

        from lightning.pytorch import Trainer
        from lightning_landscape import LandscapeMonitor
        from lightning_landscape.callbacks.control import StabilityLRGuard

        guard = StabilityLRGuard(target=0.9)
        monitor = LandscapeMonitor(every_n_steps=5, top_k=1, hooks=[guard])
        trainer = Trainer(max_epochs=10, callbacks=[monitor])
        trainer.fit(model, datamodule=dm)  # model uses torch.optim.SGD or AdamW
        print(guard.scale)
    """

    def __init__(
        self,
        target: float = 0.9,
        min_scale: float = 1e-3,
        recovery: float = 1.1,
        param_groups: list[int] | None = None,
        optimizer_index: int = 0,
        scheduler: SchedulerKind = "chainable",
        log: bool = True,
    ) -> None:
        self.target = real("target", target)
        if not 0 < self.target <= 1:
            raise ValueError(f"target must be in (0, 1] (a fraction of the edge), got {target}")
        self.min_scale = real("min_scale", min_scale)
        if not 0 < self.min_scale <= 1:
            raise ValueError(f"min_scale must be in (0, 1], got {min_scale}")
        self.recovery = real("recovery", recovery)
        if self.recovery < 1:
            raise ValueError(f"recovery must be >= 1 (1: never recover), got {recovery}")
        if param_groups is not None:
            if isinstance(param_groups, (str, bytes)) or not isinstance(
                param_groups, (list, tuple)
            ):
                raise ValueError(f"param_groups must be a list of indices, got {param_groups!r}")
            param_groups = [_index("param_groups[i]", i) for i in param_groups]
            if not param_groups or len(set(param_groups)) != len(param_groups):
                raise ValueError(
                    f"param_groups must be a non-empty list of distinct indices, got {param_groups}"
                )
        self.param_groups = param_groups
        self.optimizer_index = _index("optimizer_index", optimizer_index)
        self.scheduler: SchedulerKind = choice("scheduler", scheduler, _SCHEDULER_KINDS)
        self.log = bool(log)
        self.scale = 1.0
        self.last_ratio: float | None = None  # the effective ratio after the last decision
        self._written: list[float] | None = None  # the rates last written, per selected group
        self._warned_floor = False

    def check(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Refuse, before the first optimizer step, a run the guard cannot serve.

        Args:
            trainer: the trainer (its optimizers exist by now).
            pl_module: the module being trained (unused).

        Raises:
            TypeError: if ``optimizers[optimizer_index]`` is none of SGD, Adam, AdamW, RMSprop
                (or SAM over one of them).
            ValueError: if ``optimizer_index`` or ``param_groups`` are out of range, or
                ``param_groups`` selects some groups of an adaptive optimizer.
        """
        optimizer = _optimizer(trainer, self.optimizer_index, "StabilityLRGuard")
        inner = optimizer.base_optimizer if isinstance(optimizer, SAM) else optimizer
        if isinstance(inner, _ADAPTIVE):
            if self.param_groups is not None and len(self.param_groups) < len(
                optimizer.param_groups
            ):
                raise ValueError(
                    f"StabilityLRGuard: with {type(inner).__name__} the preconditioned stability "
                    "ratio is one number over all param groups, so they are scaled together; "
                    f"leave param_groups unset (got {self.param_groups})."
                )
        elif not isinstance(inner, torch.optim.SGD):
            raise TypeError(self._unsupported(optimizer))
        self._groups(optimizer)

    def on_landscape(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, report: ProbeReport
    ) -> None:
        """Rescale the learning rate from one probe's sharpness (see the class docstring).

        Args:
            trainer: the trainer (its ``optimizers[optimizer_index]`` is controlled).
            pl_module: the module being trained (unused).
            report: the probe's report.

        Raises:
            TypeError: if the optimizer is not supported.
            ValueError: if ``optimizer_index`` or ``param_groups`` are out of range.
        """
        optimizer = _optimizer(trainer, self.optimizer_index, "StabilityLRGuard")
        inner = optimizer.base_optimizer if isinstance(optimizer, SAM) else optimizer
        if isinstance(inner, _ADAPTIVE):
            if report.preconditioned_lambda_max is None or report.stability_ratio is None:
                return  # no optimizer state yet (before its first step): nothing to act on
            self.apply_ratio(optimizer, report.stability_ratio)
        else:
            self.apply(optimizer, report.lambda_max)
        if self.log:
            metrics = {tags.CONTROL_LR_SCALE: self.scale}
            if self.last_ratio is not None:
                metrics[tags.CONTROL_RATIO] = self.last_ratio
            _log(trainer, metrics, report.step)

    def apply(self, optimizer: torch.optim.Optimizer, lambda_max: float) -> float:
        """Update the scale from ``lambda_max`` and write the scaled rates into ``optimizer``.

        Args:
            optimizer: an SGD-family optimizer.
            lambda_max: the largest Hessian eigenvalue.

        Returns:
            The new scale.

        Raises:
            TypeError: if the optimizer is not SGD-like (e.g. Adam).
            ValueError: if ``param_groups`` names a group the optimizer does not have, or
                ``lambda_max`` is not finite.
        """
        if not math.isfinite(lambda_max):
            raise ValueError(f"lambda_max must be finite, got {lambda_max}")
        groups = self._groups(optimizer)
        current = [float(optimizer.param_groups[g]["lr"]) for g in groups]
        unscaled = self._unscaled(current)
        ratio = 0.0  # unscaled stability ratio, the largest over the selected groups
        for g, lr, lr_u in zip(groups, current, unscaled, strict=True):
            if lr > 0:
                threshold = stability_threshold(optimizer, g)
                if threshold is None:
                    raise TypeError(self._unsupported(optimizer))
                ratio = max(ratio, lambda_max / threshold * lr_u / lr)
        return self._decide(optimizer, groups, unscaled, ratio)

    def apply_ratio(self, optimizer: torch.optim.Optimizer, ratio: float) -> float:
        """Update the scale from a stability ratio measured at the optimizer's current rates.

        This is how an adaptive optimizer is guarded: ``ratio`` is the preconditioned ratio
        (``SharpnessResult.stability_ratio``), which is proportional to the learning rate, so
        the ratio at the unscaled rates is ``ratio · η_u / η``.

        Args:
            optimizer: the optimizer the ratio was measured under.
            ratio: the stability ratio at the current learning rates.

        Returns:
            The new scale.

        Raises:
            ValueError: if ``ratio`` is negative or not finite, or ``param_groups`` names a
                group the optimizer does not have.

        Example:
            >>> import torch
            >>> p = [torch.nn.Parameter(torch.zeros(2))]
            >>> opt = torch.optim.AdamW(p, lr=1e-3)
            >>> guard = StabilityLRGuard(target=0.8, log=False)
            >>> round(guard.apply_ratio(opt, 1.6), 6), round(opt.param_groups[0]["lr"], 9)
            (0.5, 0.0005)
        """
        if not math.isfinite(ratio) or ratio < 0:
            raise ValueError(f"ratio must be finite and non-negative, got {ratio}")
        groups = self._groups(optimizer)
        current = [float(optimizer.param_groups[g]["lr"]) for g in groups]
        unscaled = self._unscaled(current)
        r_u = max(
            (ratio * lr_u / lr for lr, lr_u in zip(current, unscaled, strict=True) if lr > 0),
            default=0.0,
        )
        return self._decide(optimizer, groups, unscaled, r_u)

    def _decide(
        self,
        optimizer: torch.optim.Optimizer,
        groups: list[int],
        unscaled: list[float],
        ratio: float,
    ) -> float:
        """Set the scale for the unscaled ratio ``ratio`` and write the scaled rates."""
        cap = self.target / ratio if ratio > 0 else math.inf
        if self.scale * ratio > self.target:
            scale = cap
        else:
            scale = min(1.0, self.scale * self.recovery, cap)
        self.scale = max(self.min_scale, scale)
        self.last_ratio = self.scale * ratio
        if (
            self.scale == self.min_scale
            and self.last_ratio > self.target
            and not self._warned_floor
        ):
            self._warned_floor = True
            rank_zero_warn(
                f"StabilityLRGuard: at min_scale={self.min_scale} the stability ratio is still "
                f"{self.last_ratio:.3g} > target={self.target}; lower min_scale or the base "
                "learning rate."
            )
        written = [lr_u * self.scale for lr_u in unscaled]
        for g, lr in zip(groups, written, strict=True):
            _set_hyper(optimizer.param_groups[g], "lr", lr)
        # Read back: a tensor lr may round the value.
        self._written = [float(optimizer.param_groups[g]["lr"]) for g in groups]
        return self.scale

    def _groups(self, optimizer: torch.optim.Optimizer) -> list[int]:
        n = len(optimizer.param_groups)
        if self.param_groups is None:
            return list(range(n))
        bad = [g for g in self.param_groups if g >= n]
        if bad:
            raise ValueError(
                f"StabilityLRGuard: param_groups={self.param_groups} but the optimizer has only "
                f"{n} param group(s)."
            )
        return list(self.param_groups)

    def _unscaled(self, current: list[float]) -> list[float]:
        written = self._written
        if written is not None and len(written) != len(current):
            written = None  # the optimizer changed shape (e.g. resumed with other groups)
        out = []
        for i, lr in enumerate(current):
            if self.scheduler == "closed_form" and written is not None and lr != written[i]:
                out.append(lr)  # a closed-form scheduler wrote a fresh, unscaled rate
            else:
                out.append(lr / self.scale)  # the guard's scale is still in the rate
        return out

    @staticmethod
    def _unsupported(optimizer: torch.optim.Optimizer) -> str:
        inner = optimizer.base_optimizer if isinstance(optimizer, SAM) else optimizer
        return (
            f"StabilityLRGuard supports torch.optim.SGD, Adam, AdamW and RMSprop (or SAM over "
            f"them), not {type(inner).__name__}: its edge of stability is not known here, so "
            "there is no ratio to keep below the edge. Log landscape/update/curvature "
            "(lightning_landscape.probes.UpdateCurvature) to watch its curvature, or remove "
            "the guard."
        )

    def state_dict(self) -> dict[str, Any]:
        """The guard's state, saved by the monitor in its checkpoint state.

        Returns:
            ``{"scale", "written", "last_ratio", "warned_floor"}``.
        """
        return {
            "scale": self.scale,
            "written": None if self._written is None else list(self._written),
            "last_ratio": self.last_ratio,
            "warned_floor": self._warned_floor,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the state saved by :meth:`state_dict`.

        Args:
            state_dict: the saved state.
        """
        self.scale = float(state_dict.get("scale", 1.0))
        written = state_dict.get("written")
        self._written = None if written is None else [float(v) for v in written]
        last = state_dict.get("last_ratio")
        self.last_ratio = None if last is None else float(last)
        self._warned_floor = bool(state_dict.get("warned_floor", False))


class SharpnessAdaptiveRho:
    r"""Set SAM's neighbourhood radius ρ from the monitored sharpness.

    Rule: ``ρ = clip(base_rho · λ_max / λ_ref, rho_min, rho_max)``, written into every param
    group's ``"rho"`` of the optimizer (e.g. :class:`lightning_landscape.optim.SAM`, which keeps ρ
    per param group). ``λ_ref`` is ``reference`` if given, else the first positive λ_max observed
    (until then ρ is left as it is). So ρ is ``base_rho`` at the reference sharpness and grows in
    proportion as the landscape sharpens (SAM then pushes harder towards flatter regions), and
    shrinks as it flattens. Each decision is logged through ``trainer.loggers`` on global rank
    zero at ``report.step`` as ``landscape/control/rho``.

    Args:
        rho_min: smallest ρ (``>= 0``).
        rho_max: largest ρ (``> 0``, ``>= rho_min``).
        base_rho: ρ at ``λ_max = λ_ref``, within ``[rho_min, rho_max]``.
        reference: the reference sharpness ``λ_ref > 0`` (default: the first positive λ_max
            observed; saved with the monitor's checkpoint state).
        optimizer_index: which of ``trainer.optimizers`` to control.
        log: log the decisions.

    Raises:
        ValueError: on invalid arguments.

    Example::

        from lightning.pytorch import Trainer
        from lightning_landscape import LandscapeMonitor
        from lightning_landscape.callbacks.control import SharpnessAdaptiveRho

        # the module's configure_optimizers returns SAM(params, torch.optim.SGD, lr=0.1, rho=0.05)
        monitor = LandscapeMonitor(every_n_steps=50, top_k=1, hooks=[SharpnessAdaptiveRho()])
        Trainer(max_epochs=10, callbacks=[monitor]).fit(model, datamodule=dm)
    """

    def __init__(
        self,
        rho_min: float = 0.01,
        rho_max: float = 0.5,
        base_rho: float = 0.05,
        reference: float | None = None,
        optimizer_index: int = 0,
        log: bool = True,
    ) -> None:
        self.rho_min = real("rho_min", rho_min)
        self.rho_max = real("rho_max", rho_max)
        self.base_rho = real("base_rho", base_rho)
        if self.rho_min < 0:
            raise ValueError(f"rho_min must be >= 0, got {rho_min}")
        if not self.rho_max > 0:
            raise ValueError(f"rho_max must be > 0, got {rho_max}")
        if self.rho_min > self.rho_max:
            raise ValueError(f"rho_min={rho_min} must not exceed rho_max={rho_max}")
        if not self.rho_min <= self.base_rho <= self.rho_max:
            raise ValueError(f"base_rho={base_rho} must lie in [rho_min, rho_max]")
        if reference is not None and not real("reference", reference) > 0:
            raise ValueError(f"reference must be a positive sharpness, got {reference}")
        self.reference = None if reference is None else float(reference)
        self.optimizer_index = _index("optimizer_index", optimizer_index)
        self.log = bool(log)
        self.lambda_ref: float | None = self.reference
        self.rho: float | None = None  # the last ρ written

    def check(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Refuse, before the first optimizer step, an optimizer without a per-group ρ.

        Args:
            trainer: the trainer (its optimizers exist by now).
            pl_module: the module being trained (unused).

        Raises:
            TypeError: if the optimizer's param groups have no ``"rho"`` (not SAM).
            ValueError: if ``optimizer_index`` is out of range.
        """
        _check_rho_groups(_optimizer(trainer, self.optimizer_index, "SharpnessAdaptiveRho"))

    def on_landscape(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, report: ProbeReport
    ) -> None:
        """Set ρ from one probe's λ_max (see the class docstring).

        Args:
            trainer: the trainer (its ``optimizers[optimizer_index]`` is controlled).
            pl_module: the module being trained (unused).
            report: the probe's report.

        Raises:
            TypeError: if the optimizer's param groups have no ``"rho"``.
            ValueError: if ``optimizer_index`` is out of range.
        """
        optimizer = _optimizer(trainer, self.optimizer_index, "SharpnessAdaptiveRho")
        rho = self.apply(optimizer, report.lambda_max)
        if self.log and rho is not None:
            _log(trainer, {tags.CONTROL_RHO: rho}, report.step)

    def apply(self, optimizer: torch.optim.Optimizer, lambda_max: float) -> float | None:
        """Compute ρ from ``lambda_max`` and write it into every param group.

        Args:
            optimizer: an optimizer whose param groups hold ``"rho"`` (SAM).
            lambda_max: the largest Hessian eigenvalue.

        Returns:
            The ρ written, or ``None`` while no reference sharpness is known.

        Raises:
            TypeError: if the optimizer's param groups have no ``"rho"``.
        """
        _check_rho_groups(optimizer)
        if self.lambda_ref is None:
            if not lambda_max > 0:
                return None  # no reference sharpness yet
            self.lambda_ref = float(lambda_max)
        rho = self.base_rho * lambda_max / self.lambda_ref
        rho = min(self.rho_max, max(self.rho_min, rho))
        for group in optimizer.param_groups:
            _set_hyper(group, "rho", rho)
        self.rho = rho
        return rho

    def state_dict(self) -> dict[str, Any]:
        """The reference sharpness and the last ρ, saved by the monitor in its checkpoint state.

        Returns:
            ``{"lambda_ref", "rho"}``.
        """
        return {"lambda_ref": self.lambda_ref, "rho": self.rho}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the state saved by :meth:`state_dict`.

        Args:
            state_dict: the saved state.
        """
        ref = state_dict.get("lambda_ref")
        self.lambda_ref = None if ref is None else float(ref)
        rho = state_dict.get("rho")
        self.rho = None if rho is None else float(rho)
