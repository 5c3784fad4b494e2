"""Landscape probes under sharded training: GPT-2 with FSDP2 (``fully_shard``) on 2 processes.

A Hugging Face GPT-2 (2 layers, width 64, random init from a config: nothing is downloaded) learns
modular addition ``a + b mod 23`` with AdamW (β = (0.9, 0.95), weight decay 0.1) and a linear
warm-up, sharded by FSDP2 over two processes (``ModelParallelStrategy(data_parallel_size=2,
tensor_parallel_size=1)``; on the CPU with gloo by default, on GPUs with ``--accelerator gpu``).
``LandscapeMonitor`` measures the top-3 eigenvalues and λ_min, the preconditioned sharpness from
AdamW's sharded state, the trace, the spectral density and the curvature along each update, with
every vector kept sharded (see the README, "Sharded training").

``--check`` then gathers the final parameters and both ranks' probe samples and recomputes the
top-3 eigenvalues on one process with the exact double-backward route, for comparison.

    python examples/fsdp2_gpt2.py --check            # Lightning starts the 2 processes
    torchrun --nproc_per_node 2 examples/fsdp2_gpt2.py
    tensorboard --logdir landscape_logs
"""

from __future__ import annotations

import argparse
import datetime
from typing import Any

import lightning.pytorch as pl
import torch
import transformers
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import Tensor
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, TensorDataset

import lightning_landscape as ll
from lightning_landscape.operators import HessianOperator

P = 23  # the modulus; token P is "="


def config(attention: str | None = None) -> transformers.GPT2Config:
    cfg = transformers.GPT2Config(
        vocab_size=P + 2,
        n_positions=8,
        n_embd=64,
        n_layer=2,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=P + 1,
        eos_token_id=P + 1,
    )
    if attention is not None:  # "eager" for --check: SDPA has no double backward on the CPU
        cfg._attn_implementation = attention
    return cfg


def modular_addition(seed: int = 0) -> TensorDataset:
    """Every ``a + b mod P`` as ``[a, b, =, c]``, shuffled."""
    a, b = torch.meshgrid(torch.arange(P), torch.arange(P), indexing="ij")
    a, b = a.reshape(-1), b.reshape(-1)
    tokens = torch.stack([a, b, torch.full_like(a, P), (a + b) % P], dim=1)
    order = torch.randperm(len(tokens), generator=torch.Generator().manual_seed(seed))
    return TensorDataset(tokens[order])


def answer_loss(model: torch.nn.Module, batch: Any) -> Tensor:
    """Cross-entropy of the answer token (predicted at the ``=`` position)."""
    (tokens,) = batch
    logits = model(input_ids=tokens).logits
    return torch.nn.functional.cross_entropy(logits[:, -2], tokens[:, -1])


class ShardedGPT(pl.LightningModule):
    def __init__(self, lr: float = 3e-3, warmup: int = 20) -> None:
        super().__init__()
        self.lr, self.warmup = lr, warmup
        self.model = transformers.GPT2LMHeadModel(config())

    def configure_model(self) -> None:
        for block in self.model.transformer.h:
            fully_shard(block)
        fully_shard(self.model)  # the root: embeddings (tied with the head), final LayerNorm

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = answer_loss(self.model, batch)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr, betas=(0.9, 0.95), weight_decay=0.1)
        ramp = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / self.warmup))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": ramp, "interval": "step"}}


class KeepProbeData(pl.Callback):
    """Keeps each rank's probe batches for ``--check`` (the monitor drops them at the end)."""

    def __init__(self, monitor: ll.LandscapeMonitor) -> None:
        self.monitor = monitor
        self.batches: list[Any] = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.batches = [tuple(t.clone() for t in b) for b in self.monitor._batches or []]


def single_process_top3(module: ShardedGPT, keep: KeepProbeData) -> list[float] | None:
    """The exact top-3 on rank 0 from the gathered parameters and probe samples (collective)."""
    state = {
        name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu()
        for name, p in module.model.named_parameters()
    }
    every: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(every, [tuple(t.cpu() for t in b) for b in keep.batches])
    if torch.distributed.get_rank() != 0:
        return None
    reference = transformers.GPT2LMHeadModel(config("eager")).eval()
    reference.load_state_dict(state, strict=False)  # the head is tied to the embeddings
    union = [b for per_rank in every for b in per_rank]
    op = HessianOperator(reference, answer_loss, union, route="double_backward")
    return ll.lanczos(op, k=3, tol=1e-6).eigenvalues.tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=20, help="probe every n steps")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--check", action="store_true", help="compare with one exact process")
    args = parser.parse_args()

    torch.manual_seed(0)
    n = args.every
    monitor = ll.LandscapeMonitor(
        probes=[
            ll.Sharpness(top_k=3, every_n_steps=n),
            ll.Trace(every_n_steps=n),
            ll.SpectralDensity(every_n_steps=2 * n),
            ll.UpdateCurvature(every_n_steps=n),
        ],
        num_probe_samples=128,
    )
    keep = KeepProbeData(monitor)
    trainer = pl.Trainer(
        accelerator=args.accelerator,
        devices=args.devices,
        strategy=ModelParallelStrategy(
            data_parallel_size=args.devices,
            tensor_parallel_size=1,
            timeout=datetime.timedelta(minutes=5),
        ),
        max_steps=args.steps,
        logger=TensorBoardLogger("landscape_logs", name="fsdp2_gpt2"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[monitor, keep],
    )
    module = ShardedGPT()
    trainer.fit(module, DataLoader(modular_addition(), batch_size=32, shuffle=True))
    exact = single_process_top3(module, keep) if args.check else None
    if not trainer.is_global_zero:
        return
    print(f"{'step':>5} {'top-3 eigenvalues':>28} {'λ_min':>8} {'ratio':>7} {'HVPs':>5} {'s':>6}")
    for r in monitor.history:
        top = " ".join(f"{x:8.4f}" for x in r.eigenvalues)
        ratio = "-" if r.stability_ratio is None else f"{r.stability_ratio:7.4f}"
        lam_min = "-" if r.lambda_min is None else f"{r.lambda_min:8.4f}"
        print(f"{r.step:5d} {top:>28} {lam_min:>8} {ratio:>7} {r.num_hvps:5d} {r.seconds:6.1f}")
    if exact is not None:
        last = monitor.history[-1].eigenvalues
        rel = [abs(a - b) / abs(b) for a, b in zip(last, exact, strict=True)]
        print("single process (exact):", " ".join(f"{x:.5f}" for x in exact))
        print("relative differences:  ", " ".join(f"{x:.1e}" for x in rel))


if __name__ == "__main__":
    main()
