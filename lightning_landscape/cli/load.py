"""Loading for the ``analyze``/``compare`` commands: config, model, data, checkpoint, probe batch.

Everything a user can get wrong (a missing file, a config without ``model``/``data``, a
checkpoint that does not fit the model) raises :class:`CLIError` with a message that says what to
fix; the command line turns it into exit code 2 without a traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from ..callbacks.data import silenced, training_step_loss
from ..context import NormStatistics, batch_statistics, curvature_context, fork_rng
from ..operators import LossFn, batch_size, split_batch
from ..probes import ProbeContext, check_products
from .output import warn


class CLIError(Exception):
    """A user error of the command line (exit code 2, message only, no traceback)."""


def make_loss_fn() -> LossFn:
    """The probe loss: what ``training_step(batch, 0)`` returns (call inside ``silenced``).

    Returns:
        ``loss_fn(model, batch) -> Tensor``.
    """

    def loss_fn(model: torch.nn.Module, batch: Any) -> Tensor:
        assert isinstance(model, pl.LightningModule)
        return training_step_loss(model, batch)

    return loss_fn


def probe_loss(
    model: pl.LightningModule, batches: list[Any], norm_statistics: NormStatistics = "batch"
) -> float:
    """The loss on the probe data (also checks ``training_step`` returns a loss).

    Args:
        model: the model.
        batches: the probe batches (the sample-weighted mean is returned).
        norm_statistics: how BatchNorm-type layers normalise (see
            :func:`~lightning_landscape.curvature_context`).

    Returns:
        The loss.

    Raises:
        CLIError: if ``training_step`` does not return a loss tensor or a dict with ``"loss"``.
    """
    with silenced(model), curvature_context(model, norm_statistics=norm_statistics):
        try:
            with torch.no_grad():
                losses = [(float(training_step_loss(model, b)), batch_size(b)) for b in batches]
            return sum(loss * n for loss, n in losses) / sum(n for _, n in losses)
        except ValueError:
            raise CLIError(
                "the model's training_step(batch, 0) must return the loss tensor or a dict with "
                "'loss' to be analysed"
            ) from None


def checked_products(ctx: ProbeContext, seed: int) -> dict[str, Any] | None:
    """Check the products' symmetry before the probes (see :func:`~..probes.check_products`).

    Switches the context to finite differences where the exact products fail the check and
    finite differences pass it, and warns on stderr when they failed. Call inside
    ``curvature_context``.

    Args:
        ctx: the probes' context.
        seed: seed of the check's vectors.

    Returns:
        What ``summary.json`` records of the check (``None``: nothing was checked, or it failed,
        in which case the probes meet the same failure and report it).
    """
    try:
        check = check_products(ctx, switch=True, seed=seed)
    except Exception:
        return None
    if check is None:
        return None
    message = check.message()
    if message is not None:
        warn(message)
    return check.summary()


def require_file(path: str | Path, what: str) -> Path:
    """The path, if it names an existing file.

    Args:
        path: the path given on the command line.
        what: what the file is, for the message (``"checkpoint"``, ``"config"``).

    Returns:
        The path as a :class:`~pathlib.Path`.

    Raises:
        CLIError: if there is no such file.
    """
    p = Path(path)
    if not p.is_file():
        reason = "is a directory" if p.is_dir() else "does not exist"
        raise CLIError(f"{what} file {str(path)!r} {reason}")
    return p


def resolve_device(name: str) -> torch.device:
    """``"cpu"``, ``"cuda"`` or ``"auto"`` (CUDA when available) as a device.

    Args:
        name: the ``--device`` value.

    Returns:
        The torch device.

    Raises:
        CLIError: for ``"cuda"`` without an available GPU.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda was asked for, but no CUDA device is available")
    return torch.device(name)


def _section(cfg: Mapping[str, Any], key: str, config: Path, class_path: str | None) -> Any:
    """The ``model``/``data`` entry as a class_path form jsonargparse can instantiate.

    Accepts LightningCLI's subclass form (``class_path`` + ``init_args``, or a bare class path
    string), a nested YAML file name, and its plain form (the class given to ``LightningCLI`` in
    code, the entry holding only init args, or no entry at all) when ``class_path`` names the
    class (``--model-class`` / ``--data-class``).
    """
    value = cfg.get(key)
    if isinstance(value, str) and value.endswith((".yaml", ".yml")):
        nested = Path(value) if Path(value).is_absolute() else config.parent / value
        if nested.is_file():
            value = _read_yaml(nested)
    option = f"--{key}-class"
    subclass_form = isinstance(value, str) or (isinstance(value, Mapping) and "class_path" in value)
    if class_path is not None:
        if isinstance(value, (str, Mapping)) and subclass_form:
            given = value if isinstance(value, str) else value.get("class_path")
            if given != class_path:
                raise CLIError(
                    f"config {str(config)!r} names {key} class {given!r} but {option} says "
                    f"{class_path!r}; drop {option} or make them agree"
                )
            return value
        if value is not None and not isinstance(value, Mapping):
            raise CLIError(
                f"config {str(config)!r}: `{key}:` must hold the init args of {class_path} "
                f"(a mapping), got {type(value).__name__}"
            )
        return {"class_path": class_path, "init_args": dict(value or {})}
    if not subclass_form:
        got = "nothing" if value is None else f"the plain form ({type(value).__name__})"
        raise CLIError(
            f"config {str(config)!r} has no `{key}:` entry with a `class_path:` (got {got}). "
            f"If your script passes the class to LightningCLI in code, name it with {option} "
            f"my_package.MyClass; otherwise write the subclass form:\n  {key}:\n"
            "    class_path: my_package.MyClass\n    init_args: {...}"
        )
    return value


def _read_yaml(path: Path) -> Any:
    import yaml  # type: ignore[import-untyped,unused-ignore]

    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise CLIError(f"config {str(path)!r} is not valid YAML: {err}") from None


def load_config(
    path: Path, model_class: str | None = None, data_class: str | None = None
) -> dict[str, Any]:
    """Read a LightningCLI-style YAML config; only ``model``, ``data`` and ``seed_everything``.

    Other keys (``trainer``, ``optimizer``, ``ckpt_path``, ...) are dropped without being looked
    at, so a training config is used as it is.

    Args:
        path: the YAML file.
        model_class: the LightningModule's import path when the config has LightningCLI's plain
            ``model:`` form (the class passed to ``LightningCLI`` in code).
        data_class: likewise for the LightningDataModule and ``data:``.

    Returns:
        ``{"model": ..., "data": ..., "seed_everything": int | None}``.

    Raises:
        CLIError: if the file is not a YAML mapping, or ``model``/``data`` are neither in
            class_path form nor named by ``model_class``/``data_class``.
    """
    cfg = _read_yaml(path)
    if not isinstance(cfg, Mapping):
        raise CLIError(f"config {str(path)!r} is not a YAML mapping with `model:` and `data:`")
    seed = cfg.get("seed_everything")
    return {
        "model": _section(cfg, "model", path, model_class),
        "data": _section(cfg, "data", path, data_class),
        "seed_everything": seed if isinstance(seed, int) and not isinstance(seed, bool) else None,
    }


def build_model_and_data(
    cfg: Mapping[str, Any],
) -> tuple[pl.LightningModule, pl.LightningDataModule]:
    """Instantiate the config's model and datamodule with jsonargparse, as LightningCLI does.

    The working directory is put on ``sys.path`` (as ``python train.py`` or ``python -m`` would),
    so classes next to the training script resolve.

    Args:
        cfg: the output of :func:`load_config`.

    Returns:
        ``(model, datamodule)``.

    Raises:
        CLIError: if a class cannot be imported, is not a LightningModule/LightningDataModule, or
            rejects its ``init_args``.
    """
    from jsonargparse import ArgumentParser

    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(pl.LightningModule, "model", required=True, fail_untyped=False)
    parser.add_subclass_arguments(pl.LightningDataModule, "data", required=True, fail_untyped=False)
    try:
        ns = parser.parse_object({"model": cfg["model"], "data": cfg["data"]})
        instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
        init = instantiate(ns)
    except Exception as err:  # jsonargparse reports bad class paths and init_args this way
        raise CLIError(f"could not build the config's model and data:\n{err}") from None
    return init.model, init.data


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a Lightning checkpoint onto the CPU.

    Args:
        path: the ``.ckpt`` file (trusted: it is unpickled).

    Returns:
        The checkpoint dictionary (it has a ``"state_dict"`` mapping).

    Raises:
        CLIError: if the file cannot be read or has no ``state_dict``.
    """
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise CLIError(f"could not read checkpoint {str(path)!r}: {err}") from None
    if not isinstance(ckpt, Mapping) or not isinstance(ckpt.get("state_dict"), Mapping):
        raise CLIError(
            f"checkpoint {str(path)!r} has no `state_dict`; expected a Lightning checkpoint "
            "(as written by ModelCheckpoint or trainer.save_checkpoint)"
        )
    return dict(ckpt)


def check_state(model: torch.nn.Module, state: Mapping[str, Any], where: str, hint: str) -> None:
    """Raise unless ``state`` has exactly the model's keys and shapes.

    Args:
        model: the model built from the config.
        state: a checkpoint's ``state_dict``.
        where: the checkpoint, for the message.
        hint: what does not match what (ends the message).

    Raises:
        CLIError: naming the first missing key, unexpected key or shape mismatch.
    """
    ref = model.state_dict()
    missing = [k for k in ref if k not in state]
    unexpected = [k for k in state if k not in ref]
    problem = None
    if missing:
        problem = f"missing key {missing[0]!r} ({len(missing)} missing)"
    elif unexpected:
        problem = f"unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected)"
    else:
        for key, target in ref.items():
            value = state[key]
            if isinstance(value, Tensor) and value.shape != target.shape:
                problem = (
                    f"shape mismatch at {key!r}: {tuple(value.shape)} in the checkpoint, "
                    f"{tuple(target.shape)} in the model"
                )
                break
    if problem is not None:
        raise CLIError(f"{where}: {problem}; {hint}")


def load_weights(model: pl.LightningModule, ckpt: Mapping[str, Any], path: Path) -> None:
    """Load a checkpoint's ``state_dict`` into the model (strict).

    Args:
        model: the model built from the config.
        ckpt: the checkpoint from :func:`load_checkpoint`.
        path: its file, for the message.

    Raises:
        CLIError: if keys or shapes differ.
    """
    state = ckpt["state_dict"]
    hint = "the config's model does not match the checkpoint"
    check_state(model, state, f"checkpoint {str(path)!r}", hint)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CLIError(f"checkpoint {str(path)!r}: {err}; {hint}") from None


def _batch_hook(model: pl.LightningModule, dm: pl.LightningDataModule, name: str) -> Any:
    """The datamodule's batch hook if it overrides it, else the model's (Lightning's choice)."""
    from lightning.pytorch.utilities.model_helpers import is_overridden

    if is_overridden(name, dm, pl.LightningDataModule):
        return getattr(dm, name)
    return getattr(model, name)


def probe_batch(
    model: pl.LightningModule,
    dm: pl.LightningDataModule,
    num_samples: int,
    device: torch.device,
) -> tuple[Any, int | None]:
    """The first ``num_samples`` samples of the train dataset as one batch on ``device``.

    Same policy as the monitor (no shuffling, no workers, the train loader's ``collate_fn``),
    and the batch-transfer hooks of the datamodule (or model) as in training. RNG streams are
    left as they were.

    Args:
        model: the model (already on ``device``).
        dm: the datamodule.
        num_samples: how many samples (fewer if the dataset is smaller).
        device: where the batch goes.

    Returns:
        The batch, and the train dataloader's batch size (``None`` if it has none).

    Raises:
        CLIError: if the train dataloader is not one ``DataLoader`` or is empty.
    """
    with fork_rng():
        dm.prepare_data()
        dm.setup("fit")
        source = dm.train_dataloader()
        if not isinstance(source, DataLoader):
            raise CLIError(
                "the datamodule's train_dataloader() must return one DataLoader, got "
                f"{type(source).__name__}"
            )
        loader: DataLoader[Any] = DataLoader(
            source.dataset,
            batch_size=num_samples,
            shuffle=False,
            num_workers=0,
            collate_fn=source.collate_fn,
        )
        batch = next(iter(loader), None)
    if batch is None:
        raise CLIError("the datamodule's train dataset is empty")
    batch = _batch_hook(model, dm, "on_before_batch_transfer")(batch, 0)
    batch = _batch_hook(model, dm, "transfer_batch_to_device")(batch, device, 0)
    return _batch_hook(model, dm, "on_after_batch_transfer")(batch, 0), source.batch_size


@dataclass
class Setup:
    """What both commands start from.

    Attributes:
        model: the config's model, on the device, holding the first checkpoint's weights.
        datamodule: the config's datamodule (set up for ``"fit"``).
        batch: the probe batch on the device.
        checkpoints: the loaded checkpoints, in command-line order.
        device: the device.
        train_batch_size: the train dataloader's batch size, if it has one.
    """

    model: pl.LightningModule
    datamodule: pl.LightningDataModule
    batch: Any
    checkpoints: list[dict[str, Any]]
    device: torch.device
    train_batch_size: int | None = None

    def probe_batches(self, norm_statistics: NormStatistics) -> tuple[list[Any], bool | None]:
        """The probe batch as the monitor would cut it, and the operator's ``retain_graph``.

        With batch statistics and a model that has BatchNorm-type layers, chunks of the training
        batch size (each normalised with its own statistics, as in training); else one batch.

        Args:
            norm_statistics: ``"batch"`` or ``"running"``.

        Returns:
            ``(batches, retain_graph)``.
        """
        size = self.train_batch_size
        if batch_statistics(self.model, norm_statistics) and size:
            return split_batch(self.batch, size, min_size=2), True
        return [self.batch], None


def prepare(
    ckpt_paths: list[str],
    config_path: str,
    num_samples: int,
    device_name: str,
    seed: int,
    model_class: str | None = None,
    data_class: str | None = None,
) -> Setup:
    """Check the files, build model and data, load the first checkpoint, take the probe batch.

    Args:
        ckpt_paths: checkpoint files (all are read; the first is loaded into the model).
        config_path: the YAML config.
        num_samples: probe samples.
        device_name: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        seed: global seed unless the config sets ``seed_everything`` to an integer.
        model_class: see :func:`load_config`.
        data_class: see :func:`load_config`.

    Returns:
        The :class:`Setup`.

    Raises:
        CLIError: on any of the user errors described in this module.
    """
    paths = [require_file(p, "checkpoint") for p in ckpt_paths]
    config = require_file(config_path, "config")
    cfg = load_config(config, model_class, data_class)
    ckpts = [load_checkpoint(p) for p in paths]
    device = resolve_device(device_name)
    from lightning.fabric.utilities.seed import seed_everything

    seed_everything(
        cfg["seed_everything"] if cfg["seed_everything"] is not None else seed, verbose=False
    )
    model, dm = build_model_and_data(cfg)
    load_weights(model, ckpts[0], paths[0])
    model.to(device)
    batch, train_batch_size = probe_batch(model, dm, num_samples, device)
    return Setup(
        model=model,
        datamodule=dm,
        batch=batch,
        checkpoints=ckpts,
        device=device,
        train_batch_size=train_batch_size,
    )
