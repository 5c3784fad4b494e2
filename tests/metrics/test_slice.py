"""Loss-surface slices and linear mode connectivity against closed forms."""

from __future__ import annotations

import copy
import io
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from lightning_landscape import curvature_context, hessian_eigenvalues
from lightning_landscape.metrics import (
    linear_interpolation,
    loss_slice,
    mode_connectivity,
)
from lightning_landscape.report.figures import connectivity_figure, slice_figure
from tests._models import batch_statistics_twin, make_model

# --------------------------------------------------------------------------------------------------
# An exact quadratic bowl: least squares with a bias, float64
# --------------------------------------------------------------------------------------------------


def _least_squares(seed: int = 0) -> tuple[nn.Module, Any, tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(20, 4, generator=gen, dtype=torch.float64)
    y = torch.randn(20, generator=gen, dtype=torch.float64)
    model = nn.Linear(4, 1).to(torch.float64)
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, 4, generator=gen, dtype=torch.float64))
        model.bias.copy_(torch.randn(1, generator=gen, dtype=torch.float64))

    def loss_fn(m: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        xb, yb = batch
        return 0.5 * ((m(xb).squeeze(-1) - yb) ** 2).mean()

    return model, loss_fn, (x, y)


def _quadratic(model: nn.Module, batch: tuple[Tensor, Tensor]) -> tuple[float, Tensor, Tensor]:
    """``(L0, g, H)`` of ½ mean (Zθ − y)² with ``Z = [X, 1]``, ``θ = [weight, bias]``."""
    x, y = batch
    z = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    theta = torch.cat([model.weight.detach().reshape(-1), model.bias.detach()])
    r = z @ theta - y
    return float(0.5 * (r @ r) / len(x)), z.T @ r / len(x), z.T @ z / len(x)


def _snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_state(model: nn.Module, before: dict[str, Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), k


# --------------------------------------------------------------------------------------------------
# Slices
# --------------------------------------------------------------------------------------------------


def test_eigen_slice_is_exact_quadratic() -> None:
    model, loss_fn, batch = _least_squares()
    l0, g, h = _quadratic(model, batch)
    top = torch.linalg.eigvalsh(h).flip(0)
    r1 = loss_slice(model, loss_fn, batch, directions="eigen", steps=11, span=0.7)
    assert r1.directions == "eigen" and r1.dims == 1 and r1.converged
    assert r1.num_evals == 12 and r1.num_hvps > 0
    assert float(r1.eigenvalues[0]) == pytest.approx(float(top[0]), rel=1e-10)  # type: ignore[index]
    u, lam = r1.vectors[0], float(top[0])
    assert float(u.norm()) == pytest.approx(1.0, abs=1e-12)
    expected = l0 + r1.coords * float(g @ u) + 0.5 * r1.coords**2 * lam
    torch.testing.assert_close(r1.losses, expected, rtol=0, atol=1e-10)
    assert r1.center_loss == pytest.approx(l0, abs=1e-14)

    r2 = loss_slice(model, loss_fn, batch, directions="eigen", dims=2, steps=5, span=0.3)
    u1, u2 = r2.vectors
    a, b = torch.meshgrid(r2.coords, r2.coords, indexing="ij")  # losses[i, j]: a_i, b_j
    expected2 = l0 + a * float(g @ u1) + b * float(g @ u2)
    expected2 = expected2 + 0.5 * (a**2 * float(top[0]) + b**2 * float(top[1]))
    assert r2.losses.shape == (5, 5)
    torch.testing.assert_close(r2.losses, expected2, rtol=0, atol=1e-10)
    assert abs(r2.direction_cosine or 0.0) < 1e-10


def test_random_plane_matches_closed_form_with_returned_directions() -> None:
    model, loss_fn, batch = _least_squares()
    l0, g, h = _quadratic(model, batch)
    r = loss_slice(model, loss_fn, batch, dims=2, steps=7, span=0.5, seed=3)
    assert r.directions == "random" and r.normalization == "filter" and r.eigenvalues is None
    d1, d2 = r.vectors
    assert d1[4] == 0 and d2[4] == 0  # bias ignored (Li et al. "biasbn")
    w_norm = float(model.weight.detach().norm())  # Linear(4, 1): a single filter
    assert float(d1[:4].norm()) == pytest.approx(w_norm, rel=1e-12)
    for i, a in enumerate(r.coords.tolist()):
        for j, b in enumerate(r.coords.tolist()):
            delta = a * d1 + b * d2
            want = l0 + float(g @ delta) + 0.5 * float(delta @ h @ delta)
            assert abs(float(r.losses[i, j]) - want) < 1e-12, (i, j)
    again = loss_slice(model, loss_fn, batch, dims=2, steps=2, seed=3)
    assert torch.equal(again.vectors, r.vectors)  # reproducible from the seed
    other = loss_slice(model, loss_fn, batch, dims=2, steps=2, seed=4)
    assert not torch.equal(other.vectors, r.vectors)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_filter_normalisation(kind: str) -> None:
    model, loss_fn, batch = make_model(kind)
    params = list(model.parameters())
    numels = [p.numel() for p in params]

    def pieces(norm: str, ignore: bool) -> list[Tensor]:
        r = loss_slice(
            model,
            loss_fn,
            batch,
            steps=2,
            normalization=norm,
            ignore_biases_and_norms=ignore,  # type: ignore[arg-type]
        )
        return [
            d.view_as(p) for d, p in zip(torch.split(r.vectors[0], numels), params, strict=True)
        ]

    for p, d in zip(params, pieces("filter", True), strict=True):
        if p.ndim >= 2:
            want = p.detach().flatten(1).norm(dim=1)
            torch.testing.assert_close(d.flatten(1).norm(dim=1), want, rtol=1e-12, atol=0)
        else:
            assert torch.count_nonzero(d) == 0
    for p, d in zip(params, pieces("filter", False), strict=True):
        if p.ndim == 1:  # one block
            assert float(d.norm()) == pytest.approx(float(p.detach().norm()), rel=1e-12)
    for p, d in zip(params, pieces("layer", False), strict=True):
        assert float(d.norm()) == pytest.approx(float(p.detach().norm()), rel=1e-12)
    none = pieces("none", True)
    assert float(torch.cat([d.reshape(-1) for d in none]).norm()) == pytest.approx(1.0)
    assert all(
        torch.count_nonzero(d) == 0 for d, p in zip(none, params, strict=True) if p.ndim == 1
    )


def test_slices_leave_model_grads_modes_rng_untouched() -> None:
    model, loss_fn, batch = make_model("cnn")
    model.train()
    model.fc.eval()
    grads = [torch.full_like(p, 0.5) for p in model.parameters()]
    for p, g in zip(model.parameters(), grads, strict=True):
        p.grad = g
    modes = [m.training for m in model.modules()]
    before, rng = _snapshot(model), torch.get_rng_state()
    loss_slice(model, loss_fn, batch, dims=2, steps=3)
    loss_slice(model, loss_fn, batch, directions="eigen", dims=2, steps=3, tol=1e-3)
    loss_slice(model, loss_fn, batch, steps=3, eval_mode=False)  # BN updates its stats
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.conv.weight.add_(0.1)
        other.bn.running_mean.add_(1.0)
    mode_connectivity(model, model.state_dict(), other.state_dict(), loss_fn, batch, steps=3)
    mode_connectivity(model, other.state_dict(), other.state_dict(), loss_fn, batch, steps=3)
    _assert_same_state(model, before)
    assert torch.equal(torch.get_rng_state(), rng)
    assert [m.training for m in model.modules()] == modes
    assert all(p.grad is g for p, g in zip(model.parameters(), grads, strict=True))


def test_weights_restored_when_the_loss_raises() -> None:
    model, loss_fn, batch = make_model("mlp")
    before, calls = _snapshot(model), [0]

    def flaky(m: nn.Module, b: Any) -> Tensor:
        calls[0] += 1
        if calls[0] == 4:
            raise RuntimeError("boom")
        return loss_fn(m, b)

    with pytest.raises(RuntimeError, match="boom"):
        loss_slice(model, flaky, batch, steps=5)
    _assert_same_state(model, before)
    calls[0] = 0
    other = make_model("mlp", seed=1)[0]
    with pytest.raises(RuntimeError, match="boom"):
        mode_connectivity(model, other.state_dict(), before, flaky, batch, steps=5)
    _assert_same_state(model, before)


def test_explicit_directions() -> None:
    model, loss_fn, batch = _least_squares()
    l0, g, h = _quadratic(model, batch)
    dirs = torch.eye(5, dtype=torch.float64)[:2]
    r = loss_slice(model, loss_fn, batch, directions=dirs, steps=3)
    assert r.directions == "explicit" and r.dims == 2 and r.normalization is None
    want = l0 + float(g[1]) + 0.5 * float(h[1, 1])  # a = 0, b = +1: along e₂
    assert float(r.losses[1, 2]) == pytest.approx(want, abs=1e-12)
    with pytest.raises(ValueError, match="dims=1 but 2"):
        loss_slice(model, loss_fn, batch, directions=dirs, dims=1)
    with pytest.raises(ValueError, match="has 4 entries"):
        loss_slice(model, loss_fn, batch, directions=[torch.ones(4)])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dims": 3}, "dims must be one of \\(1, 2\\)"),
        ({"dims": 0}, "dims must be one of \\(1, 2\\)"),
        ({"steps": 1}, "steps must be"),
        ({"steps": 2.5}, "steps must be"),
        ({"span": 0.0}, "span must be"),
        ({"span": -1.0}, "span must be"),
        ({"span": float("nan")}, "span must be"),
        ({"directions": "pca"}, "directions must be"),
        ({"directions": 7}, "directions must be"),
        ({"normalization": "weight"}, "normalization must be"),
    ],
)
def test_bad_slice_arguments(kwargs: dict[str, Any], match: str) -> None:
    model, loss_fn, batch = _least_squares()
    with pytest.raises(ValueError, match=match):
        loss_slice(model, loss_fn, batch, **kwargs)


def test_all_ignored_direction_is_an_error() -> None:
    model, loss_fn, batch = _least_squares()
    with pytest.raises(ValueError, match="direction is zero"):
        loss_slice(model, loss_fn, batch, params=["bias"])


# --------------------------------------------------------------------------------------------------
# Linear mode connectivity
# --------------------------------------------------------------------------------------------------


def test_identical_checkpoints_have_zero_barrier() -> None:
    model, loss_fn, batch = make_model("cnn")
    state = _snapshot(model)
    r = mode_connectivity(model, state, state, loss_fn, batch, steps=7)
    loss = float(loss_fn(model, batch).detach())
    assert r.barrier == 0.0 and r.barrier_t == 0.0 and r.num_evals == 7
    assert torch.equal(r.losses, torch.full((7,), loss, dtype=torch.float64))
    assert linear_interpolation(model, model, loss_fn, batch, steps=5).barrier == 0.0


def test_endpoints_are_the_two_models_losses() -> None:
    model_a, loss_fn, batch = make_model("mlp", seed=0)
    model_b = make_model("mlp", seed=1)[0]
    before_a, before_b = _snapshot(model_a), _snapshot(model_b)
    r = linear_interpolation(model_a, model_b, loss_fn, batch, steps=6)
    with torch.no_grad():
        assert r.loss_a == float(loss_fn(model_a, batch))
        assert r.loss_b == float(loss_fn(model_b, batch))
    assert r.losses[0] == r.loss_a and r.losses[-1] == r.loss_b
    torch.testing.assert_close(r.ts, torch.linspace(0, 1, 6, dtype=torch.float64))
    _assert_same_state(model_a, before_a)
    _assert_same_state(model_b, before_b)
    carrier = make_model("mlp", seed=5)[0]  # state dicts that do not alias the carrier
    detached = mode_connectivity(carrier, before_a, before_b, loss_fn, batch, steps=6)
    assert torch.equal(detached.losses, r.losses)
    assert bool((r.losses[1:-1] != r.losses[0]).all())


def test_convex_loss_has_no_barrier() -> None:
    model, loss_fn, batch = _least_squares(0)
    other = _least_squares(1)[0]
    r = mode_connectivity(model, model.state_dict(), other.state_dict(), loss_fn, batch)
    assert r.barrier <= 1e-12
    assert float(r.excess.max()) <= 1e-12 and float(r.excess[10]) < -1e-3  # strictly below
    torch.testing.assert_close(r.baseline[[0, -1]], r.losses[[0, -1]], rtol=0, atol=0)


def _trained_mlp() -> tuple[nn.Module, Any, Any]:
    model, loss_fn, batch = make_model("mlp", seed=2)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(150):
        opt.zero_grad()
        loss_fn(model, batch).backward()
        opt.step()
    return model, loss_fn, batch


def test_permuted_hidden_units_give_a_positive_barrier() -> None:
    model, loss_fn, batch = _trained_mlp()
    perm1 = torch.roll(torch.arange(8), 3)
    perm2 = torch.flip(torch.arange(8), [0])
    permuted = copy.deepcopy(model)
    with torch.no_grad():  # same function, different point in weight space
        permuted.fc1.weight.copy_(model.fc1.weight[perm1])
        permuted.fc1.bias.copy_(model.fc1.bias[perm1])
        permuted.fc2.weight.copy_(model.fc2.weight[perm2][:, perm1])
        permuted.fc2.bias.copy_(model.fc2.bias[perm2])
        permuted.fc3.weight.copy_(model.fc3.weight[:, perm2])
    r = linear_interpolation(model, permuted, loss_fn, batch)
    assert r.loss_a < 0.3 and abs(r.loss_a - r.loss_b) < 1e-12
    assert r.barrier > 0.05 and 0.0 < r.barrier_t < 1.0
    assert r.barrier == pytest.approx(float(r.losses.max()) - r.loss_a, abs=1e-12)


def test_buffers_interpolated_integer_buffers_nearest_and_subsets() -> None:
    model, loss_fn, batch = make_model("cnn")
    a, b = _snapshot(model), _snapshot(model)
    b["bn.running_mean"] += 2.0
    b["bn.num_batches_tracked"] += 10
    b["conv.weight"] += 1.0
    b["fc.weight"] += 1.0
    seen: list[tuple[Tensor, int, Tensor, Tensor]] = []

    def recording(m: nn.Module, batch_: Any) -> Tensor:
        bn = m.bn  # type: ignore[union-attr]
        w = (m.conv.weight.detach().clone(), m.fc.weight.detach().clone())  # type: ignore[union-attr]
        seen.append((bn.running_mean.clone(), int(bn.num_batches_tracked), *w))
        return loss_fn(m, batch_)

    mode_connectivity(model, a, b, recording, batch, steps=3)
    (m0, n0, _, _), (m1, n1, c1, f1), (m2, n2, _, _) = seen
    torch.testing.assert_close(m1, a["bn.running_mean"] + 1.0)
    torch.testing.assert_close(c1, a["conv.weight"] + 0.5)
    assert torch.equal(m0, a["bn.running_mean"]) and torch.equal(m2, b["bn.running_mean"])
    assert (n0, n1, n2) == (int(a["bn.num_batches_tracked"]),) + (
        int(b["bn.num_batches_tracked"]),
    ) * 2
    seen.clear()
    mode_connectivity(
        model, a, b, recording, batch, steps=3, params=["fc.*"], interpolate_buffers=False
    )
    _, (m1, n1, c1, f1), (m2, _, c2, _) = seen
    assert torch.equal(m2, a["bn.running_mean"]) and torch.equal(c2, a["conv.weight"])
    torch.testing.assert_close(f1, a["fc.weight"] + 0.5)


def test_batch_statistics_along_the_line() -> None:
    # Each point normalises the batch with the interpolated network's own statistics: the
    # interpolated running statistics (shifted far off here) no longer enter.
    model, loss_fn, batch = make_model("cnn")
    other = make_model("cnn", seed=1)[0]
    a, b = _snapshot(model), _snapshot(other)
    b["bn.running_mean"] += 5.0
    before = _snapshot(model)
    r = mode_connectivity(model, a, b, loss_fn, batch, steps=5, norm_statistics="batch")
    twin = batch_statistics_twin(model)
    for t, got in zip(r.ts.tolist(), r.losses.tolist(), strict=True):
        point = {
            k: torch.lerp(va, b[k], t) if va.is_floating_point() else va for k, va in a.items()
        }
        twin.load_state_dict(point)
        with torch.no_grad():
            assert got == pytest.approx(float(loss_fn(twin, batch)), rel=1e-12)
    running = mode_connectivity(model, a, b, loss_fn, batch, steps=5)
    assert not torch.allclose(running.losses[1:-1], r.losses[1:-1], rtol=1e-3)
    _assert_same_state(model, before)
    assert not any(m.training for m in model.modules())
    again = linear_interpolation(model, other, loss_fn, batch, steps=5, norm_statistics="batch")
    plain = mode_connectivity(
        model, a, _snapshot(other), loss_fn, batch, steps=5, norm_statistics="batch"
    )
    assert torch.equal(again.losses, plain.losses)


def test_batch_statistics_in_slices() -> None:
    model, loss_fn, batch = make_model("cnn")
    before = _snapshot(model)
    twin = batch_statistics_twin(model)
    d = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    r = loss_slice(model, loss_fn, batch, directions=[d], steps=3, norm_statistics="batch")
    with torch.no_grad():
        assert r.center_loss == pytest.approx(float(loss_fn(twin, batch)), rel=1e-12)
        weights = [p.detach().clone() for p in twin.parameters()]
        for a, got in zip(r.coords.tolist(), r.losses.tolist(), strict=True):
            offset = 0
            for p, w in zip(twin.parameters(), weights, strict=True):
                p.copy_(w + a * d[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
            assert got == pytest.approx(float(loss_fn(twin, batch)), rel=1e-12)
    with curvature_context(model, norm_statistics="batch"):  # nested: the same statistics
        nested = loss_slice(model, loss_fn, batch, directions=[d], steps=3, norm_statistics="batch")
    assert torch.equal(nested.losses, r.losses)
    eig = loss_slice(
        model, loss_fn, batch, directions="eigen", steps=3, tol=1e-10, norm_statistics="batch"
    )
    top = hessian_eigenvalues(model, loss_fn, batch, 1, tol=1e-10, norm_statistics="batch")
    assert eig.eigenvalues is not None
    torch.testing.assert_close(eig.eigenvalues, top.eigenvalues, rtol=1e-8, atol=0)
    running = loss_slice(model, loss_fn, batch, directions=[d], steps=3)
    assert running.center_loss != pytest.approx(r.center_loss, rel=1e-3)
    _assert_same_state(model, before)


@pytest.mark.parametrize("fn", ["slice", "connectivity"])
def test_batch_statistics_need_eval_mode(fn: str) -> None:
    model, loss_fn, batch = make_model("cnn")
    with pytest.raises(ValueError, match="eval_mode=True"):
        if fn == "slice":
            loss_slice(model, loss_fn, batch, norm_statistics="batch", eval_mode=False)
        else:
            state = model.state_dict()
            mode_connectivity(
                model, state, state, loss_fn, batch, norm_statistics="batch", eval_mode=False
            )
    with pytest.raises(ValueError, match="norm_statistics"):
        loss_slice(model, loss_fn, batch, norm_statistics="train")  # type: ignore[arg-type]


def test_mismatched_state_dicts_name_the_key() -> None:
    model, loss_fn, batch = make_model("cnn")
    good = _snapshot(model)
    missing = {k: v for k, v in good.items() if k != "bn.running_var"}
    extra = {**good, "head.weight": torch.zeros(1)}
    shaped = {**good, "fc.weight": torch.zeros(48, 3, dtype=torch.float64)}
    with pytest.raises(ValueError, match=r"state_b has no entry 'bn.running_var'"):
        mode_connectivity(model, good, missing, loss_fn, batch)
    with pytest.raises(ValueError, match=r"state_a has an entry 'head.weight'"):
        mode_connectivity(model, extra, good, loss_fn, batch)
    with pytest.raises(ValueError, match=r"state_a\['fc.weight'\] has shape \(48, 3\)"):
        mode_connectivity(model, shaped, good, loss_fn, batch)
    with pytest.raises(ValueError, match=r"checkpoint\['state_dict'\]"):
        mode_connectivity(model, {"state_dict": good, "epoch": 3}, good, loss_fn, batch)
    with pytest.raises(ValueError, match="steps must be"):
        mode_connectivity(model, good, good, loss_fn, batch, steps=1)
    with pytest.raises(ValueError, match="state_b has no entry"):
        linear_interpolation(model, make_model("mlp")[0], loss_fn, batch)


# --------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=50)
    return buf.getvalue()


def test_figures_render_to_png() -> None:
    model, loss_fn, batch = make_model("mlp")
    line = loss_slice(model, loss_fn, batch, steps=5)
    plane = loss_slice(model, loss_fn, batch, directions="eigen", dims=2, steps=4, tol=1e-3)
    other = make_model("mlp", seed=1)[0]
    path = linear_interpolation(model, other, loss_fn, batch, steps=5)
    for fig in (slice_figure(line, 10), slice_figure(plane, None), connectivity_figure(path)):
        assert _png(fig).startswith(b"\x89PNG")
    assert "λ1=" in plane_title(plane)


def plane_title(result: Any) -> str:
    fig = slice_figure(result, 3)
    return str(fig.axes[0].get_title())
