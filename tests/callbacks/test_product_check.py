"""The monitor's product check: fused kernels caught once per fit, finite differences taken over."""

from __future__ import annotations

import warnings
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_landscape import LandscapeMonitor, Sharpness, curvature_context
from lightning_landscape.probes import ProbeContext
from tests._lightning import trainer_kwargs
from tests._models import KernelMLP, classification_loss, dense_hessian

SYMMETRY = "not symmetric"


class KernelModule(pl.LightningModule):
    """:class:`~tests._models.KernelMLP` trained by SGD on a seeded 3-class problem."""

    def __init__(self, kernel: str | None) -> None:
        super().__init__()
        self.net = KernelMLP(kernel)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.net(x)
        return out

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def _loader(seed: int = 0) -> torch.utils.data.DataLoader[Any]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(128, 4, generator=gen)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)


def _fit(
    kernel: str | None, monitor: LandscapeMonitor | None
) -> tuple[KernelModule, list[str], pl.Trainer]:
    module = KernelModule(kernel)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = pl.Trainer(**trainer_kwargs(callbacks=[] if monitor is None else [monitor]))
        trainer.fit(module, _loader())
    messages = [str(w.message) for w in caught if "LandscapeMonitor" in str(w.message)]
    return module, messages, trainer


def _monitor(**kwargs: Any) -> LandscapeMonitor:
    probes = [Sharpness(2, every_n_steps=10, lambda_min=False, tol=1e-5)]
    return LandscapeMonitor(probes=probes, num_probe_samples=64, **kwargs)


def _true_lambda_max(module: KernelModule) -> float:
    """λ_max of the same weights with F.gelu (float64), on the monitor's 64 probe samples."""
    reference = KernelMLP().double()
    reference.load_state_dict({k: v.double() for k, v in module.net.state_dict().items()})
    x, y = _loader().dataset.tensors  # type: ignore[attr-defined]
    with curvature_context(reference):
        hess = dense_hessian(reference, classification_loss, (x[:64].double(), y[:64]))
    return float(torch.linalg.eigvalsh(hess)[-1])


def test_a_fused_kernel_is_probed_by_finite_differences_from_the_first_round() -> None:
    monitor = _monitor()
    module, messages, _ = _fit("detached", monitor)
    symmetry = [m for m in messages if SYMMETRY in m]
    assert len(symmetry) == 1  # once per fit, not per round
    assert "probing with route='finite_difference' from now on" in symmetry[0]
    assert "pass route='double_backward' to keep double_backward" in symmetry[0]
    check = monitor.product_check
    assert check is not None and check.switched and check.exact.defect > 0.1
    assert monitor.state_dict()["route"] == "finite_difference"  # kept, and checkpointed
    assert [r.step for r in monitor.history] == [0, 10, 20]
    assert monitor.num_failed == 0
    # The last round's λ_max (step 20, the final weights) is the true one, to FD accuracy.
    assert monitor.history[-1].lambda_max == pytest.approx(_true_lambda_max(module), rel=1e-3)


def test_the_switch_leaves_training_bit_identical() -> None:
    """Finite differences move the parameters in place; they come back bit for bit, and the
    optimizer state and the global RNG are those of the run without the monitor."""
    torch.manual_seed(3)
    plain, _, t0 = _fit("detached", None)
    rng0 = torch.get_rng_state()
    torch.manual_seed(3)
    probed, _, t1 = _fit("detached", _monitor())
    assert torch.equal(torch.get_rng_state(), rng0)
    for (name, a), b in zip(plain.state_dict().items(), probed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    s0, s1 = t0.optimizers[0].state_dict()["state"], t1.optimizers[0].state_dict()["state"]
    assert s0.keys() == s1.keys()
    for idx in s0:
        assert torch.equal(s0[idx]["momentum_buffer"], s1[idx]["momentum_buffer"]), idx


def test_an_explicit_route_is_kept_with_a_warning() -> None:
    monitor = _monitor(route="double_backward")
    _, messages, _ = _fit("once", monitor)
    symmetry = [m for m in messages if SYMMETRY in m]
    assert len(symmetry) == 1 and "not reliable" in symmetry[0]
    assert monitor.product_check is not None and not monitor.product_check.switched
    assert monitor.state_dict()["route"] == "double_backward"


def test_correct_products_pass_silently_and_the_check_can_be_switched_off() -> None:
    monitor = _monitor()
    _, messages, _ = _fit(None, monitor)
    assert not [m for m in messages if SYMMETRY in m]
    assert monitor.product_check is not None and monitor.product_check.passed
    assert monitor.state_dict()["route"] == "double_backward"

    off = _monitor(check_products=False)
    _, messages, _ = _fit("detached", off)
    assert not [m for m in messages if SYMMETRY in m]
    assert off.product_check is None and off.state_dict()["route"] == "double_backward"


def test_a_resumed_fit_checks_again_and_an_explicit_route_wins() -> None:
    first = _monitor()
    _fit("detached", first)
    saved = first.state_dict()
    assert saved["route"] == "finite_difference"

    again = _monitor()  # route="auto": the checkpointed switch is decided anew
    again.load_state_dict(saved)
    _, messages, _ = _fit("detached", again)
    assert sum(SYMMETRY in m for m in messages) == 1
    assert again.product_check is not None and again.product_check.switched

    off = _monitor(check_products=False)  # no check: the checkpointed switch is kept
    off.load_state_dict(saved)
    _, messages, _ = _fit("detached", off)
    assert not [m for m in messages if SYMMETRY in m] and off.product_check is None
    assert off.state_dict()["route"] == "finite_difference"

    explicit = _monitor(route="double_backward")  # the user's route, not the saved one
    explicit.load_state_dict(saved)
    _, messages, _ = _fit(None, explicit)
    assert not [m for m in messages if SYMMETRY in m]
    assert explicit.product_check is not None and explicit.product_check.passed
    assert explicit.state_dict()["route"] == "double_backward"


def test_non_finite_products_leave_the_check_for_the_next_round() -> None:
    """A finite loss with NaN curvature (√|w| at w = 0): inconclusive, so checked again later."""

    def loss(model: torch.nn.Module, batch: Tensor) -> Tensor:
        out: Tensor = (model.weight.abs().sqrt() * batch).sum()
        return out

    monitor = _monitor()
    model = torch.nn.Linear(3, 1, bias=False).double()
    with torch.no_grad():
        model.weight.zero_()
    with curvature_context(model):
        monitor._check_products(ProbeContext(model, loss, [torch.tensor(1.0).double()]))
    assert monitor.product_check is not None and monitor.product_check.inconclusive
    assert not monitor._products_checked
