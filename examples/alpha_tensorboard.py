"""Per-layer curvature exponent α during training, in TensorBoard, for a CNN and a transformer.

    python examples/alpha_tensorboard.py     # writes landscape_logs/alpha_{cnn,transformer}
    tensorboard --logdir landscape_logs      # landscape/alpha_group/*, figure alpha_fit

1. The demo's digits CNN (`lightning_landscape.cli.demo.DigitsCNN`, width 16) on scikit-learn's
   bundled 8×8 digits, SGD with momentum, 15 epochs.
2. A 2-layer causal transformer (d = 64, 4 heads, `nn.TransformerEncoderLayer`) on a synthetic task
   that needs no download: predict (x_t + x_{t-1}) mod 16 at every position of random token
   sequences; AdamW, 1,500 steps.

Both log α every few hundred steps and at the end; the script prints the final mean α per layer
type and how many layers of each type gave a reliable fit.
"""

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_landscape as ll
from lightning_landscape.cli.demo import DigitsCNN, load_digits_tensors

VOCAB, SEQ = 16, 12


class TinyTransformer(pl.LightningModule):
    def __init__(self, d: int = 64, layers: int = 2, lr: float = 3e-3) -> None:
        super().__init__()
        self.lr = lr
        self.embed = nn.Embedding(VOCAB, d)
        self.pos = nn.Parameter(0.02 * torch.randn(SEQ, d))
        layer = nn.TransformerEncoderLayer(d, 4, 2 * d, dropout=0.0, batch_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, VOCAB)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(SEQ))

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x) + self.pos
        return self.head(self.blocks(h, mask=self.mask, is_causal=True))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x).reshape(-1, VOCAB), y.reshape(-1))
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def sum_task(n: int, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, VOCAB, (n, SEQ), generator=g)
    y = (x + torch.roll(x, 1, dims=1)) % VOCAB
    y[:, 0] = x[:, 0]
    return TensorDataset(x, y)


def fit(name: str, model: pl.LightningModule, data: TensorDataset, **trainer_kw) -> None:  # type: ignore[no-untyped-def]
    monitor = ll.LandscapeMonitor(
        probes=[ll.CurvatureExponent(20, every_n_steps=300)],  # α only in this example
        num_probe_samples=512,
    )
    trainer = pl.Trainer(
        logger=TensorBoardLogger("landscape_logs", name=f"alpha_{name}"),
        callbacks=[monitor],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **trainer_kw,
    )
    loader = DataLoader(
        data, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    trainer.fit(model, loader)
    results = monitor.probe_named("alpha").last_result or {}
    print(f"\n{name}: TensorBoard run {trainer.logger.log_dir}")
    for layer, r in results.items():
        print(
            f"  {layer:40s} {r.layer_type:9s} α={r.alpha:5.2f} R²={r.r2:.2f} "
            f"points={r.num_points:2d} σ decades={r.sigma_decades:.2f} "
            f"reliable={r.reliable}{'' if r.reliable else f' ({r.unreliable_reason})'}"
        )
    for kind, value in sorted(ll.group_alphas(results).items()):
        n_ok = sum(r.reliable for r in results.values() if r.layer_type == kind)
        n_all = sum(r.layer_type == kind for r in results.values())
        print(f"  mean α over reliable {kind} layers: {value:.2f} ({n_ok} of {n_all} reliable)")


def main() -> None:
    pl.seed_everything(0, verbose=False)
    train, _, _ = load_digits_tensors()
    fit("cnn", DigitsCNN(width=16), train, max_epochs=15)
    pl.seed_everything(0, verbose=False)
    fit("transformer", TinyTransformer(), sum_task(8192), max_steps=1500, max_epochs=-1)


if __name__ == "__main__":
    main()
