"""Which Hessian with BatchNorm: the training loss's (batch statistics) or eval mode's (running).

Trains a CIFAR-style ResNet-18 (11.2 M parameters, `lightning_landscape.cli.demo.ResNet18`) with
SGD (lr 0.1, momentum 0.9, batch 32) on scikit-learn's bundled 8×8 digits, upsampled to 3×32×32
(no download), and at a few early steps measures λ_max on the same 32 probe samples and the same
weights twice: with BatchNorm normalising each chunk of the training batch size with its own
statistics (`norm_statistics="batch"`, the monitor's default: the loss training optimises), and in
eval mode (`"running"`: the running statistics, which lag behind early in training). Prints both,
their probe losses and the stability ratio η·λ_max/(2 + 2β) each implies.

    python examples/batchnorm_hessian.py                 # steps 0, 10, 50; ~3 min on 2 CPU cores
    python examples/batchnorm_hessian.py --steps 10 --width 16
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import lightning_landscape as ll
from lightning_landscape.cli.demo import ResNet18, load_digits_tensors


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", default="0,10,50", help="comma-separated steps to probe at")
    ap.add_argument("--width", type=int, default=64, help="ResNet width (64: 11.2 M parameters)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    train, _, source = load_digits_tensors(0)
    x = F.interpolate(train.tensors[0], size=32, mode="bilinear").repeat(1, 3, 1, 1)
    y = train.tensors[1]
    model = ResNet18(num_classes=10, width=args.width)
    lr, momentum, batch = 0.1, 0.9, 32
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    threshold = (2 + 2 * momentum) / lr
    probe = (x[:32], y[:32])
    steps = sorted(int(s) for s in args.steps.split(","))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"ResNet-18, width {args.width}: {n_params / 1e6:.1f} M parameters; data: {source}")
    print(f"SGD lr {lr}, momentum {momentum}, batch {batch}; threshold (2+2β)/η = {threshold:.1f}")
    print(f"{'step':>5} {'statistics':>10} {'λ_max':>10} {'probe loss':>11} {'ratio':>8} {'s':>6}")

    def loss_fn(m: torch.nn.Module, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(m(b[0]), b[1])

    gen = torch.Generator().manual_seed(0)
    for step in range(steps[-1] + 1):
        if step in steps:
            for stats in ("batch", "running"):
                t0 = time.perf_counter()
                chunks = ll.split_batch(probe, batch) if stats == "batch" else [probe]
                with ll.curvature_context(model, norm_statistics=stats):  # type: ignore[arg-type]
                    op = ll.HessianOperator(model, loss_fn, chunks, route="double_backward")
                    top = ll.lanczos(op, 1, tol=1e-3)
                lam = float(top.eigenvalues[0])
                seconds = time.perf_counter() - t0
                print(
                    f"{step:>5} {stats:>10} {lam:>10.4g} {op.loss_value:>11.4g} "
                    f"{lam / threshold:>8.3g} {seconds:>6.1f}"
                )
        model.train()
        idx = torch.randint(0, len(y), (batch,), generator=gen)
        opt.zero_grad()
        loss_fn(model, (x[idx], y[idx])).backward()
        opt.step()


if __name__ == "__main__":
    main()
