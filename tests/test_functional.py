"""The one-call API: ``hessian_eigenvalues`` / ``hessian_trace`` against the dense Hessian, and
the guarantee that a probe leaves the model, its gradients and every RNG untouched."""

from __future__ import annotations

import copy
import functools
import math
import random
import re
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_landscape import hessian_eigenvalues, hessian_trace
from lightning_landscape.operators import LossFn
from tests._models import (
    KINDS,
    batch_statistics_twin,
    classification_loss,
    cnn_batch,
    dense_hessian,
    make_model,
    mlp_batch,
)

F64 = torch.float64


@functools.cache
def _spectrum(kind: str) -> tuple[Tensor, Tensor]:
    """(eigenvalues ascending, eigenvectors) of the dense Hessian of ``make_model(kind)``."""
    model, loss_fn, batch = make_model(kind)
    return torch.linalg.eigh(dense_hessian(model, loss_fn, batch).detach())


@functools.cache
def _dense(kind: str) -> Tensor:
    model, loss_fn, batch = make_model(kind)
    return dense_hessian(model, loss_fn, batch).detach()


def _expected(kind: str, k: int, which: str) -> Tensor:
    values = _spectrum(kind)[0]
    return values.flip(0)[:k] if which == "largest" else values[:k]


def _assert_eigenvalues_close(actual: Tensor, expected: Tensor, scale: float) -> None:
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-9 * scale)


# --------------------------------------------------------------------------------------------------
# Accuracy
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_basis", [30, None], ids=["basis30", "default"])
@pytest.mark.parametrize("which", ["largest", "smallest"])
@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("kind", KINDS)
def test_eigenvalues_match_dense_hessian(
    kind: str, k: int, which: str, max_basis: int | None
) -> None:
    model, loss_fn, batch = make_model(kind)
    values = _spectrum(kind)[0]
    n = values.numel()
    res = hessian_eigenvalues(model, loss_fn, batch, k, tol=1e-10, which=which, max_basis=max_basis)
    assert res.all_converged
    assert res.which == which
    assert res.num_hvps < n  # the Lanczos path, not a dense solve
    assert res.eigenvectors is None  # not requested
    _assert_eigenvalues_close(res.eigenvalues, _expected(kind, k, which), float(values.abs().max()))


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_micro_batches_and_a_byte_bounded_basis_give_the_same_eigenvalues(kind: str) -> None:
    """The memory caps change how the products are computed, not the Hessian."""
    model, loss_fn, batch = make_model(kind)
    values = _spectrum(kind)[0]
    vector = values.numel() * next(model.parameters()).dtype.itemsize
    res = hessian_eigenvalues(
        model, loss_fn, batch, 3, tol=1e-10, micro_batch_size=3, max_basis_bytes=9 * vector
    )
    assert res.all_converged
    scale = float(values.abs().max())
    _assert_eigenvalues_close(res.eigenvalues, _expected(kind, 3, "largest"), scale)
    whole = hessian_trace(model, loss_fn, batch, num_hvps=12).trace
    micro = hessian_trace(model, loss_fn, batch, num_hvps=12, micro_batch_size=3).trace
    assert math.isclose(micro, whole, rel_tol=1e-9)  # same random probes, same operator


def test_dense_path_when_max_basis_covers_the_space() -> None:
    model, loss_fn, batch = make_model("mlp")
    values = _spectrum("mlp")[0]
    res = hessian_eigenvalues(model, loss_fn, batch, 3, tol=1e-10, max_basis=1000)
    assert res.num_hvps == values.numel()
    torch.testing.assert_close(res.eigenvalues, values.flip(0)[:3], rtol=1e-10, atol=0)


@pytest.mark.parametrize("which", ["largest", "smallest"])
@pytest.mark.parametrize("kind", KINDS)
def test_eigenvectors_are_hessian_eigenvectors(kind: str, which: str) -> None:
    model, loss_fn, batch = make_model(kind)
    hess = _dense(kind)
    res = hessian_eigenvalues(
        model, loss_fn, batch, 3, tol=1e-10, which=which, return_eigenvectors=True
    )
    v = res.eigenvectors
    assert v is not None and v.shape == (hess.shape[0], 3) and v.dtype == F64
    torch.testing.assert_close(v.norm(dim=0), torch.ones(3, dtype=F64), rtol=0, atol=1e-10)
    torch.testing.assert_close(v.T @ v, torch.eye(3, dtype=F64), rtol=0, atol=1e-10)
    resid = (hess @ v - v * res.eigenvalues).norm(dim=0) / res.eigenvalues.abs()
    assert bool((resid <= 1e-8).all()), resid


def test_warm_start_from_previous_eigenvectors() -> None:
    model, loss_fn, batch = make_model("attention")
    cold = hessian_eigenvalues(model, loss_fn, batch, 2, tol=1e-8, return_eigenvectors=True)
    warm = hessian_eigenvalues(model, loss_fn, batch, 2, tol=1e-8, start=cold.eigenvectors)
    assert warm.num_hvps < cold.num_hvps
    torch.testing.assert_close(warm.eigenvalues, cold.eigenvalues, rtol=1e-7, atol=0)


@pytest.mark.parametrize("route", ["functorch", "double_backward"])
def test_parameter_subset(route: str) -> None:
    model, loss_fn, batch = make_model("cnn")
    names = ["conv.weight", "conv.bias", "bn.weight", "bn.bias"]
    sub = dense_hessian(model, loss_fn, batch, params=names).detach()
    res = hessian_eigenvalues(
        model, loss_fn, batch, 2, tol=1e-10, params=["conv.*", "bn.*"], route=route
    )
    expected = torch.linalg.eigvalsh(sub).flip(0)[:2]
    torch.testing.assert_close(res.eigenvalues.detach(), expected, rtol=1e-8, atol=0)


@pytest.mark.parametrize("route", ["auto", "functorch", "double_backward"])
def test_results_on_a_subset_are_plain_tensors(route: str) -> None:
    model, loss_fn, batch = make_model("mlp")
    res = hessian_eigenvalues(
        model, loss_fn, batch, 2, tol=1e-8, params=["fc3.*"], route=route, return_eigenvectors=True
    )
    assert res.eigenvectors is not None
    assert not res.eigenvalues.requires_grad
    assert not res.eigenvectors.requires_grad
    assert not res.residuals.requires_grad


# --------------------------------------------------------------------------------------------------
# The probe leaves everything as it was
# --------------------------------------------------------------------------------------------------


class _TrainNet(nn.Module):
    """Linear-BatchNorm-Tanh-Dropout-Linear with a frozen first bias."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.bn = nn.BatchNorm1d(8)
        self.drop = nn.Dropout(0.3)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.drop(torch.tanh(self.bn(self.fc1(x)))))


def _train_model() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = _TrainNet().double()
        with torch.no_grad():  # non-trivial running statistics
            for i in range(3):
                model(2.0 * mlp_batch(n=32, seed=100 + i)[0] + 0.5)
    model.fc1.bias.requires_grad_(False)
    model.train()
    # .grad as left by a training step (fc1.bias is frozen: no grad)
    classification_loss(model, mlp_batch(seed=7)).backward()
    return model


def _snapshot(model: nn.Module) -> dict[str, object]:
    return {
        "modes": [m.training for m in model.modules()],
        "grad_ids": [id(p.grad) for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "flags": [p.requires_grad for p in model.parameters()],
        "params": [p.detach().clone() for p in model.parameters()],
        "buffers": [b.clone() for b in model.buffers()],
        "torch_rng": torch.get_rng_state(),
        "py_rng": random.getstate(),
        "np_rng": np.random.get_state(),
    }


def _assert_same(before: dict[str, object], model: nn.Module) -> None:
    after = _snapshot(model)
    assert after["modes"] == before["modes"]
    assert after["grad_ids"] == before["grad_ids"]
    for a, b in zip(after["grads"], before["grads"], strict=True):  # type: ignore[call-overload]
        assert (a is None and b is None) or torch.equal(a, b)
    assert after["flags"] == before["flags"]
    for key in ("params", "buffers"):
        for a, b in zip(after[key], before[key], strict=True):  # type: ignore[call-overload]
            assert torch.equal(a, b), key
    assert torch.equal(after["torch_rng"], before["torch_rng"])  # type: ignore[arg-type]
    assert after["py_rng"] == before["py_rng"]
    np_a, np_b = after["np_rng"], before["np_rng"]
    assert np_a[0] == np_b[0] and np.array_equal(np_a[1], np_b[1])  # type: ignore[index]
    assert tuple(np_a[2:]) == tuple(np_b[2:])  # type: ignore[index]


@pytest.mark.parametrize("route", ["auto", "functorch", "double_backward"])
def test_probe_leaves_model_grads_and_rngs_untouched(route: str) -> None:
    model = _train_model()
    batch = mlp_batch(seed=3)
    torch.manual_seed(11)
    random.seed(11)
    np.random.seed(11)
    before = _snapshot(model)
    assert all(before["modes"])  # type: ignore[arg-type]
    assert model.fc1.bias.grad is None and model.fc1.weight.grad is not None
    res = hessian_eigenvalues(model, classification_loss, batch, 2, tol=1e-10, route=route)
    tr = hessian_trace(model, classification_loss, batch, num_hvps=30, route=route)
    _assert_same(before, model)
    # The probe ran in eval mode (dropout off, BN running statistics), on the trainable params.
    model.eval()
    hess = dense_hessian(model, classification_loss, batch).detach()
    model.train()
    assert hess.shape[0] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    expected = torch.linalg.eigvalsh(hess).flip(0)[:2]
    torch.testing.assert_close(res.eigenvalues, expected, rtol=1e-8, atol=0)
    assert abs(tr.trace - float(torch.trace(hess))) <= 4 * tr.stderr + 1e-9


def test_eval_mode_false_probes_in_current_modes_and_restores_them() -> None:
    model, loss_fn, batch = make_model("mlp")
    model.train()  # MLP dropout is p=0, so train mode is deterministic here
    res = hessian_eigenvalues(model, loss_fn, batch, 1, tol=1e-10, eval_mode=False)
    assert all(m.training for m in model.modules())
    torch.testing.assert_close(res.eigenvalues, _expected("mlp", 1, "largest"), rtol=1e-8, atol=0)


def test_eval_mode_false_leaves_batchnorm_statistics_untouched() -> None:
    model, loss_fn, batch = make_model("cnn")
    model.train()
    before = [b.clone() for b in model.buffers()]
    hessian_eigenvalues(
        model, loss_fn, batch, 1, tol=1e-6, eval_mode=False, route="double_backward"
    )
    for a, b in zip(model.buffers(), before, strict=True):
        assert torch.equal(a, b)


def test_works_inside_inference_mode() -> None:
    model, loss_fn, batch = make_model("cnn")
    reference = hessian_eigenvalues(model, loss_fn, batch, 2, tol=1e-10)
    with torch.inference_mode():
        x, y = cnn_batch()  # inference tensors
        res = hessian_eigenvalues(model, loss_fn, (x, y), 2, tol=1e-10)
        tr = hessian_trace(model, loss_fn, (x, y), num_hvps=3 * 183)
        assert torch.is_inference_mode_enabled()
    assert x.is_inference()
    torch.testing.assert_close(res.eigenvalues, reference.eigenvalues, rtol=1e-10, atol=0)
    assert tr.trace == pytest.approx(float(torch.trace(_dense("cnn"))), rel=1e-8)


def test_works_inside_no_grad() -> None:
    model, loss_fn, batch = make_model("mlp")
    with torch.no_grad():
        res = hessian_eigenvalues(model, loss_fn, batch, 1, tol=1e-10)
        assert not torch.is_grad_enabled()
    torch.testing.assert_close(res.eigenvalues, _expected("mlp", 1, "largest"), rtol=1e-8, atol=0)


@pytest.mark.parametrize("kind", ["mlp", "attention"])
def test_autocast_region_is_ignored_and_left_enabled(kind: str) -> None:
    model, loss_fn, batch = make_model(kind)
    plain = hessian_eigenvalues(model, loss_fn, batch, 2, tol=1e-10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        res = hessian_eigenvalues(model, loss_fn, batch, 2, tol=1e-10)
        tr = hessian_trace(model, loss_fn, batch, num_hvps=30)
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
        # autocast really is active here (so the test could fail)
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    assert res.eigenvalues.dtype == F64
    torch.testing.assert_close(res.eigenvalues, plain.eigenvalues, rtol=1e-12, atol=0)
    torch.testing.assert_close(res.eigenvalues, _expected(kind, 2, "largest"), rtol=1e-8, atol=0)
    assert tr.trace == pytest.approx(
        hessian_trace(model, loss_fn, batch, num_hvps=30).trace, rel=1e-10
    )


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------


def _per_sample_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"k": 0}, ValueError, "k must be a positive integer"),
        ({"k": -1}, ValueError, "k must be a positive integer"),
        ({"tol": 0.0}, ValueError, "tol must be a finite number in \\(0, 1\\)"),
        ({"which": "foo"}, ValueError, "which must be one of"),
        ({"k": 156}, ValueError, re.escape("k <= 155")),
        ({"params": ["encoder.*"]}, ValueError, re.escape("'encoder.*'")),
        ({"params": []}, ValueError, "empty"),
        ({"route": "jacfwd"}, ValueError, "route"),
        ({"loss_fn": _per_sample_loss}, ValueError, "scalar"),
        ({"loss_fn": lambda m, b: 1.0}, TypeError, "Tensor"),
        ({"micro_batch_size": 0}, ValueError, "micro_batch_size"),
        ({"max_basis_bytes": 8}, ValueError, "max_basis_bytes=8 holds 0 vectors"),
        ({"norm_statistics": "train"}, ValueError, "norm_statistics"),
    ],
)
def test_hessian_eigenvalues_errors(kwargs: dict, exc: type, match: str) -> None:  # type: ignore[type-arg]
    model, loss_fn, batch = make_model("mlp")
    model.train()
    args = {"loss_fn": loss_fn, "k": 1, **kwargs}
    loss_fn, k = args.pop("loss_fn"), args.pop("k")
    state = torch.get_rng_state()
    with pytest.raises(exc, match=match):
        hessian_eigenvalues(model, loss_fn, batch, k, **args)
    # Even on error the model and RNG are restored.
    assert all(m.training for m in model.modules())
    assert torch.equal(torch.get_rng_state(), state)


def test_hessian_eigenvalues_no_trainable_parameters() -> None:
    model, loss_fn, batch = make_model("attention")
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="trainable"):
        hessian_eigenvalues(model, loss_fn, batch)
    assert not any(p.requires_grad for p in model.parameters())


def test_k_too_large_for_subset_names_subset_size() -> None:
    model, loss_fn, batch = make_model("mlp")
    with pytest.raises(ValueError, match=re.escape("k <= 27")):  # fc3: 8*3 + 3
        hessian_eigenvalues(model, loss_fn, batch, 28, params=["fc3.*"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_hvps": 2}, "num_hvps"),
        ({"params": ["nope"]}, "'nope'"),
        ({"loss_fn": _per_sample_loss}, "scalar"),
        ({"norm_statistics": "train"}, "norm_statistics"),
    ],
)
def test_hessian_trace_errors(kwargs: dict, match: str) -> None:  # type: ignore[type-arg]
    model, loss_fn, batch = make_model("mlp")
    args = {"loss_fn": loss_fn, **kwargs}
    loss_fn = args.pop("loss_fn")
    with pytest.raises(ValueError, match=match):
        hessian_trace(model, loss_fn, batch, **args)


# --------------------------------------------------------------------------------------------------
# BatchNorm: running or batch statistics
# --------------------------------------------------------------------------------------------------


def _batch_statistics_hessian(
    model: nn.Module, loss_fn: LossFn, batch: tuple[Tensor, Tensor]
) -> Tensor:
    """Dense Hessian with every BatchNorm normalising ``batch`` with its own statistics."""
    return dense_hessian(batch_statistics_twin(model), loss_fn, batch).detach()


def test_batch_statistics_give_the_training_hessian() -> None:
    model, loss_fn, batch = make_model("cnn")
    buffers = [b.clone() for b in model.buffers()]
    top = torch.linalg.eigvalsh(_batch_statistics_hessian(model, loss_fn, batch)).flip(0)[:2]
    res = hessian_eigenvalues(model, loss_fn, batch, 2, tol=1e-10, norm_statistics="batch")
    torch.testing.assert_close(res.eigenvalues, top, rtol=1e-8, atol=0)
    # The default measures the running statistics' Hessian, which differs on this model.
    running = hessian_eigenvalues(model, loss_fn, batch, 2, tol=1e-10)
    torch.testing.assert_close(
        running.eigenvalues, _expected("cnn", 2, "largest"), rtol=1e-8, atol=0
    )
    assert not torch.allclose(running.eigenvalues, top, rtol=1e-3)
    assert not any(m.training for m in model.modules())  # modes and statistics left alone
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), buffers, strict=True))
    assert all(m.track_running_stats for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def test_batch_statistics_with_micro_batches_average_their_hessians() -> None:
    model, loss_fn, (x, y) = make_model("cnn")
    halves = [(x[:8], y[:8]), (x[8:], y[8:])]
    dense = sum(_batch_statistics_hessian(model, loss_fn, h) for h in halves) / 2
    assert isinstance(dense, Tensor)
    top = torch.linalg.eigvalsh(dense).flip(0)[:1]
    res = hessian_eigenvalues(
        model, loss_fn, (x, y), 1, tol=1e-10, norm_statistics="batch", micro_batch_size=8
    )
    torch.testing.assert_close(res.eigenvalues, top, rtol=1e-8, atol=0)
    buffers = [b.clone() for b in model.buffers()]
    tr = hessian_trace(
        model, loss_fn, (x, y), num_hvps=60, norm_statistics="batch", micro_batch_size=8
    )
    assert abs(tr.trace - float(torch.trace(dense))) <= 4 * tr.stderr + 1e-9
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), buffers, strict=True))


def test_batch_statistics_keep_two_samples_in_the_last_micro_batch() -> None:
    # BatchNorm1d in train mode refuses a one-sample batch: 5 samples in micro-batches of 2 are
    # normalised as 2 + 3, not 2 + 2 + 1.
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2))
    model = model.to(F64).eval()
    x, y = torch.randn(5, 3, generator=gen, dtype=F64), torch.tensor([0, 1, 1, 0, 1])
    loss_fn = classification_loss
    pieces = [(x[:2], y[:2]), (x[2:], y[2:])]
    dense = sum(
        n / 5 * _batch_statistics_hessian(model, loss_fn, p)
        for n, p in zip((2, 3), pieces, strict=True)
    )
    assert isinstance(dense, Tensor)
    res = hessian_eigenvalues(
        model, loss_fn, (x, y), 1, tol=1e-10, norm_statistics="batch", micro_batch_size=2
    )
    torch.testing.assert_close(
        res.eigenvalues, torch.linalg.eigvalsh(dense).flip(0)[:1], rtol=1e-8, atol=0
    )


def test_sync_batchnorm_takes_each_ranks_own_statistics(
    as_two_ranks: Callable[[], None],
) -> None:
    # PyTorch cannot differentiate SyncBatchNorm's synchronised forward twice (pytorch#61222),
    # so with batch statistics each rank's batch is normalised on its own, as BatchNorm under
    # DDP: the Hessian is the plain BatchNorm model's.
    model, loss_fn, batch = make_model("cnn")
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))
    as_two_ranks()
    with pytest.raises(ValueError, match="expected input tensor to be on GPU"):
        synced.train()(batch[0])  # what training's forward would do on this CPU
    synced.eval()
    top = torch.linalg.eigvalsh(_batch_statistics_hessian(model, loss_fn, batch)).flip(0)[:2]
    res = hessian_eigenvalues(
        synced, loss_fn, batch, 2, tol=1e-10, norm_statistics="batch", distributed=False
    )
    torch.testing.assert_close(res.eigenvalues, top, rtol=1e-8, atol=0)
    layers = [m for m in synced.modules() if isinstance(m, nn.SyncBatchNorm)]
    assert layers and all("forward" not in m.__dict__ for m in layers)  # restored
    assert all(m.track_running_stats and not m.training for m in layers)
    # The running statistics' Hessian (eval mode) needs no synchronisation and is left as is.
    running = hessian_eigenvalues(synced, loss_fn, batch, 2, tol=1e-10, distributed=False)
    torch.testing.assert_close(
        running.eigenvalues, _expected("cnn", 2, "largest"), rtol=1e-8, atol=0
    )


def test_sync_batchnorm_inside_the_context() -> None:
    # Patched whenever it normalises with batch statistics (in an initialised group of any size
    # its train-mode forward refuses CPU inputs), with one callable kept across probes (a new one
    # made a compiled product recompile), and in a nested eval-mode context (Δ₂'s) on its
    # running statistics, as BatchNorm.
    from lightning_landscape import curvature_context

    model, _, (x, _) = make_model("cnn")
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))
    bn = next(m for m in synced.modules() if isinstance(m, nn.SyncBatchNorm))
    twin = batch_statistics_twin(model)
    seen = []
    for _ in range(2):
        with curvature_context(synced, norm_statistics="batch"):
            seen.append(bn.forward)
            with torch.no_grad():
                torch.testing.assert_close(synced(x), twin(x), rtol=0, atol=0)
                with curvature_context(synced):  # nested, eval mode
                    torch.testing.assert_close(synced(x), model(x), rtol=0, atol=0)
        assert "forward" not in bn.__dict__
    assert seen[0] is seen[1]


def test_batch_statistics_inside_a_batch_statistics_context() -> None:
    # The outer context has switched tracking off; the inner one must still find the layers
    # (not fall back to their running statistics) and leave the outer state as it found it.
    from lightning_landscape import curvature_context

    model, loss_fn, batch = make_model("cnn")
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    flat = hessian_eigenvalues(model, loss_fn, batch, 2, tol=1e-10, norm_statistics="batch")
    with curvature_context(model, norm_statistics="batch"):
        nested = hessian_eigenvalues(model, loss_fn, batch, 2, tol=1e-10, norm_statistics="batch")
        assert all(m.training and not m.track_running_stats for m in bns)
    torch.testing.assert_close(nested.eigenvalues, flat.eigenvalues, rtol=1e-10, atol=0)
    assert all(not m.training and m.track_running_stats for m in bns)


def test_batch_statistics_need_eval_mode_where_there_is_batchnorm() -> None:
    model, loss_fn, batch = make_model("cnn")
    with pytest.raises(ValueError, match="eval_mode=True"):
        hessian_eigenvalues(model, loss_fn, batch, 1, norm_statistics="batch", eval_mode=False)
    mlp, mlp_loss, mlp_data = make_model("mlp")  # no normalisation layers: nothing to switch
    res = hessian_eigenvalues(mlp, mlp_loss, mlp_data, 1, tol=1e-10, norm_statistics="batch")
    torch.testing.assert_close(res.eigenvalues, _expected("mlp", 1, "largest"), rtol=1e-8, atol=0)
