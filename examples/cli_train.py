"""LightningCLI entry point for `cli_config.yaml` (the monitor is configured in YAML only).

python examples/cli_train.py fit --config examples/cli_config.yaml

The model and data classes are given to LightningCLI here, in code, so the config holds their
init args in LightningCLI's plain form (`model: {lr: 0.1}`). To analyse a checkpoint of this run,
name the classes:

lightning-landscape analyze CKPT --config examples/cli_config.yaml \\
    --model-class lightning_landscape.cli.demo.DigitsCNN \\
    --data-class lightning_landscape.cli.demo.DigitsDataModule
"""

from lightning.pytorch.cli import LightningCLI

from lightning_landscape.cli.demo import DigitsCNN, DigitsDataModule

if __name__ == "__main__":
    LightningCLI(DigitsCNN, DigitsDataModule)
