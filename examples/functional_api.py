"""The functional API on a small MLP: top-k eigenvalues, λ_min and trace vs a dense Hessian.

    python examples/functional_api.py

For a model this small the dense Hessian is cheap, so the script prints both and their gap.
"""

import torch
import torch.nn.functional as F
from torch import nn

import lightning_landscape as ll


def main() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 5))
    x, y = torch.randn(256, 20), torch.randint(0, 5, (256,))

    def loss_fn(m: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(m(batch[0]), batch[1])

    top = ll.hessian_eigenvalues(model, loss_fn, (x, y), k=5, tol=1e-6, max_basis=40)
    low = ll.hessian_eigenvalues(model, loss_fn, (x, y), k=1, which="smallest", tol=1e-6)
    tr = ll.hessian_trace(model, loss_fn, (x, y), num_hvps=90)

    # Dense reference (feasible only for tiny models).
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach() for p in model.parameters())

    def flat_loss(*ps: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(model, dict(zip(names, ps, strict=True)), (x,))
        return F.cross_entropy(out, y)

    blocks = torch.func.hessian(flat_loss, argnums=tuple(range(len(params))))(*params)
    n = sum(p.numel() for p in params)
    dense = torch.cat(
        [
            torch.cat([blocks[i][j].reshape(params[i].numel(), -1) for j in range(len(params))], 1)
            for i in range(len(params))
        ]
    ).reshape(n, n)
    exact = torch.linalg.eigvalsh(dense.double())

    print(f"{n} parameters")
    print(
        "top-5 (Lanczos):",
        [f"{v:.6f}" for v in top.eigenvalues.tolist()],
        f"{top.num_hvps} HVPs, converged={top.all_converged}",
    )
    print("top-5 (dense):  ", [f"{v:.6f}" for v in exact.flip(0)[:5].tolist()])
    print(
        f"λ_min: {low.eigenvalues[0].item():.6f} (dense {exact[0].item():.6f}), {low.num_hvps} HVPs"
    )
    print(
        f"trace: {tr.trace:.4f} ± {tr.stderr:.4f} (dense {exact.sum().item():.4f}), "
        f"{tr.num_hvps} HVPs"
    )


if __name__ == "__main__":
    main()
