"""Curvature exponent α: exact h_k against a dense oracle, the fit, reliability, layer types."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lightning_landscape as ll
from lightning_landscape.metrics import AlphaResult, fit_power_law, group_alphas, layer_type
from tests._models import batch_statistics_twin, dense_hessian, make_model

CASES = [
    ("mlp", "fc2.weight"),
    ("mlp", "fc3.weight"),
    ("cnn", "conv.weight"),
    ("attention", "qkv.weight"),
    ("attention", "proj.weight"),
]


def _mean_grad(model: nn.Module, loss_fn, batch, name: str) -> torch.Tensor:
    p = dict(model.named_parameters())[name]
    (g,) = torch.autograd.grad(loss_fn(model, batch), [p])
    return g.reshape(g.shape[0], -1)


@pytest.mark.parametrize(("kind", "name"), CASES)
def test_h_matches_dense_layer_block_hessian(kind: str, name: str) -> None:
    model, loss_fn, batch = make_model(kind)
    res = ll.curvature_exponents(model, loss_fn, batch, top_k=20, layers=[name])[name]
    g2 = _mean_grad(model, loss_fn, batch, name)
    torch.testing.assert_close(res.sigma, torch.linalg.svdvals(g2)[: len(res.sigma)])
    assert len(res.sigma) == min(20, *g2.shape) == res.num_hvps == len(res.h)
    # Directions rebuilt independently from the SVD of the reshaped gradient.
    u, _, vh = torch.linalg.svd(g2, full_matrices=False)
    hess = dense_hessian(model, loss_fn, batch, params=[name]).detach()
    for k in range(len(res.h)):
        d = torch.outer(u[:, k], vh[k]).reshape(-1)  # row-major = the weight's own flattening
        expected = float(d @ hess @ d)
        assert math.isclose(float(res.h[k]), expected, rel_tol=1e-8, abs_tol=1e-12), (k, name)
    assert res.shape == tuple(g2.shape)
    assert float(res.h.abs().max()) > 1e-4  # a non-trivial check
    assert res.kept.dtype == torch.bool and res.sigma.dtype == torch.float64


def test_batch_statistics_h_matches_the_training_hessian() -> None:
    model, loss_fn, batch = make_model("cnn")  # BatchNorm with running statistics
    name = "conv.weight"
    twin = batch_statistics_twin(model)  # BatchNorm on the batch's statistics, nothing updated
    buffers = [b.clone() for b in model.buffers()]
    res = ll.curvature_exponents(
        model, loss_fn, batch, top_k=20, layers=[name], norm_statistics="batch"
    )[name]
    u, sigma, vh = torch.linalg.svd(_mean_grad(twin, loss_fn, batch, name), full_matrices=False)
    torch.testing.assert_close(res.sigma, sigma[: len(res.sigma)])
    hess = dense_hessian(twin, loss_fn, batch, params=[name]).detach()
    for k in range(len(res.h)):
        d = torch.outer(u[:, k], vh[k]).reshape(-1)
        assert math.isclose(float(res.h[k]), float(d @ hess @ d), rel_tol=1e-8, abs_tol=1e-12)
    running = ll.curvature_exponents(model, loss_fn, batch, top_k=20, layers=[name])[name]
    assert not torch.allclose(running.h, res.h, rtol=1e-3)  # the default differs on this model
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), buffers, strict=True))
    with pytest.raises(ValueError, match="eval_mode=True"):
        ll.curvature_exponents(model, loss_fn, batch, norm_statistics="batch", eval_mode=False)


def test_transformers_conv1d_is_read_as_its_linear_map_and_tied_weights_once() -> None:
    """GPT-2's Conv1D stores (in, out): α sees the (out, in) matrix, h_k exact against a dense
    oracle in the parameter's own layout; the lm_head tied to wte is measured once."""
    transformers = pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=11, n_positions=8, n_embd=8, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0
    )
    model = transformers.GPT2LMHeadModel(config).double().eval()
    tokens = torch.randint(0, 11, (6, 8), generator=torch.Generator().manual_seed(1))

    def loss_fn(m: nn.Module, b: torch.Tensor) -> torch.Tensor:
        return m(input_ids=b, labels=b).loss

    name = "transformer.h.0.mlp.c_fc.weight"  # Conv1D(nf=32, nx=8): weight (8, 32)
    module = model.get_submodule(name.rpartition(".")[0])
    assert isinstance(module, Conv1D) and module.weight.shape == (8, 32)
    res = ll.curvature_exponents(model, loss_fn, tokens, top_k=6, layers=[name])[name]
    assert res.shape == (32, 8) and res.layer_type == "mlp"
    g = dict(model.named_parameters())[name]
    (grad,) = torch.autograd.grad(loss_fn(model, tokens), [g])
    u, _, vh = torch.linalg.svd(grad.T, full_matrices=False)  # the (out, in) matrix
    hess = dense_hessian(model, loss_fn, tokens, params=[name]).detach()
    for k in range(len(res.h)):
        d = torch.outer(u[:, k], vh[k]).T.reshape(-1)  # back to the (in, out) storage
        # float64 through HF's masked attention: the two autograd paths agree to ~1e-6
        assert math.isclose(float(res.h[k]), float(d @ hess @ d), rel_tol=1e-5, abs_tol=1e-12)
    everything = ll.curvature_exponents(model, loss_fn, tokens, top_k=2)
    assert "transformer.wte.weight" in everything and "lm_head.weight" not in everything
    assert everything["transformer.wte.weight"].layer_type == "head"
    assert everything["transformer.h.0.attn.c_attn.weight"].layer_type == "attention"
    assert everything["transformer.h.0.attn.c_proj.weight"].layer_type == "attention"
    assert everything["transformer.h.0.mlp.c_proj.weight"].layer_type == "mlp"
    assert len(everything) == 5


def test_conv_shape_and_default_layers() -> None:
    model, loss_fn, batch = make_model("cnn")
    results = ll.curvature_exponents(model, loss_fn, batch, top_k=5)
    assert list(results) == ["conv.weight", "fc.weight"]
    assert results["conv.weight"].shape == (3, 9)
    assert results["conv.weight"].layer_type == "conv"
    assert results["fc.weight"].layer_type == "head"
    assert sum(r.num_hvps for r in results.values()) == 3 + 3
    assert all(isinstance(r, AlphaResult) for r in results.values())


@pytest.mark.parametrize("alpha", [1.0, 2.0, 3.0])
def test_fit_recovers_planted_exponent(alpha: float) -> None:
    gen = torch.Generator().manual_seed(int(alpha))
    sigma = torch.logspace(0, -2, 20, dtype=torch.float64)
    h = 0.7 * sigma**alpha * torch.exp(0.05 * torch.randn(20, generator=gen, dtype=torch.float64))
    fit = fit_power_law(sigma, h)
    assert abs(fit.alpha - alpha) < 0.05 and abs(fit.alpha_theil_sen - alpha) < 0.05
    assert abs(fit.intercept - math.log(0.7)) < 0.1
    assert fit.r2 > 0.99 and fit.num_points == 20
    assert math.isclose(fit.sigma_decades, 2.0)
    assert fit_power_law(sigma.numpy(), h.tolist()).alpha == pytest.approx(fit.alpha)


def test_fit_excludes_zero_sigma_and_nonpositive_h() -> None:
    sigma = torch.logspace(0, -2, 12, dtype=torch.float64)
    h = 3.0 * sigma**2
    sigma[-1] = 1e-19  # numerically zero (rank-deficient head)
    h[3], h[5] = -1e-3, 0.0
    h[7] = math.nan
    fit = fit_power_law(sigma, h)
    expected = torch.ones(12, dtype=torch.bool)
    expected[[3, 5, 7, 11]] = False
    assert torch.equal(fit.kept, expected) and fit.num_points == 8
    assert fit.alpha == pytest.approx(2.0) and fit.alpha_theil_sen == pytest.approx(2.0)
    assert fit.r2 == pytest.approx(1.0)
    # An explicit floor drops more.
    assert fit_power_law(sigma, h, sigma_floor=0.5).num_points == 2


def test_leverage_point_is_unreliable() -> None:
    from lightning_landscape.metrics._fit import assess_fit

    gen = torch.Generator().manual_seed(1)
    rest = torch.logspace(-2, -2.5, 19, dtype=torch.float64)
    sigma = torch.cat([torch.tensor([1.0], dtype=torch.float64), rest])
    h = sigma**2 * torch.exp(0.3 * torch.randn(20, generator=gen, dtype=torch.float64))
    fit = fit_power_law(sigma, h)
    assert fit.leverage == pytest.approx(100.0)
    reliable, reason = assess_fit(fit)
    assert not reliable and reason is not None and "leverage" in reason
    # A clean spread power law passes every rule.
    clean = torch.logspace(0, -2, 20, dtype=torch.float64)
    assert assess_fit(fit_power_law(clean, clean**2)) == (True, None)


def test_too_few_points_give_nan_and_unreliable() -> None:
    from lightning_landscape.metrics._fit import assess_fit

    fit = fit_power_law(torch.tensor([1.0, 0.5]), torch.tensor([1.0, -1.0]))
    assert fit.num_points == 1 and math.isnan(fit.alpha) and math.isnan(fit.alpha_theil_sen)
    reliable, reason = assess_fit(fit)
    assert not reliable and "usable points" in str(reason)
    empty = fit_power_law(torch.zeros(3), torch.ones(3))
    assert empty.num_points == 0 and math.isnan(empty.alpha)
    with pytest.raises(ValueError, match="same length"):
        fit_power_law(torch.ones(3), torch.ones(2))


def test_head_of_rank_deficient_softmax_is_flagged() -> None:
    model, loss_fn, batch = make_model("mlp")  # 3-class head: rank(G) <= 2
    res = ll.curvature_exponents(model, loss_fn, batch, layers=["fc3"])["fc3.weight"]
    assert res.layer_type == "head" and res.num_hvps == 3
    assert not bool(res.kept[2]) and res.num_points <= 2
    assert not res.reliable and "usable points" in str(res.unreliable_reason)


def test_layer_types() -> None:
    expected = {
        "mlp": {"fc1.weight": "mlp", "fc2.weight": "mlp", "fc3.weight": "head"},
        "cnn": {"conv.weight": "conv", "fc.weight": "head"},
        "attention": {"qkv.weight": "attention", "proj.weight": "mlp", "head.weight": "head"},
    }
    for kind, types in expected.items():
        model, loss_fn, batch = make_model(kind)
        results = ll.curvature_exponents(model, loss_fn, batch, top_k=2)
        assert {n: r.layer_type for n, r in results.items()} == types
    model, loss_fn, batch = make_model("attention")
    res = ll.curvature_exponents(
        model,
        loss_fn,
        batch,
        top_k=2,
        layers=["tok", "proj"],
        layer_types={"proj.weight": "attention"},
    )
    assert res["tok.weight"].layer_type == "embedding"
    assert res["proj.weight"].layer_type == "attention"
    mha = nn.MultiheadAttention(8, 2)
    assert layer_type("attn.in_proj_weight", mha) == "attention"
    assert layer_type("attn.out_proj.weight", mha.out_proj) == "attention"
    assert layer_type("transformer.wte.weight", nn.Linear(2, 2)) == "embedding"
    assert layer_type("lm_head.weight", nn.Linear(2, 2)) == "head"
    assert layer_type("blocks.0.mlp.fc.weight", nn.Linear(2, 2)) == "mlp"
    assert layer_type("norm.weight", nn.LayerNorm(2)) == "other"


def test_multihead_attention_default_selection() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
            self.out = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.attn(x, x, x, need_weights=False)[0].mean(1))

    torch.manual_seed(0)
    net = Net().double()
    x = torch.randn(6, 5, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2])

    def loss_fn(m: nn.Module, b: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(m(b), y)

    results = ll.curvature_exponents(net, loss_fn, x, top_k=3)
    assert {n: r.layer_type for n, r in results.items()} == {
        "attn.in_proj_weight": "attention",
        "attn.out_proj.weight": "attention",
        "out.weight": "head",
    }
    assert results["attn.in_proj_weight"].shape == (12, 4)


def test_unknown_pattern_and_bad_arguments() -> None:
    model, loss_fn, batch = make_model("mlp")
    with pytest.raises(ValueError, match="nope"):
        ll.curvature_exponents(model, loss_fn, batch, layers=["fc1", "nope*"])
    with pytest.raises(ValueError, match="top_k"):
        ll.curvature_exponents(model, loss_fn, batch, top_k=0)
    with pytest.raises(ValueError, match="layer types"):
        ll.curvature_exponents(model, loss_fn, batch, layer_types={"fc1.weight": "dense"})
    with pytest.raises(ValueError, match=">= 2 dimensions"):
        ll.curvature_exponents(model, loss_fn, batch, layers=["fc1.bias"])


def test_probe_leaves_model_untouched_and_counts_hvps() -> None:
    model, loss_fn, batch = make_model("mlp")
    model.train()
    model.fc1.weight.grad = torch.ones_like(model.fc1.weight)
    model.fc2.weight.requires_grad_(False)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    results = ll.curvature_exponents(model, loss_fn, batch, top_k=4, layers=["*.weight"])
    assert torch.equal(torch.get_rng_state(), state)
    assert model.training and model.drop.training
    assert torch.equal(model.fc1.weight.grad, torch.ones_like(model.fc1.weight))
    assert model.fc2.weight.grad is None and model.fc3.weight.grad is None
    assert not model.fc2.weight.requires_grad  # probed although frozen, and still frozen
    assert list(results) == ["fc1.weight", "fc2.weight", "fc3.weight"]
    assert [r.num_hvps for r in results.values()] == [4, 4, 3]
    assert all(r.seconds >= 0 for r in results.values())


def test_group_alphas() -> None:
    def result(name: str, kind: str, alpha: float, reliable: bool) -> AlphaResult:
        empty = torch.zeros(0, dtype=torch.float64)
        return AlphaResult(
            name, kind, (2, 2), alpha, 0.0, 1.0, alpha, 5, 1.0, empty, empty,
            empty.bool(), reliable, None, 0, 0.0,
        )  # fmt: skip

    results = {
        "a": result("a", "conv", 2.0, True),
        "b": result("b", "conv", 2.2, True),
        "c": result("c", "conv", 9.0, False),
        "d": result("d", "head", 1.0, False),
    }
    groups = group_alphas(results)
    assert groups["conv"] == pytest.approx(2.1) and math.isnan(groups["head"])
