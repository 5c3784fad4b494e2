"""Per-layer curvature exponent α of the demo's digits CNN after a short training run.

    python examples/alpha_digits.py

Trains `lightning_landscape.cli.demo.DigitsCNN(width=16)` for 15 epochs on scikit-learn's bundled
digits (seed 0), then fits h_k = c·σ_k^α per layer on the first 1,024 training images and prints
α, Theil–Sen α, R², points kept, σ decades and the reliability verdict, and the mean α per type.
"""

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import lightning_landscape as ll
from lightning_landscape.cli.demo import DigitsCNN, load_digits_tensors


def main() -> None:
    pl.seed_everything(0, verbose=False)
    train, _, _ = load_digits_tensors()
    model = DigitsCNN(width=16)
    trainer = pl.Trainer(
        max_epochs=15,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    loader = DataLoader(
        train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    trainer.fit(model, loader)
    x, y = train.tensors[0][:1024], train.tensors[1][:1024]
    results = ll.curvature_exponents(
        model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), (x, y), top_k=20
    )
    for name, r in results.items():
        print(
            f"{name:14s} {r.layer_type:5s} {r.shape!s:10s} α={r.alpha:.2f} "
            f"Theil-Sen={r.alpha_theil_sen:.2f} R²={r.r2:.2f} points={r.num_points} "
            f"σ decades={r.sigma_decades:.2f} reliable={r.reliable} ({r.unreliable_reason})"
        )
    print("mean α per layer type:", ll.group_alphas(results))


if __name__ == "__main__":
    main()
