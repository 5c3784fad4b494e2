#!/usr/bin/env python
"""The product check: how symmetric correct Hessian-vector products are; what fused kernels do.

``LandscapeMonitor`` (and ``analyze`` / ``compare``) check, with 4 products before the first
round, that the double-backward products are symmetric (``symmetry_defect``), because an
operation whose backward pass autograd cannot differentiate (a fused kernel) makes them silently
wrong. This measures, in float32 on the CPU:

* the defect of correct products at real sizes (the noise floor the tolerance 1e-2 sits above):
  ``real_sizes.py``'s ResNet-18 (11.2 M parameters, 16 samples) in eval mode and with batch
  statistics, its 27 M-parameter GPT, and a Hugging Face GPT-2 (4 layers, width 256, 3.4 M
  parameters; 8 × 64 random tokens, random init);
* the same GPT-2 with its LayerNorms replaced by a kernel-style LayerNorm (an
  ``autograd.Function`` computing the correct gradient on detached tensors, as a fused CUDA
  kernel does): the final one only, one block's ``ln_2``, or all of them. For each: the
  double-backward defect, the finite-difference defect, and λ_max (``lanczos``, k = 1, tol 1e-4)
  by double backward and by finite differences, against the unmodified model's.

    python benchmarks/product_symmetry.py --out benchmarks/results_product_symmetry.json
    python benchmarks/product_symmetry.py --quick     # small widths, a few seconds
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cpu import cpu_model, library_fingerprint
from real_sizes import make_gpt27m, make_resnet18

from lightning_landscape import HessianOperator, curvature_context, lanczos, symmetry_defect

transformers.logging.set_verbosity_error()


class _KernelLayerNormFn(torch.autograd.Function):
    """LayerNorm with a correct gradient computed on detached tensors (a fused kernel's)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
        ctx.save_for_backward(x, weight, bias)
        ctx.eps = eps
        return nn.functional.layer_norm(x, x.shape[-1:], weight, bias, eps)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, Tensor, None]:
        leaves = [t.detach().requires_grad_() for t in ctx.saved_tensors]
        with torch.enable_grad():
            out = nn.functional.layer_norm(leaves[0], leaves[0].shape[-1:], *leaves[1:], ctx.eps)
            dx, dw, db = torch.autograd.grad(out, leaves, grad.detach())
        return dx, dw, db, None


class KernelLayerNorm(nn.Module):
    """Wraps an ``nn.LayerNorm``'s parameters with :class:`_KernelLayerNormFn`."""

    def __init__(self, norm: nn.LayerNorm) -> None:
        super().__init__()
        self.weight, self.bias, self.eps = norm.weight, norm.bias, norm.eps

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = _KernelLayerNormFn.apply(x, self.weight, self.bias, self.eps)
        return out


def gpt2(quick: bool) -> tuple[nn.Module, Callable[[nn.Module, Tensor], Tensor], Tensor]:
    """A Hugging Face GPT-2 from a config (random init, nothing downloaded) and random tokens."""
    width, layers = (64, 2) if quick else (256, 4)
    config = transformers.GPT2Config(
        vocab_size=1000, n_positions=64, n_embd=width, n_layer=layers, n_head=4,
        bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    tokens = torch.randint(0, 1000, (8, 64), generator=torch.Generator().manual_seed(1))

    def loss(m: nn.Module, batch: Tensor) -> Tensor:
        out: Tensor = m(input_ids=batch, labels=batch).loss
        return out

    return model, loss, tokens


def with_kernels(model: nn.Module, where: str) -> nn.Module:
    """``model`` with the LayerNorms named by ``where`` replaced by :class:`KernelLayerNorm`."""
    blocks = model.transformer.h  # type: ignore[union-attr]
    if where in ("ln_f", "all"):
        model.transformer.ln_f = KernelLayerNorm(model.transformer.ln_f)  # type: ignore[union-attr]
    if where == "h1.ln_2":
        blocks[1].ln_2 = KernelLayerNorm(blocks[1].ln_2)
    if where == "all":
        for block in blocks:
            block.ln_1, block.ln_2 = KernelLayerNorm(block.ln_1), KernelLayerNorm(block.ln_2)
    return model


def defect(op: HessianOperator) -> dict[str, float]:
    res = symmetry_defect(op)
    return {"defect": res.defect, "seconds": res.seconds}


def floor_row(name: str, model: nn.Module, loss: Any, batch: Any, stats: str) -> dict[str, Any]:
    with curvature_context(model, norm_statistics=stats):  # type: ignore[arg-type]
        op = HessianOperator(model, loss, [batch], route="double_backward")
        row = {"model": name, "params": op.size, "norm_statistics": stats, **defect(op)}
    print(f"{name:<28} {op.size:>10,d} params  defect {row['defect']:.2e}  {row['seconds']:.1f} s")
    return row


def lambda_max(op: HessianOperator) -> float:
    return float(lanczos(op, 1, tol=1e-4).eigenvalues[0])


def kernel_row(quick: bool, where: str, reference: float) -> dict[str, Any]:
    model, loss, tokens = gpt2(quick)
    model = with_kernels(model, where)
    with curvature_context(model):
        op = HessianOperator(model, loss, [tokens], route="double_backward")
        db = defect(op)
        lam_db = lambda_max(op)
        op.release()  # finite differences move the parameters: the retained graph is stale
        op.route = "finite_difference"
        fd = defect(op)
        lam_fd = lambda_max(op)
    row = {
        "model": f"gpt2, kernel LayerNorm: {where}",
        "double_backward_defect": db["defect"],
        "finite_difference_defect": fd["defect"],
        "lambda_max_double_backward": lam_db,
        "lambda_max_finite_difference": lam_fd,
        "lambda_max_reference": reference,
        "check_seconds": db["seconds"],
    }
    print(
        f"kernel LN {where:<8} defect {db['defect']:.2e} (FD {fd['defect']:.2e}); λ_max "
        f"{lam_db:.4g} by double backward, {lam_fd:.4g} by FD, reference {reference:.4g}"
    )
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small widths (a smoke run)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="write the rows as JSON")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    meta = {
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "cpu": cpu_model(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": args.threads,
        "lightning_landscape_src_sha256_16": library_fingerprint(),
        "command": "python benchmarks/product_symmetry.py " + " ".join(sys.argv[1:]),
        "loadavg_start": os.getloadavg(),
    }
    floors = []
    resnet = make_resnet18(args.quick)
    for stats in ("running", "batch"):
        floors.append(floor_row("resnet18", resnet.model, resnet.loss_fn, resnet.batch, stats))
    gpt = make_gpt27m(args.quick)
    floors.append(floor_row("gpt27m", gpt.model, gpt.loss_fn, gpt.batch, "running"))
    model, loss, tokens = gpt2(args.quick)
    floors.append(floor_row("gpt2 (transformers)", model, loss, tokens, "running"))
    with curvature_context(model):
        reference = lambda_max(HessianOperator(model, loss, [tokens], route="double_backward"))
    kernels = [kernel_row(args.quick, where, reference) for where in ("ln_f", "h1.ln_2", "all")]
    meta["loadavg_end"] = os.getloadavg()
    meta["total_seconds"] = time.perf_counter() - t0
    print(f"total {meta['total_seconds']:.1f} s")
    if args.out is not None:
        result = {"meta": meta, "floors": floors, "kernels": kernels}
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
