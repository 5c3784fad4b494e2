"""Sharpness-aware minimization (SAM) and adaptive SAM (ASAM) around any torch optimizer.

SAM is Foret et al., ICLR 2021; ASAM is Kwon et al., ICML 2021.

One SAM step evaluates the gradient twice: ``g = ∇L(w)``, then ``g' = ∇L(w + ε̂)`` at the
worst-case neighbour ``ε̂ = ρ g/‖g‖`` (ASAM: ``ε̂ = ρ T_w² g/‖T_w g‖`` with ``T_w = |w|``
elementwise), and lets the base optimizer update ``w`` with ``g'``. The perturbation follows the
reference implementation https://github.com/davda54/sam.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase
from torch.optim.optimizer import ParamsT

from .._validate import flag, real

NoSyncFactory = Callable[[], AbstractContextManager[Any]]

_NO_CLOSURE = (
    "SAM.step() needs a closure: one SAM step evaluates the loss and its gradient twice, at w and "
    "at the perturbed weights w + ε̂, so the optimizer must be able to re-run forward and backward. "
    "Pass `closure=` (a function that runs forward and backward and returns the loss), or drive "
    "the two passes yourself with first_step() / second_step(). If this call comes from Lightning "
    "with `precision='16-mixed'` (or from torch.amp.GradScaler.step()): the GradScaler runs the "
    "closure itself and then calls optimizer.step() without it, so SAM cannot work with fp16 loss "
    "scaling; use `precision='bf16-mixed'` (no GradScaler) or `precision='32-true'`."
)

_RUNNING_STAT_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


@dataclass
class _PassState:
    """Mutable per-step state, shared with Lightning's ``LightningOptimizer`` wrapper.

    ``LightningOptimizer`` forwards attribute *reads* to the wrapped optimizer but keeps attribute
    *writes*, so the SAM methods (which Lightning's wrapper inherits) only ever mutate this
    object, never rebind attributes.
    """

    backup: dict[Tensor, Tensor] = field(default_factory=dict)
    perturbed: bool = False


class SAM(torch.optim.Optimizer):
    """Sharpness-aware minimization around a base optimizer (SAM; ASAM with ``adaptive=True``).

    Each :meth:`step` runs the closure twice:

    1. ``loss = closure()`` at ``w`` gives ``g`` (the first pass);
    2. :meth:`first_step` moves to ``w + ε̂`` with ``ε̂ = ρ g/‖g‖`` (SAM) or
       ``ε̂ = ρ T_w² g/‖T_w g‖``, ``T_w = |w|`` elementwise (ASAM), where ``‖·‖`` is the norm over
       all parameter groups together and ``ρ`` is each group's ``"rho"``, then zeroes the gradients;
    3. ``closure()`` at ``w + ε̂`` gives ``g'`` (the second pass);
    4. :meth:`second_step` restores ``w`` bit for bit and calls ``base_optimizer.step()``, which
       updates ``w`` with ``g'``.

    and returns the first pass's loss (the loss at ``w``).

    ``param_groups`` and ``state`` are those of :attr:`base_optimizer` (the same objects), so LR
    schedulers, gradient clipping and ``state_dict()`` / ``load_state_dict()`` (momentum buffers,
    ``rho`` and ``adaptive`` included) see one optimizer. ``rho`` and ``adaptive`` are per group
    (``param_groups[i]["rho"]``), so a scheduler or a callback can change ρ during training.

    Usage with Lightning (automatic optimization): return SAM from ``configure_optimizers``;
    Lightning passes a closure that runs ``training_step`` and ``backward``, so ``training_step``
    runs twice per optimizer step::

        def configure_optimizers(self):
            return SAM(self.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9,
                       model=self)

    Usage with Lightning manual optimization: call ``step`` with a closure, so that Lightning's
    step counting and precision handling stay in place::

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()

            def closure():
                loss = self.compute_loss(batch)
                opt.zero_grad()
                self.manual_backward(loss)
                return loss

            loss = opt.step(closure=closure)

    Usage in a plain PyTorch loop, either ``optimizer.step(closure)`` or the two halves::

        loss_fn(model(x), y).backward()          # g at w
        optimizer.first_step(zero_grad=True)     # w -> w + ε̂
        loss_fn(model(x), y).backward()          # g' at w + ε̂
        optimizer.second_step(zero_grad=True)    # back to w, base step with g'

    (In Lightning, calling ``first_step`` / ``second_step`` directly bypasses the ``Trainer``'s
    step counting: ``global_step`` does not advance. Use ``step(closure)`` there.)

    Caveats:

    * **BatchNorm.** Pass ``model=`` (e.g. ``model=self`` in ``configure_optimizers``): the running
      statistics (``running_mean``, ``running_var``, ``num_batches_tracked`` of every BatchNorm,
      and of InstanceNorm with ``track_running_stats``) are saved before the second pass and
      restored after it, so only the first pass (at ``w``) updates them; this also holds for
      ``momentum=None`` (cumulative averages). Without ``model=`` SAM cannot see the modules and
      BatchNorm statistics are updated twice per step, once at the perturbed weights.
    * **Everything in the closure runs twice**: ``training_step`` (and its ``self.log`` calls),
      ``on_before_optimizer_step`` and Lightning's gradient clipping (``gradient_clip_val``), which
      clips both ``g`` and ``g'``. Norm clipping of ``g`` leaves ε̂ unchanged (ε̂ only depends on
      the direction of ``g``); value clipping changes it. The clipped ``g'`` is what the base
      optimizer uses. :attr:`is_perturbed` is ``True`` during the second pass, e.g. to log only
      the first pass: ``if not self.optimizers().is_perturbed: self.log(...)``.
    * **Mixed precision.** ``precision="bf16-mixed"`` and ``"32-true"`` work. Lightning's
      ``"16-mixed"`` uses a GradScaler, which calls ``optimizer.step()`` without the closure:
      SAM raises a :class:`RuntimeError` naming the fix. (On CPU Lightning replaces
      ``"16-mixed"`` by ``"bf16-mixed"``.)
    * **Gradient accumulation** (``accumulate_grad_batches > 1``) is refused when ``model=`` is
      the LightningModule: the second pass would only see the last micro-batch.
    * **DDP.** Under Lightning's DDP both passes all-reduce the gradients (the closure's backward
      synchronises), so ε̂ comes from the gradient of the global batch and every rank perturbs
      identically. With ``m_sharpness=True`` the first pass runs without gradient
      synchronisation, so each rank perturbs along its own shard's gradient (the m-sharpness
      variant of Foret et al. with m = per-rank batch); the second pass is synchronised and the
      update stays identical on all ranks.

    Args:
        params: parameters or parameter groups, as for any :class:`torch.optim.Optimizer`. A group
            may set its own ``"rho"`` and ``"adaptive"``.
        base_optimizer: the optimizer *class* (or a factory ``f(param_groups, **base_kwargs)``)
            that performs the update, e.g. :class:`torch.optim.SGD`.
        rho: neighbourhood radius ρ ≥ 0 (default for groups that do not set ``"rho"``). ASAM
            typically needs a larger ρ (e.g. 0.5-2) than SAM (0.05).
        adaptive: ASAM (scale-invariant neighbourhood ``T_w = |w|``) instead of SAM.
        norm_eps: added to the gradient norm before dividing (named ``norm_eps``, not ``eps``, so
            that ``eps=`` still reaches optimizers such as Adam).
        model: the module being trained (``self`` inside ``configure_optimizers``), used to keep
            normalisation-layer running statistics from the first pass only, to find Lightning's
            DDP strategy for ``m_sharpness`` and to detect gradient accumulation.
        m_sharpness: run the first pass without DDP gradient synchronisation (per-rank ε̂).
        no_sync: a factory of the context manager that disables gradient synchronisation (e.g.
            ``ddp_model.no_sync``); by default SAM uses Lightning's
            ``trainer.strategy.block_backward_sync()`` of ``model``, or ``model.no_sync()`` when
            ``model`` is a :class:`~torch.nn.parallel.DistributedDataParallel`.
        **base_kwargs: passed to ``base_optimizer`` (``lr``, ``momentum``, ``weight_decay``, ...).

    Raises:
        ValueError: for ρ < 0 or non-finite, ``norm_eps`` ≤ 0, a non-boolean ``adaptive``, or
            ``m_sharpness=True`` with neither ``model`` nor ``no_sync``.
        TypeError: if ``base_optimizer`` is an optimizer instance, a SAM, does not build a
            :class:`torch.optim.Optimizer` or uses a ``"rho"``/``"adaptive"`` group option itself
            (:class:`torch.optim.Adadelta`), or ``model`` is not an :class:`~torch.nn.Module`.

    Example:
        >>> import torch
        >>> from lightning_landscape.optim import SAM
        >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
        >>> opt = SAM([w], torch.optim.SGD, rho=0.5, lr=0.1)
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = (w**2).sum()  # g = 2w; ε̂ = 0.5·w/‖w‖
        ...     loss.backward()
        ...     return loss.detach()
        >>> float(opt.step(closure))  # the loss at w, not at w + ε̂
        5.0
        >>> torch.allclose(w, torch.tensor([1.0, -2.0]) * (1 - 0.2 * (1 + 0.5 / 5**0.5)))
        True
    """

    def __init__(
        self,
        params: ParamsT,
        base_optimizer: Callable[..., torch.optim.Optimizer] = torch.optim.SGD,
        rho: float = 0.05,
        adaptive: bool = False,
        *,
        norm_eps: float = 1e-12,
        model: nn.Module | None = None,
        m_sharpness: bool = False,
        no_sync: NoSyncFactory | None = None,
        **base_kwargs: Any,
    ) -> None:
        _check_rho(rho)
        _check_adaptive(adaptive)
        real("norm_eps", norm_eps, low=0)
        if isinstance(base_optimizer, torch.optim.Optimizer):
            raise TypeError(
                "base_optimizer must be an optimizer class (or factory), not an instance: write "
                "SAM(params, torch.optim.SGD, lr=0.1, ...) instead of "
                "SAM(params, torch.optim.SGD(params, lr=0.1))"
            )
        if isinstance(base_optimizer, type) and issubclass(base_optimizer, SAM):
            raise TypeError("base_optimizer cannot itself be SAM")
        if not callable(base_optimizer):
            raise TypeError(
                f"base_optimizer must be a torch.optim.Optimizer class, got {base_optimizer!r}"
            )
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module or None, got {type(model).__name__}")
        if no_sync is not None and not callable(no_sync):
            raise TypeError("no_sync must be a callable returning a context manager")
        if m_sharpness and model is None and no_sync is None:
            raise ValueError(
                "m_sharpness=True needs a way to skip gradient synchronisation in the first pass: "
                "pass model= (the LightningModule, or the DistributedDataParallel module) or "
                "no_sync= (e.g. ddp_model.no_sync)"
            )

        super().__init__(params, {"rho": float(rho), "adaptive": bool(adaptive)})
        for group in self.param_groups:
            _check_rho(group["rho"])
            _check_adaptive(group["adaptive"])
        factory: Callable[..., Any] = base_optimizer
        base = factory(self.param_groups, **base_kwargs)
        if not isinstance(base, torch.optim.Optimizer):
            raise TypeError(
                f"base_optimizer must build a torch.optim.Optimizer, got {type(base).__name__}"
            )
        if isinstance(base, SAM):
            raise TypeError("base_optimizer cannot itself be SAM")
        clash = sorted({"rho", "adaptive"} & base.defaults.keys())
        if clash:
            raise TypeError(
                f"{type(base).__name__} uses the parameter-group option(s) {clash} itself, which "
                "SAM stores in the shared parameter groups; SAM cannot wrap it"
            )
        self.base_optimizer: torch.optim.Optimizer = base
        # One set of groups and one state for both: schedulers, clipping, checkpoints and
        # Lightning's optimizer-to-device moves act on the base optimizer's own objects.
        self.param_groups = base.param_groups
        self.state = base.state
        self.defaults.update(base.defaults)
        self.norm_eps = float(norm_eps)
        self.model = model
        self.m_sharpness = bool(m_sharpness)
        self.no_sync = no_sync
        self._pass = _PassState()

    # ----------------------------------------------------------------------------------------------
    # Steps
    # ----------------------------------------------------------------------------------------------

    @property
    def is_perturbed(self) -> bool:
        """Whether the parameters are currently at ``w + ε̂`` (between the two half-steps)."""
        return self._pass.perturbed

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One SAM step: closure at ``w``, move to ``w + ε̂``, closure again, back, base step.

        Args:
            closure: zeroes the gradients, runs forward and backward and returns the loss (as
                for :class:`torch.optim.LBFGS`; Lightning's closure does exactly this). SAM also
                zeroes the gradients before the second call.

        Returns:
            What the first call of ``closure`` returned (the loss at ``w``).

        Raises:
            RuntimeError: without a closure (e.g. under an fp16 GradScaler; the message names the
                fix), or under Lightning gradient accumulation.
        """
        if closure is None:
            raise RuntimeError(_NO_CLOSURE)
        self._check_no_accumulation()
        closure = torch.enable_grad()(closure)
        with self._first_pass_sync():
            loss = closure()
        self.first_step(zero_grad=True)
        try:
            with self._running_stats_frozen():
                closure()
        except BaseException:
            self._restore()
            raise
        self.second_step()
        return loss

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Move the parameters from ``w`` to ``w + ε̂`` using the current gradients ``g``.

        Args:
            zero_grad: zero the gradients afterwards (ready for the second backward).

        Raises:
            RuntimeError: if the parameters are already perturbed (``first_step`` twice).
        """
        if self._pass.perturbed:
            raise RuntimeError(
                "first_step() called twice without second_step(): the parameters are already at "
                "w + ε̂"
            )
        grad_norm = self._grad_norm()
        backup = self._pass.backup
        for group in self.param_groups:
            _check_rho(group["rho"])
            adaptive = bool(group["adaptive"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                scale = (group["rho"] / (grad_norm + self.norm_eps)).to(p)
                backup[p] = p.detach().clone()
                e_w = (torch.pow(p, 2) if adaptive else 1.0) * p.grad * scale
                p.add_(e_w)
        self._pass.perturbed = True
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore ``w`` exactly and let the base optimizer step with the current gradients ``g'``.

        Args:
            zero_grad: zero the gradients after the base step.

        Raises:
            RuntimeError: without a preceding :meth:`first_step`.
        """
        if not self._pass.perturbed:
            raise RuntimeError("second_step() called without first_step()")
        self._restore()
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    # ----------------------------------------------------------------------------------------------
    # Groups and state
    # ----------------------------------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group (to the base optimizer; ``rho``/``adaptive`` default to SAM's).

        Args:
            param_group: the group, as for :meth:`torch.optim.Optimizer.add_param_group`.
        """
        base = self.__dict__.get("base_optimizer")
        if base is None:  # called by torch.optim.Optimizer.__init__, before the base exists
            super().add_param_group(param_group)
            return
        param_group.setdefault("rho", self.defaults["rho"])
        param_group.setdefault("adaptive", self.defaults["adaptive"])
        _check_rho(param_group["rho"])
        _check_adaptive(param_group["adaptive"])
        base.add_param_group(param_group)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by :meth:`state_dict` (base optimizer state, ``rho``, ``adaptive``).

        Args:
            state_dict: the saved state.
        """
        base = self.base_optimizer
        base.load_state_dict(state_dict)
        # The base optimizer rebinds its groups and state: share them again, in place (the
        # objects bound here may be read through Lightning's optimizer wrapper).
        groups, state = self.param_groups, self.state
        if groups is not base.param_groups:
            groups[:] = base.param_groups
            base.param_groups = groups
        if state is not base.state:
            state.clear()
            state.update(base.state)
            base.state = state
        for group in groups:
            group.setdefault("rho", self.defaults["rho"])
            group.setdefault("adaptive", self.defaults["adaptive"])

    # ----------------------------------------------------------------------------------------------
    # Internals
    # ----------------------------------------------------------------------------------------------

    def _grad_norm(self) -> Tensor:
        """‖g‖ (SAM) or ‖|w| g‖ (ASAM) over all groups, at least in float32."""
        norms: list[Tensor] = []
        for group in self.param_groups:
            adaptive = bool(group["adaptive"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = torch.abs(p) * p.grad if adaptive else p.grad
                dtype = torch.promote_types(g.dtype, torch.float32)
                norms.append(torch.linalg.vector_norm(g, dtype=dtype))
        if not norms:
            return torch.zeros(())
        device = norms[0].device
        dtype = norms[0].dtype
        for n in norms[1:]:
            dtype = torch.promote_types(dtype, n.dtype)
        total: Tensor = torch.linalg.vector_norm(torch.stack([n.to(device, dtype) for n in norms]))
        return total

    def _restore(self) -> None:
        backup = self._pass.backup
        with torch.no_grad():
            for p, old in backup.items():
                p.copy_(old)
        backup.clear()
        self._pass.perturbed = False

    def _lightning_trainer(self) -> Any:
        """The Trainer of :attr:`model` if it is an attached LightningModule, else ``None``."""
        model = self.model
        if model is None:
            return None
        for name in ("lightning.pytorch", "pytorch_lightning"):
            # Not imported: model cannot be one of its LightningModules (and SAM needs no import).
            package = sys.modules.get(name)
            module_class = getattr(package, "LightningModule", None)
            if isinstance(module_class, type) and isinstance(model, module_class):
                try:
                    return model.trainer
                except RuntimeError:  # not attached to a Trainer
                    return None
        return None

    def _check_no_accumulation(self) -> None:
        trainer = self._lightning_trainer()
        accumulate = getattr(trainer, "accumulate_grad_batches", 1) if trainer is not None else 1
        if isinstance(accumulate, int) and accumulate > 1:
            raise RuntimeError(
                f"SAM does not support gradient accumulation (accumulate_grad_batches="
                f"{accumulate}): the second pass would only see the last micro-batch. Use a larger "
                "batch (or more devices) and accumulate_grad_batches=1."
            )

    def _first_pass_sync(self) -> AbstractContextManager[Any]:
        """No gradient synchronisation under ``m_sharpness``; otherwise a null context."""
        if not self.m_sharpness:
            return contextlib.nullcontext()
        if self.no_sync is not None:
            return self.no_sync()
        model = self.model
        if isinstance(model, nn.parallel.DistributedDataParallel):
            return model.no_sync()
        trainer = self._lightning_trainer()
        block = getattr(getattr(trainer, "strategy", None), "block_backward_sync", None)
        if callable(block):
            context: AbstractContextManager[Any] = block()
            return context
        if _world_size() > 1:
            raise RuntimeError(
                "m_sharpness=True but SAM found no way to skip gradient synchronisation: pass "
                "model= (a LightningModule attached to a Trainer with a DDP strategy, or a "
                "DistributedDataParallel module) or no_sync= (e.g. ddp_model.no_sync)"
            )
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def _running_stats_frozen(self) -> Iterator[None]:
        """Restore normalisation-layer running statistics of :attr:`model` on exit."""
        model = self.model
        saved: list[tuple[nn.Module, str, Tensor]] = []
        if model is not None:
            for module in model.modules():
                if isinstance(module, _NormBase):
                    for name in _RUNNING_STAT_BUFFERS:
                        buf = getattr(module, name, None)
                        if isinstance(buf, Tensor):
                            saved.append((module, name, buf.detach().clone()))
        try:
            yield
        finally:
            with torch.no_grad():
                for module, name, old in saved:
                    buf = getattr(module, name)
                    if isinstance(buf, Tensor):
                        buf.copy_(old)


def _check_rho(rho: Any) -> None:
    real("rho", rho, low=0, low_open=False)


def _check_adaptive(adaptive: Any) -> None:
    flag("adaptive", adaptive)


def _world_size() -> int:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return int(dist.get_world_size())
    return 1
