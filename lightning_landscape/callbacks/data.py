"""Probe data and the default probe loss for a LightningModule."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping
from typing import Any

import lightning.pytorch as pl
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from ..context import fork_rng


def _noop(*args: Any, **kwargs: Any) -> None:
    return None


@contextlib.contextmanager
def silenced(pl_module: pl.LightningModule) -> Iterator[None]:
    """Make ``self.log``/``self.log_dict`` no-ops and keep torchmetrics states untouched.

    A probe calls ``training_step`` on probe data; nothing it logs or accumulates in metric
    objects may reach the user's logs.

    Args:
        pl_module: the module whose ``training_step`` will be called.

    Yields:
        Nothing; logging and metric states are restored on exit.
    """
    from torchmetrics import Metric

    saved: list[tuple[Metric, dict[str, Any]]] = []
    for module in pl_module.modules():
        if isinstance(module, Metric):
            state = {name: copy.deepcopy(getattr(module, name)) for name in module._defaults}
            for name in ("_update_count", "_computed", "_forward_cache"):
                state[name] = copy.copy(getattr(module, name, None))
            saved.append((module, state))
    had = {name: name in pl_module.__dict__ for name in ("log", "log_dict")}
    old = {name: pl_module.__dict__.get(name) for name in ("log", "log_dict")}
    object.__setattr__(pl_module, "log", _noop)
    object.__setattr__(pl_module, "log_dict", _noop)
    try:
        yield
    finally:
        for name in ("log", "log_dict"):
            if had[name]:
                object.__setattr__(pl_module, name, old[name])
            else:
                object.__delattr__(pl_module, name)
        for metric, state in saved:
            for name, value in state.items():
                setattr(metric, name, value)


def training_step_loss(pl_module: pl.LightningModule, batch: Any) -> Tensor:
    """Default probe loss: the loss ``training_step(batch, 0)`` returns.

    Accepts a returned tensor or a mapping with a ``"loss"`` entry. Call it inside
    :func:`silenced` so the step's logging does not reach the logs.

    Args:
        pl_module: the LightningModule.
        batch: a probe batch on the module's device.

    Returns:
        The scalar loss tensor.

    Raises:
        ValueError: if ``training_step`` returns something else (e.g. ``None``).
    """
    out = pl_module.training_step(batch, 0)
    if isinstance(out, Tensor):
        return out
    if isinstance(out, Mapping):
        loss = out.get("loss")
        if isinstance(loss, Tensor):
            return loss
    raise ValueError(
        f"training_step returned {type(out).__name__}, not a loss tensor or a dict with 'loss'. "
        "Pass `loss_fn=lambda module, batch: ...` to LandscapeMonitor to say what to probe."
    )


def collect_probe_batches(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    num_samples: int,
    probe_dataloader: DataLoader[Any] | None,
) -> list[Any]:
    """Gather the fixed probe data once, on the module's device, without touching any RNG.

    With ``probe_dataloader`` every batch it yields is used. Otherwise the first ``num_samples``
    samples of the train dataloader's dataset are taken in order (no shuffling, no workers), with
    the train dataloader's ``collate_fn``; the training iterator itself is never advanced. Under DDP
    rank ``r`` of ``W`` takes samples ``r, r + W, ...`` of those, so the union over ranks is the
    single-process probe set (a ``probe_dataloader`` should then yield each rank's shard). Batches
    go through the same precision conversion, batch-transfer hooks and device move as training
    batches.

    Args:
        trainer: the trainer (its train dataloader must be set up).
        pl_module: the module (for its device).
        num_samples: probe samples to take from the train dataset.
        probe_dataloader: an explicit probe loader, or ``None``.

    Returns:
        A list of batches on the module's device.

    Raises:
        ValueError: if the train dataloader is not a single ``DataLoader`` (pass
            ``probe_dataloader``) or yields nothing.
    """
    with fork_rng():
        if probe_dataloader is not None:
            batches = list(probe_dataloader)
        else:
            source = trainer.train_dataloader
            if not isinstance(source, DataLoader):
                raise ValueError(
                    "LandscapeMonitor takes its probe batch from a single train DataLoader, got "
                    f"{type(source).__name__}. Pass `probe_dataloader=` with the probe data."
                )
            dataset = source.dataset
            world, rank = trainer.world_size, trainer.global_rank
            if world > 1:
                if not hasattr(dataset, "__len__"):
                    raise ValueError(
                        "Under DDP the monitor shards the first num_probe_samples samples of a "
                        "map-style train dataset across ranks; this one has no length (an "
                        "IterableDataset). Pass `probe_dataloader=` yielding each rank's shard."
                    )
                # Rank r takes samples r, r + W, r + 2W, ... of the first num_samples: the union
                # over ranks is exactly the probe set of a single-process run.
                count = min(num_samples, len(dataset))
                dataset = Subset(dataset, list(range(rank, count, world)))
                num_samples = max(len(dataset), 1)
            loader: DataLoader[Any] = DataLoader(
                dataset,
                batch_size=num_samples,
                shuffle=False,
                num_workers=0,
                collate_fn=source.collate_fn,
            )
            batches = [next(iter(loader), None)]
        batches = [b for b in batches if b is not None]
        if not batches:
            raise ValueError("The probe data is empty: the dataloader yielded no batch.")
        return [_to_device(trainer, pl_module, b) for b in batches]


def _to_device(trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> Any:
    """Move a batch exactly as the training loop does (precision, transfer hooks, device)."""
    batch = trainer.precision_plugin.convert_input(batch)
    # The same (datamodule-aware) hook dispatch the training loop uses.
    batch = pl_module._on_before_batch_transfer(batch, dataloader_idx=0)
    return trainer.strategy.batch_to_device(batch, dataloader_idx=0)
