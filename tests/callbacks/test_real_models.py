"""The monitor on the models people train: Hugging Face GPT-2, a BatchNorm ResNet-18, a
``torch.compile``'d module, a frozen backbone, a GAN; each runs to its last step with finite,
converged, correctly thresholded numbers, or is refused before the first optimizer step."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_landscape as ll
import lightning_landscape.probes.alpha as alpha_mod
from lightning_landscape import (
    CurvatureExponent,
    LandscapeMonitor,
    Sharpness,
    StabilityLRGuard,
    Stabilization,
    UpdateCurvature,
)
from lightning_landscape.cli.demo import ResNet18
from tests._lightning import (
    ClassifierModule,
    MemoryLogger,
    make_dataloader,
    sharpness_monitor,
    trainer_kwargs,
)


def _fit(module: pl.LightningModule, loader: DataLoader[Any], monitor: Any, **kw: Any) -> Any:
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(**trainer_kwargs(callbacks=[monitor], **kw))
    trainer.fit(module, loader)
    return trainer


# --------------------------------------------------------------------------------------------------
# Hugging Face GPT-2 (built from a small config, random init), AdamW with a warm-up
# --------------------------------------------------------------------------------------------------


class GPT2Module(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        transformers = pytest.importorskip("transformers")
        config = transformers.GPT2Config(
            vocab_size=32,
            n_positions=16,
            n_embd=16,
            n_layer=2,
            n_head=2,
            bos_token_id=0,
            eos_token_id=0,
        )
        self.model = transformers.GPT2LMHeadModel(config)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        (tokens,) = batch
        loss: Tensor = self.model(input_ids=tokens, labels=tokens).loss
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=3e-3, weight_decay=0.1)
        warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, step / 4))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}


def _token_loader() -> DataLoader[Any]:
    gen = torch.Generator().manual_seed(0)
    base = torch.randint(0, 32, (64, 1), generator=gen)
    tokens = (base + torch.arange(12)) % 32  # a learnable "count up" task
    return DataLoader(TensorDataset(tokens), batch_size=8, shuffle=True, generator=gen)


def test_gpt2_with_adamw_sharpness_alpha_delta2() -> None:
    monitor = LandscapeMonitor(
        probes=[
            Sharpness(2, every_n_steps=4),
            CurvatureExponent(4, every_n_steps=4),
            Stabilization(D=3, every_n_steps=4),
            UpdateCurvature(every_n_steps=4),
        ],
        num_probe_samples=16,
    )
    logger = MemoryLogger()
    trainer = _fit(GPT2Module(), _token_loader(), monitor, max_steps=8, logger=logger)
    assert trainer.global_step == 8
    assert [r.step for r in monitor.history] == [0, 4, 8]
    assert all(r.converged and math.isfinite(r.lambda_max) for r in monitor.history)
    # AdamW: the preconditioned ratio, from the first probe after the warm-up's lr of 0
    assert monitor.history[0].stability_ratio is None
    for r in monitor.history[1:]:
        assert r.stability_ratio is not None and r.preconditioned_lambda_max is not None
        assert r.stability_threshold == pytest.approx((2 + 2 * 0.9) / ((1 - 0.9) * 3e-3))
        assert r.stability_ratio == pytest.approx(
            r.preconditioned_lambda_max / r.stability_threshold
        )
    assert logger.steps("landscape/update/curvature") == [4, 8]  # no step behind step 0
    assert all(math.isfinite(v) for _, v in logger.values("landscape/update/curvature"))
    assert monitor.num_failed == 0
    alpha = monitor.probe_named("alpha").last_result
    types = {name: r.layer_type for name, r in alpha.items()}
    assert types == {
        "model.transformer.wte.weight": "head",  # lm_head, tied to wte: counted once
        **{f"model.transformer.h.{i}.attn.c_attn.weight": "attention" for i in range(2)},
        **{f"model.transformer.h.{i}.attn.c_proj.weight": "attention" for i in range(2)},
        **{f"model.transformer.h.{i}.mlp.c_fc.weight": "mlp" for i in range(2)},
        **{f"model.transformer.h.{i}.mlp.c_proj.weight": "mlp" for i in range(2)},
    }
    c_attn = alpha["model.transformer.h.0.attn.c_attn.weight"]
    assert c_attn.shape == (48, 16)  # read as the (out, in) matrix of the linear map
    for name, r in alpha.items():  # logged where the fit has a slope (it needs 2 usable points)
        assert (f"landscape/alpha/{name}" in logger.keys()) == math.isfinite(r.alpha)
    assert math.isfinite(c_attn.alpha)
    delta2 = monitor.probe_named("delta2").last_result.result
    assert delta2.k == 16 and math.isfinite(delta2.value)


def test_gpt2_compiled_route_gives_the_double_backwards_eigenvalues(
    fast_compile: list[object],
) -> None:
    """The whole GPT-2 compiles in one graph (``fullgraph``) and gives the same top pair."""
    import warnings

    model = GPT2Module().model
    (tokens,) = next(iter(_token_loader()))

    def loss_fn(m: nn.Module, b: Tensor) -> Tensor:
        loss: Tensor = m(input_ids=b, labels=b).loss
        return loss

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback to "functorch"
        compiled = ll.hessian_eigenvalues(model, loss_fn, tokens, k=2, route="compiled")
    exact = ll.hessian_eigenvalues(model, loss_fn, tokens, k=2, route="double_backward")
    assert fast_compile  # graphs were compiled, not run eagerly
    assert compiled.converged.all() and exact.converged.all()
    torch.testing.assert_close(compiled.eigenvalues, exact.eigenvalues, rtol=1e-3, atol=0)


def test_guard_with_adamw_scales_the_learning_rate() -> None:
    # force an action; the warm-up is a LambdaLR, which rewrites the rate: "closed_form"
    guard = StabilityLRGuard(target=1e-6, min_scale=1e-9, recovery=1.0, scheduler="closed_form")
    monitor = LandscapeMonitor(probes=[Sharpness(1, every_n_steps=4)], hooks=[guard])
    module = GPT2Module()
    trainer = _fit(module, _token_loader(), monitor, max_steps=8)
    assert monitor.num_failed == 0 and trainer.global_step == 8
    step4 = monitor.history[1]
    assert step4.step == 4 and step4.stability_ratio is not None
    assert guard.scale < 1.0 and guard.last_ratio is not None
    assert guard.last_ratio <= 1e-6 * (1 + 1e-9)  # at the target when it cut, below after
    (optimizer,) = trainer.optimizers
    assert float(optimizer.param_groups[0]["lr"]) < 3e-3 * 1e-3


# --------------------------------------------------------------------------------------------------
# A ResNet-18-style network with BatchNorm
# --------------------------------------------------------------------------------------------------


class ResNetModule(pl.LightningModule):
    def __init__(self, lr: float = 0.05, momentum: float = 0.9) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = ResNet18(num_classes=4, width=4)
        self.lr, self.momentum = lr, momentum

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)


def _image_loader() -> DataLoader[Any]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(96, 3, 8, 8, generator=gen)
    y = (x.mean(dim=(1, 2, 3)) > 0).long() + 2 * (x[:, 0].mean(dim=(1, 2)) > 0).long()
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True, generator=gen)


def test_resnet18_with_batchnorm_measures_the_training_loss_hessian() -> None:
    monitor = LandscapeMonitor(probes=[Sharpness(2, every_n_steps=5)], num_probe_samples=32)
    module = ResNetModule()
    trainer = _fit(module, _image_loader(), monitor, max_steps=5)
    assert trainer.global_step == 5 and monitor.num_failed == 0
    final = monitor.history[-1]
    assert final.converged
    assert final.stability_threshold == pytest.approx((2 + 2 * 0.9) / 0.05)
    assert final.stability_ratio == pytest.approx(final.lambda_max / final.stability_threshold)

    # The default Hessian: two chunks of the training batch size (16), each normalised with its
    # own statistics; the running statistics are not touched.
    x, y = _image_loader().dataset.tensors
    chunks = ll.split_batch((x[:32], y[:32]), 16)

    def loss_fn(m: Any, b: Any) -> Tensor:
        return m.training_step(b, 0)

    before = [b.clone() for b in module.buffers()]
    eigenvalues = {}
    for stats in ("batch", "running"):
        with ll.curvature_context(module, norm_statistics=stats):  # type: ignore[arg-type]
            op = ll.HessianOperator(
                module, loss_fn, chunks if stats == "batch" else [(x[:32], y[:32])]
            )
            eigenvalues[stats] = ll.lanczos(op, 2, tol=1e-6).eigenvalues.tolist()
    assert all(torch.equal(a, b) for a, b in zip(before, module.buffers(), strict=True))
    assert final.eigenvalues == pytest.approx(eigenvalues["batch"], rel=1e-3)
    # Five steps in, the running statistics lag: the eval-mode Hessian is another one.
    assert eigenvalues["running"][0] != pytest.approx(eigenvalues["batch"][0], rel=0.05)


# --------------------------------------------------------------------------------------------------
# A torch.compile'd module (inductor backend, CPU)
# --------------------------------------------------------------------------------------------------


class CompiledClassifier(ClassifierModule):
    def __init__(self, compiled: bool) -> None:
        super().__init__(batch_norm=False, dropout=0.0)
        if compiled:
            self.net = torch.compile(self.net)  # type: ignore[assignment]


def test_compiled_module_is_probed_through_its_original_code() -> None:
    runs = {}
    for compiled in (False, True):
        monitor = sharpness_monitor(5, 2, lambda_min=True)
        torch.manual_seed(0)  # the same initial weights in both runs
        module = CompiledClassifier(compiled)
        trainer = _fit(module, make_dataloader(), monitor, max_steps=10)
        assert trainer.global_step == 10 and monitor.num_failed == 0
        runs[compiled] = (module, monitor)
    (_, plain), (compiled, probed) = runs[False], runs[True]
    assert isinstance(compiled.net, torch._dynamo.eval_frame.OptimizedModule)
    assert [r.step for r in probed.history] == [0, 5, 10]
    for a, b in zip(plain.history, probed.history, strict=True):
        assert b.converged
        assert b.eigenvalues == pytest.approx(a.eigenvalues, rel=1e-3)
        assert b.lambda_min == pytest.approx(a.lambda_min, rel=1e-2, abs=1e-5)


# --------------------------------------------------------------------------------------------------
# A linear head on a frozen backbone: exact zero eigenvalues
# --------------------------------------------------------------------------------------------------


def test_frozen_backbone_linear_head_converges_with_lambda_min() -> None:
    module = ClassifierModule(batch_norm=False)
    for p in module.net[:-1].parameters():
        p.requires_grad_(False)
    monitor = LandscapeMonitor(probes=[Sharpness(3, every_n_steps=5)], num_probe_samples=64)
    trainer = _fit(module, make_dataloader(), monitor, max_steps=10)
    assert trainer.global_step == 10
    for r in monitor.history:
        assert r.converged  # λ_min = 0 (the softmax's all-ones direction) converges too
        assert abs(r.lambda_min) <= 1e-3 * r.lambda_max
        assert r.num_hvps < 100  # it spent its whole budget (~400) against a relative residual


def test_probing_only_frozen_parameters_is_refused() -> None:
    module = ClassifierModule()
    module.net[0].requires_grad_(False)
    monitor = sharpness_monitor(5, 2, params=["net.0.*"])
    with pytest.raises(ValueError, match=r"selects only frozen parameters"):
        _fit(module, make_dataloader(), monitor, max_steps=5)


# --------------------------------------------------------------------------------------------------
# A GAN: two optimizers, manual optimization
# --------------------------------------------------------------------------------------------------


class GAN(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.automatic_optimization = False
        self.gen = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 8))
        self.disc = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))

    def disc_loss(self, batch: Any) -> Tensor:
        (real,) = batch
        noise = torch.randn(real.shape[0], 4, generator=torch.Generator().manual_seed(1))
        fake = self.gen(noise).detach()
        logits = torch.cat([self.disc(real), self.disc(fake)]).squeeze(1)
        labels = torch.cat([torch.ones(len(real)), torch.zeros(len(fake))])
        return F.binary_cross_entropy_with_logits(logits, labels)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt_g, opt_d = self.optimizers()  # type: ignore[misc]
        opt_d.zero_grad()
        self.manual_backward(self.disc_loss(batch))
        opt_d.step()
        opt_g.zero_grad()
        fake = self.gen(torch.randn(batch[0].shape[0], 4))
        self.manual_backward(-self.disc(fake).mean())
        opt_g.step()

    def configure_optimizers(self) -> Any:
        gen = torch.optim.SGD(self.gen.parameters(), lr=0.01)  # threshold 2/0.01 = 200
        disc = torch.optim.SGD(self.disc.parameters(), lr=0.1)  # threshold 2/0.1 = 20
        return [gen, disc]


def _real_loader() -> DataLoader[Any]:
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0)) * 0.5 + 1.0
    return DataLoader(TensorDataset(x), batch_size=16)


def test_gan_threshold_comes_from_the_probed_optimizer(caplog: pytest.LogCaptureFixture) -> None:
    def disc_loss(module: Any, batch: Any) -> Tensor:
        return module.disc_loss(batch)

    probed = sharpness_monitor(5, 1, loss_fn=disc_loss, params=["disc.*"])
    trainer = _fit(GAN(), _real_loader(), probed, max_steps=10)
    assert trainer.global_step == 10
    assert all(r.stability_threshold == pytest.approx(20.0) for r in probed.history)
    assert all(r.stability_ratio == pytest.approx(r.lambda_max / 20.0) for r in probed.history)

    # Without params= the probed parameters belong to both optimizers: no single threshold.
    both = sharpness_monitor(5, 1, loss_fn=disc_loss)
    with caplog.at_level("INFO"):
        _fit(GAN(), _real_loader(), both, max_steps=5)
    assert all(r.stability_ratio is None for r in both.history)
    assert "updated by 2 optimizers" in caplog.text


# --------------------------------------------------------------------------------------------------
# Nothing after setup stops training
# --------------------------------------------------------------------------------------------------


def test_measurements_that_fail_mid_run_are_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"loss": 0, "alpha": 0}
    real_alpha = alpha_mod.curvature_exponents

    def flaky_loss(module: Any, batch: Any) -> Tensor:
        calls["loss"] += 1
        if module.trainer.global_step == 5:
            raise RuntimeError("the loss broke at step 5")
        return module.compute_loss(batch)

    def flaky_alpha(*args: Any, **kwargs: Any) -> Any:
        calls["alpha"] += 1
        if calls["alpha"] == 1:
            raise KeyError("some layer")
        return real_alpha(*args, **kwargs)

    monkeypatch.setattr(alpha_mod, "curvature_exponents", flaky_alpha)
    logger = MemoryLogger()
    monitor = sharpness_monitor(
        5, 2, loss_fn=flaky_loss, extra=[CurvatureExponent(3, every_n_steps=5)]
    )
    with pytest.warns(UserWarning) as caught:
        trainer = _fit(ClassifierModule(), make_dataloader(), monitor, max_steps=15, logger=logger)
    assert trainer.global_step == 15
    messages = [str(w.message) for w in caught if "LandscapeMonitor" in str(w.message)]
    broke = "Sharpness probe at step 5 failed (RuntimeError: the loss broke"
    assert any(broke in m for m in messages)
    assert any("CurvatureExponent probe at step 5" in m and "KeyError" in m for m in messages)
    assert [r.step for r in monitor.history] == [0, 10, 15]
    assert dict(logger.values("landscape/probe_failed"))[5] == 1.0
    assert logger.steps("landscape/alpha_cost/hvps") == [10, 15]  # α ran again at step 10


def test_num_probe_samples_above_the_dataset_size_is_said() -> None:
    monitor = sharpness_monitor(5, 2, num_probe_samples=1000)
    with pytest.warns(UserWarning, match=r"num_probe_samples=1000 but the train dataset holds 256"):
        _fit(ClassifierModule(), make_dataloader(), monitor, max_steps=5)
