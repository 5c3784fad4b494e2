"""Regenerate the README gallery (docs/images/*.png) from one monitored training run.

Trains the demo's digits CNN (scikit-learn's bundled ``load_digits``, no download) with every
picture of :class:`~lightning_landscape.LandscapeMonitor` switched on, then writes the figures the
monitor logs to TensorBoard as PNG files, plus the loss barrier between the weights after epoch 5
and at the end:

    python docs/make_gallery.py                 # ~45 s on 2 CPU cores
    python docs/make_gallery.py --out /tmp/gallery --epochs 6
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

import lightning_landscape as ll
from lightning_landscape.cli.demo import DigitsCNN, load_digits_tensors
from lightning_landscape.report.figures import connectivity_figure


class _Snapshot(Callback):
    """Keeps a copy of the weights at the end of one epoch."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self.state: dict[str, Any] | None = None

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch + 1 == self.epoch:
            self.state = copy.deepcopy(pl_module.state_dict())


def main() -> None:
    """Train, then write the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "images"))
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    pl.seed_everything(args.seed, verbose=False)
    train, val, _ = load_digits_tensors(args.seed)
    model = DigitsCNN(width=8)
    monitor = ll.LandscapeMonitor(
        probes=[
            ll.Sharpness(4, every_n_steps=20),
            ll.Trace(every_n_steps=20),
            ll.SpectralDensity(num_runs=6, every_n_steps=100),
            # α and Δ₂ at the end of training only
            ll.CurvatureExponent(12, every_n_steps=None),
            ll.Stabilization(D=5, sweep=True, sweep_points=6, sweep_repeats=4, every_n_steps=None),
            ll.LossSlice(steps=21, span=1.0, every_n_epochs=args.epochs),
        ],
        num_probe_samples=256,
    )
    snapshot = _Snapshot(min(5, args.epochs))
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        logger=False,
        callbacks=[monitor, snapshot],
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        accelerator="cpu",
    )
    gen = torch.Generator().manual_seed(args.seed)
    trainer.fit(model, DataLoader(train, batch_size=64, shuffle=True, generator=gen))
    step = trainer.global_step
    sweep = monitor.probe_named("delta2").last_result.sweep
    density = monitor.probe_named("density").last_result
    print(f"Δ₂^(D) sweep slope {sweep.slope:.2f} ± {sweep.slope_stderr:.2f} (theory -2)")
    lower, upper = density.negative_mass_bounds()
    print(f"negative mass {density.negative_mass():.2f} (bounds {lower:.2f}-{upper:.2f})")
    figures = {}  # the same figures the monitor logs to TensorBoard, by the tag's last part
    for probe in monitor.probes:
        if probe.last_result is not None:
            images = {**probe.figures(probe.last_result, step), **probe.epoch_figures()}
            figures.update({tag.rpartition("/")[2]: fig for tag, fig in images.items()})
    if snapshot.state is not None:
        x, y = val.tensors

        def loss_fn(m: torch.nn.Module, batch: Any) -> torch.Tensor:
            return F.cross_entropy(m(batch[0]), batch[1])

        barrier = ll.mode_connectivity(
            model, snapshot.state, model.state_dict(), loss_fn, (x, y), steps=21
        )
        figures["connectivity"] = connectivity_figure(barrier)
        print(f"barrier epoch {snapshot.epoch} -> {args.epochs}: {barrier.barrier:.4f}")
    for name, fig in figures.items():
        path = out / f"{name}.png"
        fig.savefig(path, dpi=90)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
