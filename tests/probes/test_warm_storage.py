"""Where Sharpness keeps its warm-start vectors between probes, and that they still warm-start."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_landscape.probes import ProbeContext, Sharpness


def _context(seed: int = 0) -> ProbeContext:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    return ProbeContext(model, lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]), [(x, y)])


@pytest.mark.parametrize(
    ("storage", "dtype"),
    [
        ("device", torch.float32),
        ("host", torch.float32),
        ("bfloat16", torch.bfloat16),
        ("host_bfloat16", torch.bfloat16),
    ],
)
def test_storage_sets_dtype_and_device_and_still_warm_starts(
    storage: str, dtype: torch.dtype
) -> None:
    probe = Sharpness(2, tol=1e-6, warm_start_storage=storage)  # type: ignore[arg-type]
    cold = probe.run(_context())
    probe.record(cold, step=0)
    assert probe.warm_top is not None and probe.warm_min is not None
    assert probe.warm_top.dtype == dtype and probe.warm_top.device.type == "cpu"
    assert probe.warm_top.shape == cold.top.eigenvectors.shape  # type: ignore[union-attr]
    warm = probe.run(_context())  # same Hessian: the stored vectors are already eigenvectors
    torch.testing.assert_close(warm.top.eigenvalues, cold.top.eigenvalues, rtol=1e-5, atol=0)
    assert warm.top.num_hvps < cold.top.num_hvps


def test_nothing_is_kept_without_warm_start() -> None:
    probe = Sharpness(2, warm_start=False)
    probe.record(probe.run(_context()), step=0)
    assert probe.warm_top is None and probe.warm_min is None


def test_unknown_storage_is_rejected() -> None:
    with pytest.raises(ValueError, match="warm_start_storage"):
        Sharpness(warm_start_storage="disk")  # type: ignore[arg-type]
