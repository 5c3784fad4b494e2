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


def test_joined_warm_vectors_keep_contiguous_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    """Top-k and λ_min vectors are joined with each column a contiguous row: the solver's
    per-column passes (norms, the start vector) then read them in place instead of gathering
    strided entries (0.18 s a round at 11 M parameters)."""
    import lightning_landscape.probes.sharpness as sharpness

    probe = Sharpness(2, tol=1e-6)
    probe.record(probe.run(_context()), step=0)
    seen: list[torch.Tensor] = []
    solve = sharpness.lanczos_ends

    def spy(*args: object, **kwargs: object) -> object:
        seen.append(kwargs["start"])  # type: ignore[arg-type]
        return solve(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(sharpness, "lanczos_ends", spy)
    probe.run(_context())
    (start,) = seen
    assert start.shape[1] == 3  # top-2 and λ_min
    assert all(start[:, i].is_contiguous() for i in range(3))
    expected = torch.cat([probe.warm_top, probe.warm_min], dim=1)  # type: ignore[list-item]
    torch.testing.assert_close(start, expected, rtol=0, atol=0)
