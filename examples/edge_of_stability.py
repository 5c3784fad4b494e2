"""The edge of stability, read from what LandscapeMonitor logs: full-batch GD and full-batch Adam.

Cohen et al. (ICLR 2021): under full-batch gradient descent the sharpness λ_max rises until it
reaches 2/η and then hovers there. Cohen et al. (2022): under full-batch Adam the preconditioned
sharpness λ₁(P⁻¹H) rises to (2 + 2β₁)/((1 − β₁)η) = 38/η and hovers there. Both are the monitor's
``landscape/stability_ratio`` reaching 1. A tanh MLP on 512 digits of scikit-learn's bundled
``load_digits`` (nothing is downloaded), trained with MSE on one-hot targets as in the papers.

    python examples/edge_of_stability.py            # writes docs/images/edge_of_stability.png
    python examples/edge_of_stability.py --steps 400 --out /tmp/eos.png   # a quicker look
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import matplotlib
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_landscape import LandscapeMonitor, Sharpness

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def digits(n: int = 512) -> TensorDataset:
    """``n`` standardised digits (64 pixels) with one-hot targets."""
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x[:n], dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    return TensorDataset(x, F.one_hot(torch.tensor(y[:n]), 10).float())


class TanhMLP(pl.LightningModule):
    def __init__(self, optimizer: str, lr: float) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10)
        )
        self.optimizer, self.lr = optimizer, lr
        self.losses: list[float] = []

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = 0.5 * F.mse_loss(self.net(x), y, reduction="sum") / len(x)
        self.losses.append(float(loss))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def run(optimizer: str, lr: float, steps: int, every: int) -> tuple[list[int], list[float], Any]:
    data = digits()
    full = DataLoader(data, batch_size=len(data))  # full batch: one step per epoch
    sharp = Sharpness(1, lambda_min=False, every_n_steps=every, histogram=False, figure=False)
    monitor = LandscapeMonitor(probes=[sharp], probe_dataloader=full)
    module = TanhMLP(optimizer, lr)
    trainer = pl.Trainer(
        max_steps=steps,
        callbacks=[monitor],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, full)
    kept = [r for r in monitor.history if r.stability_ratio is not None]
    return [r.step for r in kept], [r.stability_ratio for r in kept], module  # type: ignore[misc]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--gd-lr", type=float, default=0.3)
    parser.add_argument("--adam-lr", type=float, default=4e-3)
    parser.add_argument("--out", type=Path, default=Path("docs/images/edge_of_stability.png"))
    args = parser.parse_args()

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), constrained_layout=True)
    runs = [
        ("gd", args.gd_lr, "full-batch GD: η·λ_max / 2"),
        ("adam", args.adam_lr, "full-batch Adam: λ₁(P⁻¹H) / (38/η)"),
    ]
    for ax, (name, lr, title) in zip(axes, runs, strict=True):
        steps, ratios, module = run(name, lr, args.steps, args.every)
        late = [r for s, r in zip(steps, ratios, strict=True) if s >= args.steps // 2]
        first = next((s for s, r in zip(steps, ratios, strict=True) if r >= 0.9), None)
        print(
            f"{name:4s} η={lr:g}: stability ratio first ≥ 0.9 at step {first}; over steps "
            f"{args.steps // 2}-{args.steps}: median {statistics.median(late):.3f}, "
            f"range {min(late):.3f}-{max(late):.3f}; loss {module.losses[0]:.3f} -> "
            f"{module.losses[-1]:.4f}"
        )
        ax.plot(steps, ratios, lw=1.2, label="landscape/stability_ratio")
        ax.axhline(1.0, color="k", ls="--", lw=0.8, label="edge of stability")
        ax.set(title=f"{title}  (η = {lr:g})", xlabel="step", ylabel="stability ratio")
        ax.set_ylim(0, max(1.5, 1.1 * max(ratios)))
        ax.legend(loc="lower right")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
