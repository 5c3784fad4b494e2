"""Preconditioned sharpness of a small transformer under AdamW with warm-up and cosine decay.

A Hugging Face GPT-2 (2 layers, width 64, random init from a config: nothing is downloaded)
learns modular addition ``a + b mod 23`` with AdamW (β = (0.9, 0.95), weight decay 0.1), a
linear warm-up and a cosine decay, on the CPU. ``LandscapeMonitor`` measures, on its default
cadence machinery:

* ``landscape/preconditioned_lambda_max``: λ₁(P⁻¹H) with AdamW's own bias-corrected
  preconditioner, against ``landscape/stability_threshold`` = (2 + 2β₁)/((1 − β₁)η) = 38/η;
* ``landscape/stability_ratio``: their quotient (1 = Adam's edge of stability);
* ``landscape/lambda_max`` (the raw Hessian's, not what sets Adam's stability) and
  ``landscape/update/curvature`` (the curvature along the step AdamW just took).

    python examples/adamw_transformer.py          # prints the table, writes the figure
    tensorboard --logdir landscape_logs           # the same numbers under landscape/
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import matplotlib
import torch
import transformers
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from lightning_landscape import LandscapeMonitor, Sharpness, UpdateCurvature

matplotlib.use("Agg")
import matplotlib.pyplot as plt

P = 23  # the modulus; token P is "="


def modular_addition(seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """All ``a + b mod P`` as ``[a, b, =, c]``, split in half (train, held out)."""
    a, b = torch.meshgrid(torch.arange(P), torch.arange(P), indexing="ij")
    a, b = a.reshape(-1), b.reshape(-1)
    tokens = torch.stack([a, b, torch.full_like(a, P), (a + b) % P], dim=1)
    order = torch.randperm(len(tokens), generator=torch.Generator().manual_seed(seed))
    half = len(tokens) // 2
    return TensorDataset(tokens[order[:half]]), TensorDataset(tokens[order[half:]])


class ModularGPT(pl.LightningModule):
    def __init__(self, lr: float, warmup: int, total: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        config = transformers.GPT2Config(
            vocab_size=P + 1, n_positions=4, n_embd=64, n_layer=2, n_head=4,
            bos_token_id=P, eos_token_id=P, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )  # fmt: skip
        self.model = transformers.GPT2LMHeadModel(config)
        self.lr, self.warmup, self.total = lr, warmup, total

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        (tokens,) = batch
        labels = torch.full_like(tokens, -100)
        labels[:, -1] = tokens[:, -1]  # only the answer c is scored
        loss: Tensor = self.model(input_ids=tokens, labels=labels).loss
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr, betas=(0.9, 0.95), weight_decay=0.1)

        def schedule(step: int) -> float:  # linear warm-up, then cosine decay to 10 %
            if step < self.warmup:
                return (step + 1) / self.warmup
            progress = (step - self.warmup) / max(1, self.total - self.warmup)
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--warmup", type=int, default=60)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("docs/images/adamw_preconditioned.png"))
    args = parser.parse_args()

    train, _ = modular_addition()
    loader = DataLoader(
        train, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    monitor = LandscapeMonitor(
        probes=[
            Sharpness(1, lambda_min=False, every_n_steps=args.every),
            UpdateCurvature(every_n_steps=args.every),
        ],
        num_probe_samples=128,
    )
    module = ModularGPT(args.lr, args.warmup, args.steps)
    trainer = pl.Trainer(
        max_steps=args.steps,
        callbacks=[monitor],
        logger=TensorBoardLogger("landscape_logs", name="adamw_transformer"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader)

    print(f"{'step':>5} {'38/η':>10} {'λ₁(P⁻¹H)':>10} {'ratio':>6} {'raw λ_max':>10} {'loss':>7}")
    rows = [r for r in monitor.history if r.preconditioned_lambda_max is not None]
    for r in rows:
        assert r.stability_threshold is not None and r.stability_ratio is not None
        print(
            f"{r.step:5d} {r.stability_threshold:10.4g} {r.preconditioned_lambda_max:10.4g} "
            f"{r.stability_ratio:6.3f} {r.lambda_max:10.4g} {r.probe_loss:7.4f}"
        )
    ratios = [r.stability_ratio for r in rows]
    print(f"stability ratio: max {max(ratios):.3f}, last {ratios[-1]:.3f}")  # type: ignore[type-var]

    steps = [r.step for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.6), constrained_layout=True)
    left.semilogy(steps, [r.preconditioned_lambda_max for r in rows], label="λ₁(P⁻¹H)")
    left.semilogy(steps, [r.stability_threshold for r in rows], "k--", label="38/η")
    left.semilogy(steps, [r.lambda_max for r in rows], alpha=0.6, label="raw λ_max")
    left.set(xlabel="step", title="AdamW: preconditioned sharpness and its threshold")
    left.legend()
    right.plot(steps, ratios, label="landscape/stability_ratio")
    right.axhline(1.0, color="k", ls="--", lw=0.8)
    right.set(xlabel="step", ylabel="λ₁(P⁻¹H) / (38/η)", title="stability ratio (warm-up, cosine)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
