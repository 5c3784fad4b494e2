"""LightningCLI entry point for `cli_config.yaml` (the monitor is configured in YAML only).

python examples/cli_train.py fit --config examples/cli_config.yaml
"""

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LightningCLI
from torch.utils.data import DataLoader

from lightning_landscape.demo import DigitsCNN, load_digits_tensors


class DigitsData(pl.LightningDataModule):
    def __init__(self, batch_size: int = 64) -> None:
        super().__init__()
        self.batch_size = batch_size

    def setup(self, stage: str) -> None:
        self.train, self.val, _ = load_digits_tensors()

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True, generator=g)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=256)


if __name__ == "__main__":
    LightningCLI(DigitsCNN, DigitsData)
