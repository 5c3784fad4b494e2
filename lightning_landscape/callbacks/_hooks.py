"""The protocol of curvature-driven hooks that :class:`LandscapeMonitor` calls after each probe."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import lightning.pytorch as pl

from ..results import ProbeReport


@runtime_checkable
class LandscapeHook(Protocol):
    """Anything registered with ``LandscapeMonitor(hooks=[...])`` that acts on probe reports.

    The monitor calls ``on_landscape`` on every rank after each successful probe, in the order
    the hooks were given, with the same report on every rank (under DDP the probe measures the
    global Hessian), so hooks that change the optimizer take the same action everywhere. A hook
    may also define ``state_dict() -> dict`` and ``load_state_dict(dict)``: the monitor saves
    them in its checkpoint state, so a resumed run takes the same actions. A plain callable
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
