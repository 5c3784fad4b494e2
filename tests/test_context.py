"""``curvature_context`` and ``fork_rng``: what a probe may change, and what is restored."""

from __future__ import annotations

import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from lightning_landscape import curvature_context, fork_rng


def _mixed_model() -> nn.Module:
    """Nested modules, some in train and some in eval mode."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 6),
        nn.BatchNorm1d(6),
        nn.Dropout(0.5),
        nn.Sequential(nn.Linear(6, 6), nn.Dropout(0.2), nn.LayerNorm(6)),
        nn.Linear(6, 2),
    ).double()
    model.train()
    model[1].eval()
    model[3][1].eval()
    model[3].eval()  # the container is in eval, its children are not all
    model[3][2].train()
    return model


def _modes(model: nn.Module) -> list[bool]:
    return [m.training for m in model.modules()]


def _rng_states() -> tuple[Tensor, object, tuple]:  # type: ignore[type-arg]
    return torch.get_rng_state(), random.getstate(), np.random.get_state()


def _assert_rng_states(states: tuple[Tensor, object, tuple]) -> None:  # type: ignore[type-arg]
    torch_state, py_state, np_state = states
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert random.getstate() == py_state
    now = np.random.get_state()
    assert now[0] == np_state[0] and np.array_equal(now[1], np_state[1])
    assert tuple(now[2:]) == tuple(np_state[2:])


def _consume_rngs() -> None:
    torch.rand(3)
    random.random()
    np.random.rand(3)


# --------------------------------------------------------------------------------------------------
# Modes
# --------------------------------------------------------------------------------------------------


def test_eval_inside_and_per_module_modes_restored() -> None:
    model = _mixed_model()
    before = _modes(model)
    assert len(set(before)) == 2  # really mixed
    with curvature_context(model) as probed:
        assert probed is model
        assert not any(_modes(model))
        model[2].train()  # the body may change modes: they are still restored
    assert _modes(model) == before


def test_eval_mode_false_keeps_modes_inside_and_restores_changes() -> None:
    model = _mixed_model()
    before = _modes(model)
    with curvature_context(model, eval_mode=False):
        assert _modes(model) == before
        model.eval()
    assert _modes(model) == before


def test_modes_restored_when_the_body_raises() -> None:
    model = _mixed_model()
    before = _modes(model)
    with pytest.raises(RuntimeError, match="boom"), curvature_context(model):
        raise RuntimeError("boom")
    assert _modes(model) == before


def test_dropout_is_off_inside() -> None:
    model = _mixed_model()
    x = torch.randn(8, 4, dtype=torch.float64)
    with curvature_context(model):
        out1, out2 = model(x), model(x)
    torch.testing.assert_close(out1, out2, rtol=0, atol=0)
    assert not torch.equal(model(x), model(x))  # train mode again: dropout is active


# --------------------------------------------------------------------------------------------------
# RNG
# --------------------------------------------------------------------------------------------------


def test_rngs_restored() -> None:
    model = _mixed_model()
    states = _rng_states()
    with curvature_context(model):
        _consume_rngs()
    _assert_rng_states(states)


def test_rngs_restored_when_the_body_raises() -> None:
    model = _mixed_model()
    states = _rng_states()
    with pytest.raises(ValueError, match="inside"), curvature_context(model):
        _consume_rngs()
        raise ValueError("inside")
    _assert_rng_states(states)


def test_fork_rng_restores_states() -> None:
    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    states = _rng_states()
    expected = (torch.rand(2), random.random(), np.random.rand())
    torch.set_rng_state(states[0])
    random.setstate(states[1])  # type: ignore[arg-type]
    np.random.set_state(states[2])
    with fork_rng():
        _consume_rngs()
        torch.manual_seed(99)
    _assert_rng_states(states)
    # The streams continue exactly as if nothing had happened.
    assert torch.equal(torch.rand(2), expected[0])
    assert random.random() == expected[1]
    assert np.random.rand() == expected[2]


def test_fork_rng_restores_states_on_error() -> None:
    states = _rng_states()
    with pytest.raises(KeyError), fork_rng():
        _consume_rngs()
        raise KeyError("x")
    _assert_rng_states(states)


def test_fork_rng_nested() -> None:
    states = _rng_states()
    with fork_rng():
        _consume_rngs()
        inner = _rng_states()
        with fork_rng():
            _consume_rngs()
        _assert_rng_states(inner)
        _consume_rngs()
    _assert_rng_states(states)


# --------------------------------------------------------------------------------------------------
# Grad mode, inference mode, autocast, SDPA backend
# --------------------------------------------------------------------------------------------------


def _grad_works(model: nn.Module) -> None:
    x = torch.randn(5, 4, dtype=torch.float64)
    loss = model(x).square().mean()
    assert loss.requires_grad
    (g,) = torch.autograd.grad(loss, [model[0].weight])
    assert g.shape == model[0].weight.shape


def test_grad_enabled_inside_no_grad() -> None:
    model = _mixed_model()
    with torch.no_grad():
        with curvature_context(model):
            assert torch.is_grad_enabled()
            _grad_works(model)
        assert not torch.is_grad_enabled()


def test_grad_enabled_inside_inference_mode() -> None:
    model = _mixed_model()
    with torch.inference_mode():
        with curvature_context(model):
            assert not torch.is_inference_mode_enabled()
            assert torch.is_grad_enabled()
            _grad_works(model)
        assert torch.is_inference_mode_enabled()
        assert not torch.is_grad_enabled()


def test_autocast_disabled_inside_an_autocast_region() -> None:
    model = _mixed_model()
    a = torch.ones(3, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (a @ a).dtype == torch.bfloat16
        with curvature_context(model):
            assert not torch.is_autocast_enabled("cpu")
            assert (a @ a).dtype == torch.float32
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert (a @ a).dtype == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")


def test_math_sdpa_backend_forced_inside_and_restored() -> None:
    model = _mixed_model()
    before = (
        torch.backends.cuda.flash_sdp_enabled(),
        torch.backends.cuda.mem_efficient_sdp_enabled(),
        torch.backends.cuda.math_sdp_enabled(),
    )
    with curvature_context(model):
        assert torch.backends.cuda.math_sdp_enabled()
        assert not torch.backends.cuda.flash_sdp_enabled()
        assert not torch.backends.cuda.mem_efficient_sdp_enabled()
    after = (
        torch.backends.cuda.flash_sdp_enabled(),
        torch.backends.cuda.mem_efficient_sdp_enabled(),
        torch.backends.cuda.math_sdp_enabled(),
    )
    assert after == before


_PRECISION_CHECK = """
import torch
from torch import nn
from lightning_landscape import curvature_context
from lightning_landscape.context import _precision_knobs

def legacy():
    out = []
    for get in (lambda: torch.backends.cuda.matmul.allow_tf32,
                lambda: torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision):
        try:
            out.append(get())
        except RuntimeError:  # the user mixed the legacy and the new API
            out.append("mixed")
    return out

knobs = _precision_knobs()
assert len(knobs) >= 2, knobs  # cuda.matmul and cudnn.conv at least
model = nn.Linear(2, 2)
settings = [
    lambda: None,  # PyTorch's defaults: TF32 for cuDNN convolutions
    lambda: torch.set_float32_matmul_precision("high"),  # the legacy API, as Lightning suggests
    lambda: setattr(torch.backends.cuda.matmul, "fp32_precision", "tf32"),  # the new API
]
for setting in settings:  # in this order: once the new API is used, legacy reads fail (sticky)
    setting()
    before = [k.fp32_precision for k in knobs], legacy()
    assert "tf32" in before[0], before
    for raising in (False, True):
        try:
            with curvature_context(model):
                assert [k.fp32_precision for k in knobs] == ["ieee"] * len(knobs)
                if raising:
                    raise KeyError
        except KeyError:
            pass
        assert ([k.fp32_precision for k in knobs], legacy()) == before, before
    print(before)
# A backend-wide setting reaches every knob that inherits it, after a probe as without one.
torch.backends.fp32_precision = "tf32"
with curvature_context(model):
    pass
torch.backends.fp32_precision = "ieee"
assert [k.fp32_precision for k in knobs] == ["ieee"] * len(knobs)
print("OK")
"""


def test_full_float32_inside_and_every_setting_restored() -> None:
    """No TF32 in probes; settings made through either API read back as they were afterwards.

    In a fresh process: mixing PyTorch's legacy and new precision APIs is sticky.
    """
    if not hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        pytest.skip("PyTorch < 2.9 has only the legacy allow_tf32 flags")
    done = subprocess.run(
        [sys.executable, "-c", _PRECISION_CHECK],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.rstrip().endswith("OK"), done.stdout
    assert done.stdout.count("tf32") >= 3, done.stdout


# --------------------------------------------------------------------------------------------------
# .grad and requires_grad
# --------------------------------------------------------------------------------------------------


def _with_grads(model: nn.Module) -> None:
    """Leave .grad as a training step would, with one frozen parameter (no grad)."""
    model[4].bias.requires_grad_(False)
    model(torch.randn(5, 4, dtype=torch.float64)).sum().backward()
    assert model[4].bias.grad is None


@pytest.mark.parametrize("raise_inside", [False, True])
def test_grad_and_requires_grad_reassignments_restored(raise_inside: bool) -> None:
    model = _mixed_model()
    _with_grads(model)
    params = list(model.parameters())
    grads = [p.grad for p in params]
    values = [None if g is None else g.clone() for g in grads]
    flags = [p.requires_grad for p in params]
    try:
        with curvature_context(model):
            model[0].weight.grad = None
            model[0].bias.grad = torch.ones_like(model[0].bias)
            model[4].bias.grad = torch.ones_like(model[4].bias)  # was None
            model[0].weight.requires_grad_(False)
            model[4].bias.requires_grad_(True)  # was frozen
            for p in model[3].parameters():
                p.requires_grad_(False)
            if raise_inside:
                raise RuntimeError("inside")
    except RuntimeError:
        assert raise_inside
    assert [p.requires_grad for p in params] == flags
    for p, g, v in zip(params, grads, values, strict=True):
        assert p.grad is g
        assert (g is None and v is None) or torch.equal(p.grad, v)


def test_grad_values_restored_after_backward_inside() -> None:
    model = _mixed_model()
    _with_grads(model)
    before = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    with curvature_context(model):
        model(torch.randn(5, 4, dtype=torch.float64)).sum().backward()
    for p, v in zip(model.parameters(), before, strict=True):
        assert (p.grad is None and v is None) or torch.equal(p.grad, v)


def test_parameters_are_not_copied_or_replaced() -> None:
    model = _mixed_model()
    ids = [id(p) for p in model.parameters()]
    with curvature_context(model):
        assert [id(p) for p in model.parameters()] == ids
    assert [id(p) for p in model.parameters()] == ids
