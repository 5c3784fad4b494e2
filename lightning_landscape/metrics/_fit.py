"""Log-log power-law fits ``h = c·σ^α`` with point filtering and a reliability verdict.

Pure float64 tensor arithmetic on the CPU: no models, no autograd.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor

MIN_POINTS = 5
"""Fewer kept pairs than this make a fit unreliable."""
MIN_DECADES = 1.0
"""A kept σ range narrower than this (``log10(σ_max/σ_min)``) makes a fit unreliable."""
MAX_LEVERAGE = 10.0
"""``σ₁/σ₂`` above this (over kept pairs) makes a fit unreliable: k = 1 dominates the slope."""
MAX_SLOPE_GAP = 0.5
"""``|α_OLS − α_Theil–Sen|`` above this makes a fit unreliable."""


class PowerLawFit(NamedTuple):
    """Result of :func:`fit_power_law`.

    Attributes:
        alpha: OLS slope of ``log h`` on ``log σ`` over kept pairs (NaN with < 2 distinct σ).
        intercept: OLS intercept ``log c`` (natural log; NaN when ``alpha`` is).
        r2: coefficient of determination of the OLS fit (NaN with < 2 points).
        alpha_theil_sen: median of the pairwise slopes over kept pairs (NaN with < 2 points).
        kept: bool mask over the input pairs: finite, ``σ > sigma_floor`` and ``h > 0``.
        num_points: number of kept pairs.
        sigma_decades: ``log10(σ_max/σ_min)`` over kept pairs (NaN when none is kept).
        leverage: ``σ₁/σ₂``, the ratio of the two largest kept σ (NaN with < 2 points).
    """

    alpha: float
    intercept: float
    r2: float
    alpha_theil_sen: float
    kept: Tensor
    num_points: int
    sigma_decades: float
    leverage: float


def _as_float64(x: Any) -> Tensor:
    return torch.as_tensor(x).detach().to(device="cpu", dtype=torch.float64).reshape(-1)


def theil_sen_slope(x: Tensor, y: Tensor) -> float:
    """Median of the slopes ``(y_j − y_i)/(x_j − x_i)`` over all pairs ``i < j`` with ``x_i ≠ x_j``.

    Args:
        x: 1-D float tensor.
        y: 1-D float tensor of the same length.

    Returns:
        The Theil–Sen slope (the lower median for an even number of slopes), NaN without a pair.
    """
    i, j = torch.triu_indices(len(x), len(x), offset=1)
    dx = x[j] - x[i]
    ok = dx != 0
    if not bool(ok.any()):
        return math.nan
    return float(torch.median((y[j] - y[i])[ok] / dx[ok]))


def fit_power_law(sigma: Any, h: Any, *, sigma_floor: float | None = None) -> PowerLawFit:
    """Fit ``h_k = c·σ_k^α`` by least squares in log-log space, and robustly by Theil–Sen.

    Pairs are kept where both values are finite, ``σ > sigma_floor`` (drops numerically-zero
    singular values, e.g. beyond the rank ``c − 1`` of a c-class softmax head's gradient) and
    ``h > 0`` (the logarithm needs positive curvature). The pairs are used as given: ``h`` is
    never re-sorted.

    Args:
        sigma: 1-D array-like of singular values (tensor, NumPy array or list).
        h: 1-D array-like of the same length, the curvatures paired with ``sigma``.
        sigma_floor: absolute floor; default ``σ_max · len(sigma) · ε`` with ε the float64
            machine epsilon and σ_max the largest finite σ.

    Returns:
        A :class:`PowerLawFit`.

    Raises:
        ValueError: if ``sigma`` and ``h`` differ in length.

    Example::

        fit = fit_power_law(sigma, h)
        fit.alpha, fit.r2, fit.kept
    """
    s, hv = _as_float64(sigma), _as_float64(h)
    if s.shape != hv.shape:
        raise ValueError(f"sigma and h must have the same length, got {len(s)} and {len(hv)}")
    finite = torch.isfinite(s) & torch.isfinite(hv)
    if sigma_floor is None:
        top = float(s[finite].max()) if bool(finite.any()) else 0.0
        sigma_floor = max(top, 0.0) * len(s) * torch.finfo(torch.float64).eps
    kept = finite & (s > max(sigma_floor, 0.0)) & (hv > 0)
    n = int(kept.sum())
    nan = math.nan
    if n == 0:
        return PowerLawFit(nan, nan, nan, nan, kept, 0, nan, nan)
    x, y = torch.log(s[kept]), torch.log(hv[kept])
    decades = (float(x.max()) - float(x.min())) / math.log(10.0)
    if n < 2:
        return PowerLawFit(nan, nan, nan, nan, kept, n, decades, nan)
    top2 = torch.topk(x, 2).values
    leverage = math.exp(float(top2[0] - top2[1]))
    xc, yc = x - x.mean(), y - y.mean()
    sxx = float((xc * xc).sum())
    alpha = float((xc * yc).sum()) / sxx if sxx > 0 else nan
    intercept = float(y.mean()) - alpha * float(x.mean())
    ss_tot = float((yc * yc).sum())
    if math.isnan(alpha):
        r2 = nan
    else:
        ss_res = float(((y - (intercept + alpha * x)) ** 2).sum())
        r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    return PowerLawFit(alpha, intercept, r2, theil_sen_slope(x, y), kept, n, decades, leverage)


def assess_fit(fit: PowerLawFit) -> tuple[bool, str | None]:
    """Apply the reliability rule to a fit.

    A fit is unreliable if any of these holds (all that apply are listed in the reason):
    fewer than :data:`MIN_POINTS` kept pairs; a kept σ range under :data:`MIN_DECADES`
    decades; a leverage point, ``σ₁/σ₂ >`` :data:`MAX_LEVERAGE`; OLS and Theil–Sen slopes more
    than :data:`MAX_SLOPE_GAP` apart (or either undefined).

    Args:
        fit: the result of :func:`fit_power_law`.

    Returns:
        ``(reliable, reason)``, the reason ``None`` when reliable.
    """
    reasons: list[str] = []
    if fit.num_points < MIN_POINTS:
        reasons.append(f"only {fit.num_points} usable points (< {MIN_POINTS})")
    if not fit.sigma_decades >= MIN_DECADES:
        reasons.append(f"σ spans {fit.sigma_decades:.2g} decades (< {MIN_DECADES:g})")
    if fit.leverage > MAX_LEVERAGE:
        reasons.append(
            f"leverage point: σ₁/σ₂ = {fit.leverage:.3g} > {MAX_LEVERAGE:g}, "
            "the slope is dominated by k = 1"
        )
    gap = abs(fit.alpha - fit.alpha_theil_sen)
    if fit.num_points >= 2 and not gap <= MAX_SLOPE_GAP:
        reasons.append(f"OLS and Theil–Sen slopes differ by {gap:.3g} (> {MAX_SLOPE_GAP:g})")
    return (not reasons, "; ".join(reasons) if reasons else None)
