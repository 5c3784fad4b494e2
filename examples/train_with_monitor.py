"""Add LandscapeMonitor to an ordinary LightningModule (an MLP on synthetic data).

python examples/train_with_monitor.py
tensorboard --logdir landscape_logs
"""

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_landscape import LandscapeMonitor


class Classifier(pl.LightningModule):
    def __init__(self, lr: float = 0.2) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def main() -> None:
    pl.seed_everything(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 32, generator=g)
    y = (x[:, :4] + 0.5 * torch.randn(2048, 4, generator=g)).argmax(dim=1)
    train = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True, generator=g)

    monitor = LandscapeMonitor(every_n_steps=25, top_k=3)
    trainer = pl.Trainer(
        max_epochs=5,
        callbacks=[monitor],
        logger=TensorBoardLogger("landscape_logs", name="example"),
        enable_checkpointing=False,
    )
    trainer.fit(Classifier(), train)
    for report in monitor.history:
        print(
            f"step {report.step:4d}  λ_max {report.lambda_max:.4f}  "
            f"η·λ_max/2 {report.stability_ratio:.3f}  λ_min {report.lambda_min:.4f}"
        )


if __name__ == "__main__":
    main()
