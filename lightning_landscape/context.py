"""The curvature context: a deterministic, side-effect-free environment for probes.

Inside :func:`curvature_context` the model is in ``eval()`` mode (no dropout; BatchNorm uses its
running statistics, or, with ``norm_statistics="batch"``, the statistics of each batch it sees,
as in training), autocast is off, float32 products run in full precision (no TF32:
:func:`full_float32`), PyTorch's math SDPA backend is forced (fused attention kernels
have no double backward), ``torch.compile``'d modules run their original eager code (the same
parameters; compiled autograd has no double backward), and gradients are enabled even inside
``torch.inference_mode``. On exit everything a training step can
observe is restored exactly: per-module train/eval modes, CPU and CUDA RNG states (plus Python's
``random`` and NumPy's global RNG), ``.grad`` tensors (inside the context ``.grad`` is ``None``, so
a ``backward()`` there cannot accumulate into the training gradients), ``requires_grad`` flags,
and, when normalisation layers use batch statistics or modes are left as they are, the module
buffers (BatchNorm running statistics). Probes never touch optimizer state.
"""

from __future__ import annotations

import contextlib
import functools
import random
from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

from ._validate import choice

NormStatistics = Literal["running", "batch"]
"""How normalisation layers with running statistics (BatchNorm, InstanceNorm with
``track_running_stats``) normalise inside :func:`curvature_context`: ``"running"`` with their
running statistics (the deployed function, eval mode), ``"batch"`` with the statistics of the
batch they see (the function training optimises)."""
NORM_STATISTICS: tuple[NormStatistics, ...] = ("running", "batch")


@contextlib.contextmanager
def fork_rng(devices: list[int] | None = None) -> Iterator[None]:
    """Save and restore every global RNG a training step may read.

    Covers torch's CPU generator, the CUDA generators of ``devices`` (all visible devices if
    ``None`` and CUDA is initialised), Python's ``random`` and NumPy's legacy global generator.

    Args:
        devices: CUDA device indices to save; default every initialised device.

    Yields:
        Nothing; the states are restored on exit, even on error.
    """
    cpu_state = torch.get_rng_state()
    py_state = random.getstate()
    np_state = np.random.get_state()
    cuda_states: list[tuple[int, torch.Tensor]] = []
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        ids = range(torch.cuda.device_count()) if devices is None else devices
        cuda_states = [(i, torch.cuda.get_rng_state(i)) for i in ids]
    try:
        yield
    finally:
        torch.set_rng_state(cpu_state)
        random.setstate(py_state)
        np.random.set_state(np_state)
        for i, state in cuda_states:
            torch.cuda.set_rng_state(state, i)


def _precision_knobs() -> list[Any]:
    """PyTorch's per-backend float32 precision settings (``fp32_precision``, PyTorch ≥ 2.9)."""
    knobs = []
    for backend in ("cuda", "cudnn", "mkldnn"):
        module = getattr(torch.backends, backend, None)
        for op in ("matmul", "conv", "rnn"):
            knob = getattr(module, op, None)
            if knob is not None and hasattr(knob, "fp32_precision"):
                knobs.append(knob)
    return knobs


@contextlib.contextmanager
def full_float32() -> Iterator[None]:
    """Float32 matrix products and convolutions in full IEEE precision inside (no TF32).

    PyTorch lets cuDNN convolutions use TF32 on Ampere and later GPUs by default, and
    ``torch.set_float32_matmul_precision("high")`` (which Lightning suggests on such GPUs) does the
    same for matrix products, ``"medium"`` bfloat16 for oneDNN's on CPUs. TF32 keeps 10 mantissa
    bits: Hessian-vector products then carry relative errors of about 1e-3, the size of the
    solvers' tolerances. With PyTorch ≥ 2.9 every ``fp32_precision`` setting (CUDA, cuDNN and
    oneDNN; matmul, conv and rnn) is ``"ieee"`` inside; on exit each reads as before, through
    either of PyTorch's APIs, and one that inherited its backend's value inherits it again. (Inside,
    PyTorch's legacy getters such as ``torch.backends.cudnn.allow_tf32`` may refuse to answer,
    since ``"ieee"`` has no legacy spelling.) Before 2.9: the matmul precision ``"highest"`` and
    ``torch.backends.cudnn.allow_tf32 = False``, restored on exit.

    Example:
        >>> import torch
        >>> from lightning_landscape.context import full_float32
        >>> a = torch.randn(4, 4)
        >>> with full_float32():
        ...     exact = a @ a.T
        >>> bool(torch.allclose(exact, exact.T))
        True
    """
    knobs = _precision_knobs()
    if knobs:
        saved = [knob.fp32_precision for knob in knobs]
        try:
            for knob in knobs:
                knob.fp32_precision = "ieee"
            yield
        finally:
            for knob, value in zip(knobs, saved, strict=True):
                # A knob reads its parent's value until set ("none" stores exactly that), so an
                # inherited value stays inherited: a later torch.backends.fp32_precision = ...
                # still reaches it, as it would have without the probe.
                knob.fp32_precision = "none"
                if knob.fp32_precision != value:
                    knob.fp32_precision = value
        return
    matmul = torch.get_float32_matmul_precision()  # pragma: no cover - torch < 2.9
    cudnn = torch.backends.cudnn.allow_tf32  # pragma: no cover
    try:  # pragma: no cover
        torch.set_float32_matmul_precision("highest")
        torch.backends.cudnn.allow_tf32 = False
        yield
    finally:  # pragma: no cover
        torch.backends.cudnn.allow_tf32 = cudnn
        torch.set_float32_matmul_precision(matmul)


def _sdpa_math() -> contextlib.AbstractContextManager[Any]:
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - torch < 2.3
        return contextlib.nullcontext()
    return sdpa_kernel(SDPBackend.MATH)


def running_stat_norms(model: nn.Module) -> list[nn.Module]:
    """The normalisation layers whose output depends on train/eval mode (running statistics).

    Args:
        model: the module.

    Returns:
        Every BatchNorm (any dimension, SyncBatchNorm included) and InstanceNorm built with
        ``track_running_stats=True`` in ``model``: those holding running-statistics buffers, also
        while a :func:`curvature_context` with ``norm_statistics="batch"`` has switched their
        tracking off (so that a nested context finds them too).
    """
    return [m for m in model.modules() if isinstance(m, _NormBase) and m.running_mean is not None]


def synchronised_batch_norms(model: nn.Module) -> list[nn.SyncBatchNorm]:
    """The ``SyncBatchNorm`` layers that would synchronise their batch statistics across ranks.

    In train mode such a layer all-reduces the statistics over its process group when that
    group has more than one rank. PyTorch cannot differentiate that twice (its backward calls
    ``batch_norm_backward_elemt``, which has no derivative: pytorch#61222), so with
    ``norm_statistics="batch"`` :func:`curvature_context` normalises each rank's batch with its
    own statistics instead, as ``BatchNorm`` under DDP does.

    Args:
        model: the module.

    Returns:
        Its ``SyncBatchNorm`` layers whose process group (default: the world) has more than one
        rank; empty outside an initialised process group.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return []
    return [
        m
        for m in model.modules()
        if isinstance(m, nn.SyncBatchNorm)
        and dist.get_world_size(m.process_group or dist.group.WORLD) > 1
    ]


def _local_batch_norm(norm: nn.SyncBatchNorm, input: Tensor) -> Tensor:
    """``norm``'s forward without a process group: in train mode on ``input``'s own statistics.

    Never synchronises. In train mode (without tracking, as :func:`curvature_context` sets it)
    this is ``SyncBatchNorm``'s own single-process path; in eval mode (a nested eval-mode
    context, e.g. Δ₂'s) its own forward, which does not synchronise either.
    """
    if not norm.training:
        return nn.SyncBatchNorm.forward(norm, input)
    norm._check_input_dim(input)
    norm._check_non_zero_input_channels(input)
    return F.batch_norm(input, None, None, norm.weight, norm.bias, True, 0.0, norm.eps)


_LOCAL_FORWARD = "_lightning_landscape_local_forward"


def _local_forward(norm: nn.SyncBatchNorm) -> Any:
    """:func:`_local_batch_norm` for ``norm``: the same callable every time (kept on the module).

    A compiled product guards on ``norm.forward``: a new callable at every probe recompiled it.
    """
    forward = norm.__dict__.get(_LOCAL_FORWARD)
    if forward is None:
        forward = norm.__dict__[_LOCAL_FORWARD] = functools.partial(_local_batch_norm, norm)
    return forward


def batch_statistics(model: nn.Module, norm_statistics: NormStatistics) -> bool:
    """Whether ``norm_statistics`` puts any layer of ``model`` on batch statistics.

    Args:
        model: the module to probe.
        norm_statistics: ``"running"`` or ``"batch"``.

    Returns:
        True for ``"batch"`` on a model with at least one :func:`running_stat_norms` layer: its
        probe data must then come in chunks of the training batch size, of two samples or more.
    """
    return norm_statistics == "batch" and bool(running_stat_norms(model))


def check_norm_statistics(
    model: nn.Module, eval_mode: bool, norm_statistics: NormStatistics
) -> bool:
    """Validate a one-call function's ``norm_statistics``: whether layers go to batch statistics.

    Args:
        model: the module to probe.
        eval_mode: the call's ``eval_mode``.
        norm_statistics: ``"running"`` or ``"batch"``.

    Returns:
        True when :func:`curvature_context` will switch normalisation layers of ``model`` to
        batch statistics (``"batch"`` and at least one such layer).

    Raises:
        ValueError: for an unknown ``norm_statistics``, or ``"batch"`` with ``eval_mode=False``
            on a model with such layers (the context would leave their modes alone, so the
            argument would be silently ignored).
    """
    choice("norm_statistics", norm_statistics, NORM_STATISTICS)
    switched = batch_statistics(model, norm_statistics)
    if switched and not eval_mode:
        raise ValueError(
            "norm_statistics='batch' switches the normalisation layers of an eval() model to "
            "batch statistics; with eval_mode=False the model keeps its own modes, so pass "
            "eval_mode=True (the default) or norm_statistics='running'."
        )
    return switched


def _compiled(model: nn.Module) -> list[nn.Module]:
    from torch._dynamo.eval_frame import OptimizedModule

    return [
        m
        for m in model.modules()
        if isinstance(m, OptimizedModule) or getattr(m, "_compiled_call_impl", None) is not None
    ]


def compiled_modules(model: nn.Module) -> list[str]:
    """Names of the ``torch.compile``'d modules inside ``model`` (``""`` for ``model`` itself).

    Args:
        model: the module.

    Returns:
        The qualified names of ``torch.compile(module)`` wrappers and of modules compiled in
        place with ``module.compile()``.
    """
    found = {id(m) for m in _compiled(model)}
    return [name for name, m in model.named_modules() if id(m) in found]


@contextlib.contextmanager
def _instance_attribute(module: nn.Module, name: str, value: Any) -> Iterator[None]:
    """``module``'s own ``name`` (its instance ``__dict__`` entry) set to ``value`` while inside.

    On exit the previous entry is put back, or removed if there was none.
    """
    missing = object()
    previous = module.__dict__.get(name, missing)
    module.__dict__[name] = value
    try:
        yield
    finally:
        if previous is missing:
            module.__dict__.pop(name, None)
        else:
            module.__dict__[name] = previous


@contextlib.contextmanager
def eager(model: nn.Module) -> Iterator[nn.Module]:
    """Run every ``torch.compile``'d module inside ``model`` eagerly (its original code).

    A ``torch.compile(module)`` wrapper holds the very parameters of the module it wraps, so the
    eager forward pass computes the same function of the same tensors; only the compiled graph
    (whose autograd has no double backward) is bypassed. Compiled state is left as it was, so
    training's next step runs compiled again without recompiling.

    Args:
        model: the module (may itself be a compiled wrapper).

    Yields:
        ``model``.
    """
    from torch._dynamo.eval_frame import OptimizedModule

    with contextlib.ExitStack() as stack:
        for m in _compiled(model):
            if isinstance(m, OptimizedModule):
                stack.enter_context(_instance_attribute(m, "forward", m._orig_mod.__call__))
            else:
                stack.enter_context(_instance_attribute(m, "_compiled_call_impl", None))
        yield model


@contextlib.contextmanager
def curvature_context(
    model: nn.Module, *, eval_mode: bool = True, norm_statistics: NormStatistics = "running"
) -> Iterator[nn.Module]:
    """Run curvature probes on ``model`` without changing anything training can observe.

    Args:
        model: the module to probe.
        eval_mode: put every submodule in ``eval()`` for the probe (recommended: dropout off).
            With ``False`` the modes are left as they are (and still restored afterwards).
        norm_statistics: with ``eval_mode``, ``"running"`` leaves BatchNorm-type layers in eval
            mode too (their running statistics), ``"batch"`` puts them in train mode without
            tracking, so they normalise each batch with its own statistics, as in training,
            and never update their running statistics. ``SyncBatchNorm`` then normalises with
            this rank's statistics alone (:func:`synchronised_batch_norms`: PyTorch cannot
            differentiate its synchronised forward twice). With ``eval_mode=False`` the buffers
            are copied and restored on exit (a train-mode forward pass updates them), and
            train-mode ``SyncBatchNorm`` layers under several ranks keep synchronising, which
            second-order products cannot differentiate.

    Yields:
        The model, prepared for probing.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from lightning_landscape import curvature_context
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)).train()
        >>> with curvature_context(model):
        ...     model[1].training
        False
        >>> model[1].training
        True
    """
    choice("norm_statistics", norm_statistics, NORM_STATISTICS)
    modes = [(m, m.training) for m in model.modules()]
    params = list(model.parameters())
    grads = [p.grad for p in params]
    flags = [p.requires_grad for p in params]
    batch_stats = running_stat_norms(model) if eval_mode and norm_statistics == "batch" else []
    tracking = [(norm, norm.track_running_stats) for norm in batch_stats]  # False when nested
    # Every SyncBatchNorm on batch statistics: in an initialised process group its train-mode
    # forward also refuses CPU inputs, whatever the group's size; outside one it is the same
    # computation.
    local = [m for m in batch_stats if isinstance(m, nn.SyncBatchNorm)]
    # In train mode a forward pass may update buffers (BatchNorm running statistics): keep copies.
    buffers = [(b, b.detach().clone()) for b in model.buffers()] if not eval_mode else []
    for p in params:  # anything accumulated into .grad inside goes to fresh tensors
        p.grad = None
    stack = contextlib.ExitStack()
    with stack:
        stack.enter_context(fork_rng())
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        stack.enter_context(torch.autocast("cpu", enabled=False))
        if torch.cuda.is_available():
            stack.enter_context(torch.autocast("cuda", enabled=False))
        stack.enter_context(_sdpa_math())
        stack.enter_context(full_float32())
        stack.enter_context(eager(model))
        try:
            if eval_mode:
                model.eval()
                for norm in batch_stats:
                    # Train mode without tracking: normalise with the batch's own statistics and
                    # leave the running statistics alone (no in-place update, which torch.func
                    # transforms could not trace either).
                    norm.train()
                    setattr(norm, "track_running_stats", False)  # noqa: B010
                for norm in local:  # an instance attribute: nn.Module.__call__ calls it
                    stack.enter_context(_instance_attribute(norm, "forward", _local_forward(norm)))
            yield model
        finally:
            for module, mode in modes:
                module.training = mode
            for norm, tracked in tracking:
                setattr(norm, "track_running_stats", tracked)  # noqa: B010 (typed Tensor | Module)
            for p, g, flag in zip(params, grads, flags, strict=True):
                if p.requires_grad != flag:
                    p.requires_grad_(flag)
                p.grad = g
            with torch.no_grad():
                for buffer, saved in buffers:
                    buffer.copy_(saved)
