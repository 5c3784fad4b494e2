"""Tiny LightningModules, seeded synthetic data and an in-memory logger for callback tests.

Everything here is deliberately small (a few hundred samples, MLPs with a few hundred
parameters) so a ``Trainer`` run of ~20-60 steps on CPU takes well under a second.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import Logger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_landscape import LandscapeMonitor, Probe, Sharpness, Trace

IN_FEATURES = 8
NUM_CLASSES = 3


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


def make_dataset(
    num_samples: int = 256,
    in_features: int = IN_FEATURES,
    num_classes: int = NUM_CLASSES,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> TensorDataset:
    """A seeded, learnable classification problem (labels from a random linear teacher)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_samples, in_features, generator=gen)
    teacher = torch.randn(in_features, num_classes, generator=gen)
    y = (x @ teacher + 0.3 * torch.randn(num_samples, num_classes, generator=gen)).argmax(dim=1)
    return TensorDataset(x.to(dtype), y)


def make_dataloader(
    dataset: TensorDataset | None = None,
    batch_size: int = 16,
    shuffle: bool = True,
    seed: int | None = 0,
) -> DataLoader[Any]:
    """A shuffled train loader with its own seeded generator.

    With ``seed=None`` the loader has no generator and shuffles with the global torch RNG.
    """
    dataset = make_dataset() if dataset is None else dataset
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=gen)


class SyntheticDataModule(pl.LightningDataModule):
    """jsonargparse-friendly datamodule around :func:`make_dataset` (for LightningCLI tests)."""

    def __init__(self, num_samples: int = 256, batch_size: int = 16, seed: int = 0) -> None:
        super().__init__()
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.dataset: TensorDataset | None = None

    def setup(self, stage: str) -> None:
        self.dataset = make_dataset(self.num_samples, seed=self.seed)

    def train_dataloader(self) -> DataLoader[Any]:
        return make_dataloader(self.dataset, self.batch_size, shuffle=True, seed=self.seed)


# --------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------


class ClassifierModule(pl.LightningModule):
    """MLP with Dropout and BatchNorm1d, SGD with momentum, optional torchmetrics accuracy.

    ``training_step`` returns the loss tensor and logs ``train_loss`` (and ``train_acc`` at epoch
    level with ``with_metric=True``).
    """

    def __init__(
        self,
        in_features: int = IN_FEATURES,
        hidden: int = 16,
        num_classes: int = NUM_CLASSES,
        lr: float = 0.05,
        momentum: float = 0.9,
        dropout: float = 0.2,
        batch_norm: bool = True,
        with_metric: bool = False,
    ) -> None:
        super().__init__()
        self.lr = lr
        self.momentum = momentum
        layers: list[nn.Module] = [nn.Linear(in_features, hidden)]
        if batch_norm:
            layers.append(nn.BatchNorm1d(hidden))
        layers += [nn.Tanh(), nn.Dropout(dropout), nn.Linear(hidden, num_classes)]
        self.net = nn.Sequential(*layers)
        self.train_acc: nn.Module | None = None
        if with_metric:
            from torchmetrics.classification import MulticlassAccuracy

            self.train_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def compute_loss(self, batch: Any) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.log("train_loss", loss)
        if self.train_acc is not None:
            self.train_acc.update(logits.detach().argmax(dim=1), y)
            self.log("train_acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)


class DictLossModule(ClassifierModule):
    """Same model; ``training_step`` returns ``{"loss": loss}``."""

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        return {"loss": super().training_step(batch, batch_idx)}


class AdamModule(ClassifierModule):
    """Same model, trained with Adam (no raw-Hessian stability threshold)."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class NoneStepModule(ClassifierModule):
    """``training_step`` returns ``None`` (Lightning then skips the optimizer step)."""

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        super().training_step(batch, batch_idx)
        return None


class ManualOptModule(ClassifierModule):
    """Manual optimization: ``training_step`` steps the optimizer itself and returns nothing."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        opt = self.optimizers()
        loss = self.compute_loss(batch)
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        self.log("train_loss", loss)
        return None


# --------------------------------------------------------------------------------------------------
# Logging
# --------------------------------------------------------------------------------------------------


class MemoryLogger(Logger):
    """Records every ``log_metrics`` call as ``(step, {key: float})`` in :attr:`records`."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        return None

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.records.append((step, {k: float(v) for k, v in metrics.items()}))

    def values(self, key: str) -> list[tuple[int | None, float]]:
        """``(step, value)`` for every logged occurrence of ``key``, in logging order."""
        return [(step, m[key]) for step, m in self.records if key in m]

    def steps(self, key: str) -> list[int | None]:
        """Steps at which ``key`` was logged, in logging order."""
        return [step for step, _ in self.values(key)]

    def keys(self) -> set[str]:
        return {k for _, m in self.records for k in m}


def trainer_kwargs(**overrides: Any) -> dict[str, Any]:
    """Defaults for a tiny, quiet CPU Trainer."""
    kwargs: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_steps": 20,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "log_every_n_steps": 1,
        "deterministic": False,
    }
    kwargs.update(overrides)
    return kwargs


# --------------------------------------------------------------------------------------------------
# Monitors
# --------------------------------------------------------------------------------------------------

_MONITOR_ARGS = set(inspect.signature(LandscapeMonitor).parameters) - {"probes", "top_k"}
_CADENCE_ARGS = ("every_n_epochs", "on_train_start", "on_train_end")


def sharpness_monitor(
    every_n_steps: int | None = 5,
    top_k: int = 2,
    *,
    lambda_min: bool = False,
    trace_hvps: int | None = None,
    extra: Sequence[Probe] = (),
    route: str = "double_backward",
    num_probe_samples: int = 64,
    **settings: Any,
) -> LandscapeMonitor:
    """A cheap monitor for tests: a ``Sharpness`` probe (λ_min off by default), a ``Trace`` with
    ``trace_hvps`` products when given (on Sharpness's cadence), and the ``extra`` probes.

    The double-backward route is the fast one for these tiny models on CPU (the functorch route
    pays a tracing cost on every probe). ``settings`` go to the monitor when they are its
    arguments and to ``Sharpness`` otherwise.
    """
    monitor_kwargs = {k: settings.pop(k) for k in list(settings) if k in _MONITOR_ARGS}
    cadence = {k: settings[k] for k in _CADENCE_ARGS if k in settings}
    probes: list[Probe] = [
        Sharpness(top_k, every_n_steps=every_n_steps, lambda_min=lambda_min, **settings)
    ]
    if trace_hvps is not None:
        probes.append(Trace(trace_hvps, every_n_steps=every_n_steps, **cadence))
    probes += list(extra)
    return LandscapeMonitor(
        probes=probes,
        route=route,  # type: ignore[arg-type]
        num_probe_samples=num_probe_samples,
        **monitor_kwargs,
    )


def fit_with_lightning_cli(
    tmp_path: Path, monitor_init_args: dict[str, Any], max_steps: int = 12
) -> LandscapeMonitor:
    """Fit ``ClassifierModule`` through a real ``LightningCLI``, the monitor configured in YAML
    only (``monitor_init_args`` under its ``class_path``); return the monitor it built."""
    import yaml
    from lightning.pytorch.cli import LightningCLI

    config = {
        "trainer": {
            "max_steps": max_steps,
            "accelerator": "cpu",
            "devices": 1,
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(tmp_path),
            "callbacks": [
                {
                    "class_path": "lightning_landscape.LandscapeMonitor",
                    "init_args": monitor_init_args,
                }
            ],
        },
        "model": {"hidden": 8, "lr": 0.05},
        "data": {"num_samples": 128, "batch_size": 16},
    }
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump(config))
    cli = LightningCLI(
        ClassifierModule,
        SyntheticDataModule,
        args=["fit", "--config", str(cfg)],
        save_config_kwargs={"overwrite": True},
        seed_everything_default=0,
    )
    monitors = [cb for cb in cli.trainer.callbacks if isinstance(cb, LandscapeMonitor)]
    assert len(monitors) == 1
    assert cli.trainer.global_step == max_steps
    return monitors[0]
