"""The demo: train a small CNN on scikit-learn's bundled digits with the monitor on.

Run it with ``./run.sh demo`` (sets everything up), ``python -m lightning_landscape.cli demo`` or
``lightning-landscape demo``. It needs no download: the 8×8 digits ship inside scikit-learn (a
synthetic stand-in is used, and said so, if scikit-learn is missing). It writes TensorBoard logs
and prints where they are and a table of what the monitor measured.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from ..callbacks import LandscapeMonitor, ProbeReport
from ..probes import (
    CurvatureExponent,
    LossSlice,
    Sharpness,
    SpectralDensity,
    Stabilization,
    Trace,
)


def load_digits_tensors(seed: int = 0) -> tuple[TensorDataset, TensorDataset, str]:
    """The 8×8 digits as (train, validation) tensor datasets, standardised.

    Args:
        seed: seed of the train/validation split.

    Returns:
        ``(train, val, source)``, where ``source`` names where the data came from.
    """
    try:
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.tensor(digits.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
        y = torch.tensor(digits.target, dtype=torch.long)
        source = "scikit-learn load_digits (1,797 8x8 images, bundled, no download)"
    except ImportError:
        gen = torch.Generator().manual_seed(seed)
        centers = torch.randn(10, 1, 8, 8, generator=gen)
        y = torch.randint(0, 10, (1797,), generator=gen)
        x = centers[y] + 0.8 * torch.randn(1797, 1, 8, 8, generator=gen)
        source = "synthetic 8x8 Gaussian clusters (scikit-learn is not installed)"
    x = (x - x.mean()) / x.std()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_val = len(y) // 5
    val, train = perm[:n_val], perm[n_val:]
    return TensorDataset(x[train], y[train]), TensorDataset(x[val], y[val]), source


class DigitsCNN(pl.LightningModule):
    """A small CNN with BatchNorm and dropout, trained with SGD + momentum.

    Args:
        lr: learning rate.
        momentum: heavy-ball momentum.
        width: channels of the first convolution.
    """

    def __init__(self, lr: float = 0.05, momentum: float = 0.9, width: int = 8) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Dropout(0.1),
            nn.Linear(2 * width * 16, 10),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Class logits."""
        return self.net(x)  # type: ignore[no-any-return]

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Cross-entropy on a batch; logs ``train/loss``."""
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Validation loss and accuracy."""
        x, y = batch
        logits = self(x)
        self.log("val/loss", F.cross_entropy(logits, y))
        self.log("val/acc", (logits.argmax(-1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """SGD with heavy-ball momentum (so the stability threshold is (2 + 2β)/η)."""
        return torch.optim.SGD(
            self.parameters(), lr=self.hparams["lr"], momentum=self.hparams["momentum"]
        )


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock: two 3×3 convolutions with BatchNorm and a shortcut.

    Args:
        cin: input channels.
        cout: output channels.
        stride: stride of the first convolution (and of the projection shortcut).
    """

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        """The block's output."""
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR-style ResNet-18 (torchvision's layout with a 3×3 stem, no max-pool).

    4 stages × 2 BasicBlocks of ``width × (1, 2, 4, 8)`` channels and a linear head; at the
    default ``width=64`` it has 11.2 M parameters, like torchvision's ``resnet18`` on CIFAR.
    Defined here because torchvision's wheel is not always installable next to a given torch.

    Args:
        num_classes: outputs of the head.
        width: channels of the first stage.
        in_channels: input channels.
    """

    def __init__(self, num_classes: int = 10, width: int = 64, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        stages, cin = [], width
        for i, cout in enumerate(width * m for m in (1, 2, 4, 8)):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))  # type: ignore[no-any-return]


class DigitsDataModule(pl.LightningDataModule):
    """The 8×8 digits of :func:`load_digits_tensors` (shuffled training batches, seeded).

    Args:
        batch_size: training batch size.
        seed: seed of the split and of the shuffling.
    """

    def __init__(self, batch_size: int = 64, seed: int = 0) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.seed = seed

    def setup(self, stage: str) -> None:
        """Load (or synthesise) the digits."""
        self.train, self.val, self.source = load_digits_tensors(self.seed)

    def train_dataloader(self) -> DataLoader[tuple[Tensor, ...]]:
        """Shuffled training batches from a seeded generator."""
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True, generator=generator)

    def val_dataloader(self) -> DataLoader[tuple[Tensor, ...]]:
        """The validation set in batches of 256."""
        return DataLoader(self.val, batch_size=256)


def format_table(history: Sequence[ProbeReport]) -> str:
    """A plain-text table of probe reports.

    Args:
        history: the monitor's reports.

    Returns:
        The table as a string.
    """

    def num(value: float | None, fmt: str = "{:.4g}") -> str:
        return "-" if value is None else fmt.format(value)

    header = ("step", "λ_max", "λ_2", "λ_min", "trace ± se", "η·λ/(2+2β)", "HVPs", "sec", "conv")
    rows = [header]
    for r in history:
        trace = "-" if r.trace is None else f"{r.trace:.4g} ± {num(r.trace_stderr, '{:.2g}')}"
        rows.append(
            (
                str(r.step),
                num(r.lambda_max),
                num(r.eigenvalues[1] if len(r.eigenvalues) > 1 else None),
                num(r.lambda_min),
                trace,
                num(r.stability_ratio, "{:.3f}"),
                str(r.num_hvps),
                f"{r.seconds:.2f}",
                "yes" if r.converged else "NO",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run_demo(
    max_epochs: int = 40,
    every_n_steps: int = 60,
    top_k: int = 5,
    log_dir: str = "landscape_logs",
    seed: int = 0,
    max_steps: int = -1,
    progress: bool = True,
) -> tuple[LandscapeMonitor, Path]:
    """Train the digits CNN with a :class:`LandscapeMonitor` and TensorBoard logging.

    Args:
        max_epochs: training epochs.
        every_n_steps: probe cadence.
        top_k: eigenvalues per probe.
        log_dir: TensorBoard root directory.
        seed: global seed.
        max_steps: stop after this many steps (``-1``: no limit).
        progress: show Lightning's progress bar.

    Returns:
        The monitor (with its ``history``) and the TensorBoard run directory.
    """
    pl.seed_everything(seed, verbose=False)
    train, val, source = load_digits_tensors(seed)
    print(f"data: {source}; {len(train)} train / {len(val)} validation samples")
    model = DigitsCNN()
    monitor = LandscapeMonitor(
        probes=[
            Sharpness(top_k, every_n_steps=every_n_steps, prog_bar=True),
            Trace(every_n_steps=every_n_steps),
            SpectralDensity(every_n_steps=4 * every_n_steps),
            CurvatureExponent(12, every_n_steps=2 * every_n_steps),
            Stabilization(
                D=5, sweep=True, sweep_points=5, sweep_repeats=3, every_n_steps=4 * every_n_steps
            ),
            LossSlice(every_n_epochs=10),
        ],
        num_probe_samples=256,
    )
    logger = TensorBoardLogger(log_dir, name="demo")
    trainer = pl.Trainer(
        max_epochs=max_epochs,
        max_steps=max_steps,
        accelerator="auto",
        devices=1,
        logger=logger,
        callbacks=[monitor],
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress,
        log_every_n_steps=10,
    )
    generator = torch.Generator().manual_seed(seed)
    trainer.fit(
        model,
        DataLoader(train, batch_size=64, shuffle=True, generator=generator),
        DataLoader(val, batch_size=256),
    )
    return monitor, Path(logger.log_dir)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point of the demo.

    Args:
        argv: arguments (default ``sys.argv[1:]``).

    Returns:
        The process exit code.
    """
    parser = argparse.ArgumentParser(
        prog="lightning-landscape demo",
        description="Train a small CNN on the bundled 8x8 digits with LandscapeMonitor on, write "
        "TensorBoard logs, and print what was measured.",
    )
    parser.add_argument("--max-epochs", type=int, default=40)
    parser.add_argument("--max-steps", type=int, default=-1, help="stop early (-1: no limit)")
    parser.add_argument("--every-n-steps", type=int, default=60, help="probe cadence")
    parser.add_argument("--top-k", type=int, default=5, help="eigenvalues per probe")
    parser.add_argument("--log-dir", default="landscape_logs", help="TensorBoard root directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    monitor, run_dir = run_demo(
        max_epochs=args.max_epochs,
        every_n_steps=args.every_n_steps,
        top_k=args.top_k,
        log_dir=args.log_dir,
        seed=args.seed,
        max_steps=args.max_steps,
        progress=not args.no_progress,
    )
    total = time.perf_counter() - start
    probe_seconds = monitor.probe_seconds
    print()
    print(format_table(monitor.history))
    print()
    print(
        f"{monitor.num_probes} probe rounds took {probe_seconds:.1f} s of {total:.1f} s "
        f"({100 * probe_seconds / max(total, 1e-9):.1f} %)."
    )
    print(f"TensorBoard logs: {run_dir}")
    print(f"View them with:   tensorboard --logdir {Path(args.log_dir)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
