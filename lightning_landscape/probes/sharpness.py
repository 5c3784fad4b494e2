"""Sharpness: the top-k Hessian eigenvalues, λ_min, and λ_max against the optimizer's threshold."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

from .._validate import choice, flag, integer, optional_integer, real
from ..operators import ScaledOperator, select_parameters
from ..optim.thresholds import Stability, probed_stability
from ..report import figures, tags
from ..report.layout import SHARPNESS, SPECTRUM, Layout, multiline
from ..solvers import Criterion, EigenResult, lanczos, lanczos_ends
from .base import Probe, ProbeContext, Row, fmt, join_columns, warm_vectors

_CRITERIA: tuple[Criterion, ...] = ("residual", "eigenvalue")
WarmStorage = Literal["device", "host", "bfloat16", "host_bfloat16"]
_WARM_STORAGE: tuple[WarmStorage, ...] = ("device", "host", "bfloat16", "host_bfloat16")
_PRECONDITIONED_SEED = 104729  # the preconditioned solve draws from another stream


@dataclass(frozen=True)
class SharpnessResult:
    """What one sharpness measurement found.

    Attributes:
        top: the top-k eigenpairs (descending).
        bottom: the smallest eigenpair, or ``None`` without ``lambda_min``.
        probe_loss: the loss on the probe data.
        stability: the stability condition of the optimizer that updates the probed parameters
            (:func:`~lightning_landscape.optim.probed_stability`), or ``None`` where there is
            none (another optimizer, several optimizers, no optimizer).
        preconditioned: for an Adam-family or RMSprop optimizer, the top eigenpair of
            ``S^½ (H + Γ) S^½`` (:class:`~lightning_landscape.optim.Stability`), whose
            eigenvalue is λ₁(P⁻¹H); ``None`` for SGD, before the optimizer's first step, or
            with ``Sharpness(preconditioned=False)``.
    """

    top: EigenResult
    bottom: EigenResult | None
    probe_loss: float
    stability: Stability | None = None
    preconditioned: EigenResult | None = None

    @property
    def eigenvalues(self) -> tuple[float, ...]:
        """The top-k eigenvalues, descending."""
        return tuple(float(v) for v in self.top.eigenvalues)

    @property
    def lambda_max(self) -> float:
        """The largest eigenvalue (sharpness)."""
        return self.eigenvalues[0]

    @property
    def lambda_min(self) -> float | None:
        """The algebraically smallest eigenvalue, if computed."""
        return None if self.bottom is None else float(self.bottom.eigenvalues[0])

    @property
    def stability_threshold(self) -> float | None:
        """The threshold of the measured sharpness, or ``None`` if none was measured.

        ``(2 + 2β)/η`` on λ_max for SGD, ``(2 + 2β₁)/((1 − β₁)η)`` on λ₁(P⁻¹H) for Adam/AdamW
        (``38/η`` at β₁ = 0.9). ``None`` also while η is 0 (no edge; the ratio is then 0).
        """
        s = self.stability
        return None if s is None or self.stability_ratio is None else s.edge

    @property
    def preconditioned_lambda_max(self) -> float | None:
        """λ₁(P⁻¹H) of an Adam-family/RMSprop optimizer, if measured.

        With param groups of different η, each group's η relative to the reference group's is
        folded into ``P``.
        """
        return None if self.preconditioned is None else float(self.preconditioned.eigenvalues[0])

    @property
    def stability_ratio(self) -> float | None:
        """Sharpness over its threshold (``> 1``: past the edge of stability), if known.

        λ_max over ``(2 + 2β)/η`` for SGD, λ₁(P⁻¹H) over ``(2 + 2β₁)/((1 − β₁)η)`` for Adam;
        0 while η is 0.
        """
        s = self.stability
        if s is None:
            return None
        if s.kind == "raw":
            return self.lambda_max / s.threshold
        pre = self.preconditioned_lambda_max
        return None if pre is None else pre / s.threshold

    @property
    def raw_threshold(self) -> float | None:
        """The threshold on the raw λ_max (SGD only), for plotting against the eigenvalues."""
        s = self.stability
        return self.stability_threshold if s is not None and s.kind == "raw" else None

    @property
    def solves(self) -> tuple[EigenResult, ...]:
        """The eigensolves (top-k, then λ_min and the preconditioned solve if computed)."""
        extra = (self.bottom, self.preconditioned)
        return (self.top, *(r for r in extra if r is not None))

    @property
    def converged(self) -> bool:
        """Whether every eigenvalue met the tolerance."""
        return all(r.all_converged for r in self.solves)

    @property
    def max_residual(self) -> float:
        """The largest relative Ritz residual among the reported eigenvalues."""
        return max(float(r.residuals.max()) for r in self.solves if r.residuals.numel())

    @property
    def num_hvps(self) -> int:
        """Hessian-vector products of both solves."""
        return sum(r.num_hvps for r in self.solves)


class Sharpness(Probe):
    r"""The top-k Hessian eigenvalues (λ_max first), λ_min, and λ_max over the stability threshold.

    Thick-restart Lanczos (:func:`~lightning_landscape.lanczos`) on the round's Hessian operator,
    warm-started from the previous measurement's eigenvectors; with ``lambda_min`` the
    algebraically smallest eigenvalue (negative: a saddle direction) comes from the same Krylov
    space (:func:`~lightning_landscape.solvers.lanczos_ends`: one solve for both ends, about
    as many products as the top-k alone).

    The sharpness is also measured in the optimizer's own terms
    (:func:`~lightning_landscape.optim.probed_stability`). Under ``torch.optim.SGD`` (or SAM over
    it) λ_max is compared with its edge of stability ``(2 + 2β)/η``. Under Adam, AdamW and
    RMSprop (or SAM over them) the raw λ_max does not set stability: a third solve finds the
    top eigenvalue of the preconditioned Hessian ``P^{-1/2} H P^{-1/2}`` with ``P`` the
    optimizer's own bias-corrected preconditioner (each param group's η folded in, Adam's
    coupled L2 added to H; AdamW's decoupled decay, which moves the threshold by under 1 %, is
    left out), compared with ``(2 + 2β₁)/((1 − β₁)η)`` (``38/η`` at β₁ = 0.9) of the first
    probed param group. Before the optimizer's first step it has no state: that solve is
    skipped. With several optimizers (a GAN), SGD param groups of different thresholds or
    another optimizer there is no threshold and no ratio is logged (probe one optimizer's
    parameters with the monitor's ``params=``; :class:`UpdateCurvature` works with any).

    Logs ``landscape/lambda_max``, ``landscape/eigenvalues/<i>``, ``landscape/lambda_min``,
    ``landscape/stability_ratio`` and ``landscape/stability_threshold`` (SGD: of λ_max; Adam:
    of ``landscape/preconditioned_lambda_max``), ``landscape/preconditioned_lambda_max``
    (Adam), ``landscape/probe_loss``, ``landscape/converged`` and ``landscape/max_residual``;
    with a
    TensorBoard logger the histogram ``landscape/eigenvalues`` and, at epoch ends, the figures
    ``landscape/eigenvalue_trajectories`` and ``landscape/stability_ratio_trajectory``.

    Args:
        top_k: number of largest eigenvalues.
        lambda_min: also compute the smallest eigenvalue.
        tol: relative tolerance of the eigenvalues (see ``criterion``).
        criterion: ``"residual"`` (``tol`` bounds the relative Ritz residual) or
            ``"eigenvalue"`` (``tol`` bounds the estimated relative eigenvalue error, with the
            residual at most ``√tol``; cheaper when only eigenvalues matter, see
            :func:`~lightning_landscape.lanczos`).
        max_basis: bound on the Krylov basis (memory ``(max_basis + 1) × num_params``).
        max_basis_bytes: the same bound in bytes (per process under FSDP2): ``max_basis`` is
            lowered to fit; see :func:`~lightning_landscape.lanczos`.
        max_hvps: Hessian-vector-product budget per eigensolve.
        warm_start: start each solve from the previous measurement's eigenvectors.
        save_warm_start: keep those vectors in checkpoints (``top_k + 1`` vectors of
            ``num_params`` numbers) so a resumed run continues exactly. Not under FSDP2, where
            they are each process's slices and Lightning saves rank zero's callback state only
            (a resumed sharded run starts its first solves cold).
        warm_start_storage: where the warm-start vectors wait between probes. They are the
            only memory this probe holds between measurements: ``top_k`` vectors, plus one
            for λ_min and one for the preconditioned sharpness, each of ``num_params`` numbers
            (an eigensolve's Krylov basis is freed when it returns). ``"device"`` (default):
            as computed, on the solver's device; ``"host"``: in host memory (frees accelerator
            memory, costs one copy each way per probe); ``"bfloat16"`` / ``"host_bfloat16"``:
            also rounded to bfloat16 (half the bytes; a start vector only needs to point the
            right way, and the solve's tolerance is unchanged).
        histogram: log the eigenvalue histogram to TensorBoard.
        figure: log the eigenvalue-trajectory figure to TensorBoard at epoch ends.
        prog_bar: show the latest λ_max in Lightning's progress bar.
        preconditioned: under an Adam-family or RMSprop optimizer, also solve for the
            preconditioned sharpness (one more eigensolve of ``top_k = 1``).
        every_n_steps: see :class:`~lightning_landscape.probes.Cadence`.
        every_n_epochs: see :class:`~lightning_landscape.probes.Cadence`.
        on_train_start: see :class:`~lightning_landscape.probes.Cadence`.
        on_train_end: see :class:`~lightning_landscape.probes.Cadence`.

    Raises:
        ValueError: on invalid settings.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from lightning_landscape.probes import ProbeContext, Sharpness
        >>> model = nn.Linear(3, 1, bias=False)
        >>> x = torch.diag(torch.tensor([1.0, 2.0, 3.0]))
        >>> loss_fn = lambda m, b: 0.5 * (m(b) ** 2).sum()  # H = XᵀX = diag(1, 4, 9)
        >>> result = Sharpness(top_k=2).run(ProbeContext(model, loss_fn, [x]))
        >>> [round(v, 6) for v in result.eigenvalues], round(result.lambda_min, 6)
        ([9.0, 4.0], 1.0)
    """

    name = "sharpness"
    supports_sharding = True
    order = 0

    def __init__(
        self,
        top_k: int = 5,
        *,
        lambda_min: bool = True,
        tol: float = 1e-3,
        criterion: Criterion = "residual",
        max_basis: int | None = None,
        max_basis_bytes: int | None = None,
        max_hvps: int | None = None,
        warm_start: bool = True,
        save_warm_start: bool = True,
        warm_start_storage: WarmStorage = "device",
        histogram: bool = True,
        figure: bool = True,
        prog_bar: bool = False,
        preconditioned: bool = True,
        every_n_steps: int | None = 100,
        every_n_epochs: int | None = None,
        on_train_start: bool = True,
        on_train_end: bool = True,
    ) -> None:
        super().__init__(
            every_n_steps=every_n_steps,
            every_n_epochs=every_n_epochs,
            on_train_start=on_train_start,
            on_train_end=on_train_end,
        )
        self.top_k = integer("top_k", top_k)
        self.lambda_min = flag("lambda_min", lambda_min)
        self.tol = real("tol", tol, low=0, high=1, high_open=True)
        self.criterion: Criterion = choice("criterion", criterion, _CRITERIA)
        self.max_basis = optional_integer("max_basis", max_basis)
        self.max_basis_bytes = optional_integer("max_basis_bytes", max_basis_bytes)
        self.max_hvps = optional_integer("max_hvps", max_hvps)
        if self.max_hvps is not None and self.max_hvps < top_k:
            raise ValueError(f"max_hvps must be at least top_k = {top_k}, got {max_hvps}")
        wanted = top_k + int(lambda_min)  # λ_min is solved with the top-k, in one basis
        if self.max_basis is not None and self.max_basis < wanted + 1:
            raise ValueError(
                f"max_basis must be at least top_k + 1{' + 1 (lambda_min)' if lambda_min else ''}"
                f" = {wanted + 1}, got {max_basis}"
            )
        self.warm_start = flag("warm_start", warm_start)
        self.save_warm_start = flag("save_warm_start", save_warm_start)
        self.warm_start_storage: WarmStorage = choice(
            "warm_start_storage", warm_start_storage, _WARM_STORAGE
        )
        self.histogram = flag("histogram", histogram)
        self.figure = flag("figure", figure)
        self.prog_bar = flag("prog_bar", prog_bar)
        self.preconditioned = flag("preconditioned", preconditioned)
        self.warm_top: Tensor | None = None
        self.warm_min: Tensor | None = None
        self.warm_pre: Tensor | None = None
        self._sharded = False
        self._noted = False
        self.trajectory: list[tuple[int, tuple[float, ...], float | None, float | None]] = []
        self.ratios: list[tuple[int, float, str]] = []  # (step, stability ratio, kind)
        self._figured = 0

    def check(self, model: nn.Module, num_params: int) -> None:
        """Refuse ``top_k`` above the number of probed parameters."""
        if self.top_k > num_params:
            raise ValueError(
                f"Sharpness: top_k={self.top_k} exceeds the {num_params} probed parameters; "
                f"use top_k <= {num_params}."
            )

    # ------------------------------------------------------------------ measuring
    def run(self, ctx: ProbeContext) -> SharpnessResult:
        """The top-k and λ_min solve, and the solve in the optimizer's terms.

        The stability condition is that of the optimizer that updates the probed parameters
        (:func:`~lightning_landscape.optim.probed_stability`).
        """
        op = ctx.operator()
        self._sharded = op.sharding is not None

        settings: dict[str, Any] = {
            "tol": self.tol,
            "criterion": self.criterion,
            "max_basis": self.max_basis,
            "max_basis_bytes": self.max_basis_bytes,
            "max_hvps": self.max_hvps,
        }

        def start(*vectors: Tensor | None) -> Tensor | None:
            kept = [v for v in vectors if v is not None] if self.warm_start else []
            return warm_vectors(join_columns(kept) if kept else None, op.size, op.device)

        bottom = None
        if self.lambda_min:  # both ends from one Krylov space
            top, bottom = lanczos_ends(
                op,
                self.top_k,
                1,
                start=start(self.warm_top, self.warm_min),
                seed=ctx.seed,
                **settings,
            )
        else:
            top = lanczos(op, self.top_k, start=start(self.warm_top), seed=ctx.seed, **settings)
        stability, pre = None, None
        if ctx.optimizers:  # the optimizer and param group that update the probed parameters
            probed = [p for _, p in select_parameters(ctx.model, ctx.params)]
            stability, _ = probed_stability(ctx.optimizers, probed)
        if stability is not None and stability.kind == "preconditioned" and self.preconditioned:
            if stability.scale is None:
                if not self._noted:
                    self._noted = True
                    ctx.note(
                        f"Sharpness: {stability.optimizer} has no state before its first step; "
                        "landscape/preconditioned_lambda_max starts at the first probe after it."
                    )
            else:
                scaled = ScaledOperator(op, stability.scale, stability.shift)
                pre = lanczos(
                    scaled,
                    1,
                    start=start(self.warm_pre),
                    seed=ctx.seed + _PRECONDITIONED_SEED,
                    **settings,
                )
        result = SharpnessResult(top, bottom, ctx.probe_loss(), stability, pre)
        if self.is_finite(result) and not result.converged:
            ctx.warn(
                f"eigenvalues at step {ctx.step} did not reach tol={self.tol} (max relative "
                f"residual {result.max_residual:.2e}); logged with landscape/converged=0. Raise "
                "max_hvps or max_basis, or loosen tol."
            )
        return result

    def is_finite(self, result: SharpnessResult) -> bool:
        """Whether both solves and the probe loss are finite."""
        loss = torch.isfinite(torch.tensor(result.probe_loss))
        return bool(loss) and all(r.is_finite for r in result.solves)

    def _stored(self, vectors: Tensor | None) -> Tensor | None:
        """``vectors`` as :attr:`warm_start_storage` keeps them between probes."""
        if vectors is None or not self.warm_start:
            return None
        mode = self.warm_start_storage
        if mode.startswith("host"):
            vectors = vectors.cpu()
        if mode.endswith("bfloat16"):
            vectors = vectors.to(torch.bfloat16)
        return vectors

    def record(self, result: SharpnessResult, step: int) -> None:
        """Keep the eigenvectors for the next warm start and the point for the trajectory."""
        super().record(result, step)
        self.warm_top = self._stored(result.top.eigenvectors)
        self.warm_min = None if result.bottom is None else self._stored(result.bottom.eigenvectors)
        if result.preconditioned is not None:
            self.warm_pre = self._stored(result.preconditioned.eigenvectors)
        self.trajectory.append((step, result.eigenvalues, result.raw_threshold, result.lambda_min))
        if result.stability_ratio is not None and result.stability is not None:
            self.ratios.append((step, result.stability_ratio, result.stability.kind))

    # ------------------------------------------------------------------ reporting
    def scalars(self, result: SharpnessResult) -> dict[str, float]:
        """λ_max, the spectrum, λ_min, the stability ratio, the probe loss and convergence."""
        out = {
            tags.LAMBDA_MAX: result.lambda_max,
            tags.PROBE_LOSS: result.probe_loss,
            tags.CONVERGED: float(result.converged),
            tags.MAX_RESIDUAL: result.max_residual,
        }
        out.update({tags.eigenvalue(i): v for i, v in enumerate(result.eigenvalues)})
        if result.lambda_min is not None:
            out[tags.LAMBDA_MIN] = result.lambda_min
        if result.stability_ratio is not None:
            out[tags.STABILITY_RATIO] = result.stability_ratio
        if result.stability_threshold is not None:  # none while η is 0
            out[tags.STABILITY_THRESHOLD] = result.stability_threshold
        if result.preconditioned_lambda_max is not None:
            out[tags.PRECONDITIONED_LAMBDA_MAX] = result.preconditioned_lambda_max
        return out

    def histograms(self, result: SharpnessResult) -> dict[str, Tensor]:
        """The top-k eigenvalues as a TensorBoard histogram."""
        return {tags.EIGENVALUES: torch.tensor(result.eigenvalues)} if self.histogram else {}

    def progress_bar(self) -> dict[str, float]:
        """The latest λ_max, with ``prog_bar``."""
        if not self.prog_bar or self.last_result is None:
            return {}
        return {tags.LAMBDA_MAX: self.last_result.lambda_max}

    def epoch_figures(self) -> dict[str, Figure]:
        """The eigenvalue and stability-ratio trajectories, if measured since the last figure."""
        if not self.figure or len(self.trajectory) < 2 or len(self.trajectory) == self._figured:
            return {}
        self._figured = len(self.trajectory)
        steps, eigenvalues, thresholds, lambda_min = zip(*self.trajectory, strict=True)
        fig = figures.eigenvalue_trajectories_figure(steps, eigenvalues, thresholds, lambda_min)
        out = {tags.TRAJECTORIES_FIGURE: fig}
        if len(self.ratios) >= 2:
            at, ratios, kinds = zip(*self.ratios, strict=True)
            out[tags.STABILITY_FIGURE] = figures.stability_ratio_figure(at, ratios, kinds)
        return out

    def charts(self) -> Layout:
        """Sharpness with its threshold, the stability ratio, the spectrum, λ_min, the loss."""
        return {
            SHARPNESS: {
                "SGD: λ_max and its threshold (2+2β)/η": multiline(
                    tags.exact(tags.LAMBDA_MAX), tags.exact(tags.STABILITY_THRESHOLD)
                ),
                "Adam: preconditioned λ₁(P⁻¹H) and its threshold (2+2β₁)/((1−β₁)η)": multiline(
                    tags.exact(tags.PRECONDITIONED_LAMBDA_MAX), tags.exact(tags.STABILITY_THRESHOLD)
                ),
                "stability ratio: sharpness / threshold  (1 = edge of stability)": multiline(
                    tags.exact(tags.STABILITY_RATIO), tags.exact(tags.CONTROL_RATIO)
                ),
            },
            SPECTRUM: {
                "top-k eigenvalues": multiline(tags.EIGENVALUE_PATTERN),
                "λ_min (negative: saddle directions)": multiline(tags.exact(tags.LAMBDA_MIN)),
                "probe loss": multiline(tags.exact(tags.PROBE_LOSS)),
            },
        }

    def rows(self, result: SharpnessResult) -> list[Row]:
        """λ_max with its convergence, the other eigenvalues, λ_min."""
        conv = "converged" if result.top.all_converged else "NOT converged"
        values = result.eigenvalues
        rows = [["λ_max", fmt(values[0]), f"{conv}, max residual {result.max_residual:.1e}"]]
        rows += [[f"λ_{i + 1}", fmt(v), ""] for i, v in enumerate(values[1:], start=1)]
        if result.bottom is not None:
            low = "converged" if result.bottom.all_converged else "NOT converged"
            rows.append(["λ_min", fmt(result.lambda_min), low])
        if result.preconditioned_lambda_max is not None:
            assert result.preconditioned is not None
            pre = "converged" if result.preconditioned.all_converged else "NOT converged"
            rows.append(["λ₁(P⁻¹H)", fmt(result.preconditioned_lambda_max), pre])
            rows.append(
                ["stability ratio", fmt(result.stability_ratio), "λ₁(P⁻¹H) / (2 + 2β₁)/((1 − β₁)η)"]
            )
        elif result.stability_ratio is not None:
            rows.append(["stability ratio", fmt(result.stability_ratio), "λ_max / (2 + 2β)/η"])
        return rows

    def summary(self, result: SharpnessResult) -> dict[str, Any]:
        """Eigenvalues with residuals and convergence, threshold, cost."""
        out: dict[str, Any] = {
            "lambda_max": result.lambda_max,
            "eigenvalues": list(result.eigenvalues),
            "residuals": result.top.residuals,
            "converged": result.top.all_converged,
            "stability_threshold": result.stability_threshold,
            "stability_ratio": result.stability_ratio,
            "preconditioned_lambda_max": result.preconditioned_lambda_max,
            "optimizer": None if result.stability is None else result.stability.optimizer,
            "num_hvps": result.num_hvps,
            "seconds": sum(r.seconds for r in result.solves),
        }
        if result.bottom is not None:
            out["lambda_min"] = result.lambda_min
            out["lambda_min_residual"] = float(result.bottom.residuals[0])
            out["lambda_min_converged"] = result.bottom.all_converged
        return out

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The step guard, the trajectory and (with ``save_warm_start``) the warm vectors."""
        # Sharded vectors are this process's slices; Lightning saves rank zero's state only.
        keep = self.save_warm_start and self.warm_start and not self._sharded
        state = super().state_dict()
        state["trajectory"] = list(self.trajectory)
        state["ratios"] = list(self.ratios)
        state["warm_top"] = self.warm_top.cpu() if keep and self.warm_top is not None else None
        state["warm_min"] = self.warm_min.cpu() if keep and self.warm_min is not None else None
        state["warm_pre"] = self.warm_pre.cpu() if keep and self.warm_pre is not None else None
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output."""
        super().load_state_dict(state_dict)
        self.trajectory = [
            (int(s), tuple(e), t, m) for s, e, t, m in state_dict.get("trajectory", [])
        ]
        self.ratios = [(int(s), float(r), str(k)) for s, r, k in state_dict.get("ratios", [])]
        self._figured = 0
        self.warm_top = state_dict.get("warm_top")
        self.warm_min = state_dict.get("warm_min")
        self.warm_pre = state_dict.get("warm_pre")
