"""The curvature context: a deterministic, side-effect-free environment for probes.

Inside :func:`curvature_context` the model is in ``eval()`` mode (no dropout, BatchNorm uses its
running statistics, so the Hessian does not depend on the probe's batch composition), autocast is
off, PyTorch's math SDPA backend is forced (fused attention kernels have no double backward), and
gradients are enabled even inside ``torch.inference_mode``. On exit everything a training step can
observe is restored exactly: per-module train/eval modes, CPU and CUDA RNG states (plus Python's
``random`` and NumPy's global RNG), ``.grad`` tensors (inside the context ``.grad`` is ``None``, so
a ``backward()`` there cannot accumulate into the training gradients), ``requires_grad`` flags,
and, when probing in train mode, the module buffers (BatchNorm running statistics). Probes never
touch optimizer state.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn


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


def _sdpa_math() -> contextlib.AbstractContextManager[Any]:
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - torch < 2.3
        return contextlib.nullcontext()
    return sdpa_kernel(SDPBackend.MATH)


@contextlib.contextmanager
def curvature_context(model: nn.Module, *, eval_mode: bool = True) -> Iterator[nn.Module]:
    """Run curvature probes on ``model`` without changing anything training can observe.

    Args:
        model: the module to probe.
        eval_mode: put every submodule in ``eval()`` for the probe (recommended: dropout off,
            BatchNorm on running statistics). With ``False`` the modes are left as they are (and
            still restored afterwards), and the buffers are copied and restored on exit, since a
            train-mode forward pass updates BatchNorm running statistics.

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
    modes = [(m, m.training) for m in model.modules()]
    params = list(model.parameters())
    grads = [p.grad for p in params]
    flags = [p.requires_grad for p in params]
    # In train mode a forward pass may update buffers (BatchNorm running statistics): keep copies.
    buffers = [] if eval_mode else [(b, b.detach().clone()) for b in model.buffers()]
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
        try:
            if eval_mode:
                model.eval()
            yield model
        finally:
            for module, mode in modes:
                module.training = mode
            for p, g, flag in zip(params, grads, flags, strict=True):
                if p.requires_grad != flag:
                    p.requires_grad_(flag)
                p.grad = g
            with torch.no_grad():
                for buffer, saved in buffers:
                    buffer.copy_(saved)
