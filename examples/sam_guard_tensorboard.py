"""Act on curvature: SAM with a sharpness-driven ρ and an LR guard at the edge of stability.

Trains the digits CNN of the demo (scikit-learn's bundled ``load_digits``, no download) three
times for the same number of steps, with a learning rate large enough that plain SGD is driven
past the edge of stability (η·λ_max > 2 + 2β at the start) and diverges:

* ``sgd``: SGD with momentum, monitored only;
* ``sgd+guard``: the same, with :class:`~lightning_landscape.StabilityLRGuard` keeping
  η·λ_max/(2 + 2β) ≤ 0.8 by scaling the learning rate;
* ``sam+guard``: :class:`~lightning_landscape.SAM` over the same SGD, with
  :class:`~lightning_landscape.SharpnessAdaptiveRho` setting ρ from λ_max and the guard.

Each run logs to TensorBoard under ``landscape_logs/sam_guard/<run>``: ``landscape/lambda_max``
with the stability threshold (Custom Scalars tab, "landscape: sharpness"),
``landscape/control/lr_scale`` and ``landscape/control/rho``. A table of the final λ_max,
stability ratio and validation accuracy is printed at the end.

    python examples/sam_guard_tensorboard.py            # ~30-60 s on 2 CPU cores
    tensorboard --logdir landscape_logs/sam_guard
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader

from lightning_landscape import (
    SAM,
    LandscapeMonitor,
    Sharpness,
    SharpnessAdaptiveRho,
    StabilityLRGuard,
)
from lightning_landscape.cli.demo import DigitsCNN, load_digits_tensors


class SAMDigitsCNN(DigitsCNN):
    """The demo CNN trained with SAM over SGD + momentum (BatchNorm statistics from pass one)."""

    def __init__(self, rho: float = 0.05, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rho = rho

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return SAM(
            self.parameters(),
            torch.optim.SGD,
            rho=self.rho,
            model=self,
            lr=self.hparams["lr"],
            momentum=self.hparams["momentum"],
        )


def train(run: str, args: argparse.Namespace) -> dict[str, float]:
    pl.seed_everything(args.seed, verbose=False)
    train_set, val_set, _ = load_digits_tensors(args.seed)
    hooks: list[Any] = []
    if run != "sgd":
        hooks.append(StabilityLRGuard(target=0.8, recovery=1.05))
    if run == "sam+guard":
        hooks.insert(0, SharpnessAdaptiveRho(rho_min=0.02, rho_max=0.2, base_rho=0.05))
        model: DigitsCNN = SAMDigitsCNN(rho=0.05, lr=args.lr, momentum=0.9)
    else:
        model = DigitsCNN(lr=args.lr, momentum=0.9)
    monitor = LandscapeMonitor(
        probes=[Sharpness(2, lambda_min=False, every_n_steps=args.every_n_steps)],
        num_probe_samples=256,
        hooks=hooks,
    )
    logger = TensorBoardLogger(args.log_dir, name="sam_guard", version=run.replace("+", "_"))
    trainer = pl.Trainer(
        max_steps=args.max_steps,
        logger=logger,
        callbacks=[monitor],
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        log_every_n_steps=10,
        accelerator="cpu",
    )
    gen = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    trainer.fit(
        model,
        DataLoader(train_set, batch_size=64, shuffle=True, generator=gen),
        DataLoader(val_set, batch_size=512),
    )
    seconds = time.perf_counter() - start
    val = trainer.validate(model, DataLoader(val_set, batch_size=512), verbose=False)[0]
    last = monitor.history[-1]
    peak = max(r.stability_ratio or 0.0 for r in monitor.history)
    return {
        "lambda_max": last.lambda_max,
        "ratio": last.stability_ratio or float("nan"),
        "peak_ratio": peak,
        "val_acc": float(val["val/acc"]),
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--every-n-steps", type=int, default=5)
    parser.add_argument("--lr", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-dir", default="landscape_logs")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = {run: train(run, args) for run in ("sgd", "sgd+guard", "sam+guard")}
    print(f"\n{args.max_steps} steps, lr {args.lr}, momentum 0.9 (threshold (2+2β)/η)")
    print(f"{'run':<10} {'λ_max':>8} {'η·λ/(2+2β)':>11} {'max ratio':>9} {'val acc':>8} {'sec':>6}")
    for run, r in rows.items():
        print(
            f"{run:<10} {r['lambda_max']:8.3f} {r['ratio']:11.3f} {r['peak_ratio']:9.2f} "
            f"{r['val_acc']:8.3f} {r['seconds']:6.1f}"
        )
    print(f"TensorBoard: tensorboard --logdir {args.log_dir}/sam_guard")


if __name__ == "__main__":
    main()
