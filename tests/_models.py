"""Small test models, loss functions, seeded data and a dense-Hessian oracle.

Every model here is small enough (< ~500 parameters) that its full Hessian can be formed in float64
in well under a second, so the library's matrix-free estimates can be checked against exact
eigenvalues / traces of ``dense_hessian(...)``.

Loss functions follow the library's signature ``loss_fn(model, batch) -> scalar Tensor``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn.attention import SDPBackend, sdpa_kernel

LossFn = Callable[[nn.Module, Any], Tensor]

NUM_CLASSES = 3
VOCAB = 7
SEQ_LEN = 5


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------


class MLP(nn.Module):
    """Linear(6,8)-Tanh-Dropout(p)-Linear(8,8)-Tanh-Linear(8,3): 155 parameters.

    The dropout layer is always present (``p=0`` is the identity), so parameter names do not depend
    on ``dropout``.
    """

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(8, 8)
        self.fc3 = nn.Linear(8, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        h = self.drop(torch.tanh(self.fc1(x)))
        h = torch.tanh(self.fc2(h))
        return self.fc3(h)


class SmallCNN(nn.Module):
    """Conv2d(1,3,3)-BatchNorm2d(3)-Tanh-flatten-Linear(48,3) on (B,1,6,6) inputs: 183 params."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, kernel_size=3)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3 * 4 * 4, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.bn(self.conv(x)))
        return self.fc(h.flatten(1))


class TinyCausalAttention(nn.Module):
    """One pre-LayerNorm causal self-attention block with a LM head: 479 parameters.

    tokens (B,T<=5) -> token embedding (vocab 7, d=8) + learned positions -> LayerNorm ->
    single-head causal SDPA (q,k,v from one Linear(d,3d)) -> output projection (residual) ->
    LayerNorm -> Linear(d, vocab) logits (B,T,7).
    """

    def __init__(self, vocab: int = VOCAB, d: int = 8, max_len: int = SEQ_LEN) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(0.1 * torch.randn(max_len, d))
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        t = tokens.shape[1]
        h = self.tok(tokens) + self.pos[:t]
        q, k, v = self.qkv(self.ln1(h)).chunk(3, dim=-1)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.proj(a)
        return self.head(self.ln2(h))


class DetachedGELU(torch.autograd.Function):
    """GELU as a fused kernel provides it: a correct gradient that autograd cannot differentiate.

    The backward computes the derivative on detached tensors (as a custom CUDA kernel would), so
    double backward treats the incoming gradient's dependence on the parameters as constant.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return F.gelu(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        with torch.enable_grad():
            leaf = x.detach().requires_grad_()
            (dx,) = torch.autograd.grad(F.gelu(leaf), leaf, grad.detach())
        return dx


class OnceDifferentiableGELU(torch.autograd.Function):
    """GELU with an analytic backward marked ``@once_differentiable`` (as many kernels' are)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return F.gelu(x)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        cdf = 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))
        pdf = torch.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
        return grad * (cdf + x * pdf)


class KernelMLP(nn.Module):
    """``Linear(4, 12) → GELU → Linear(12, 12) → GELU → Linear(12, 3)``: 255 parameters.

    ``kernel`` picks the GELU: ``None`` (``F.gelu``, the reference), ``"detached"``
    (:class:`DetachedGELU`) or ``"once"`` (:class:`OnceDifferentiableGELU`). The forward pass
    and the gradient are the same for all three; only double backward differs.
    """

    KERNELS: ClassVar[dict[str, type[torch.autograd.Function]]] = {
        "detached": DetachedGELU,
        "once": OnceDifferentiableGELU,
    }

    def __init__(self, kernel: str | None = None, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.l1, self.l2, self.l3 = nn.Linear(4, 12), nn.Linear(12, 12), nn.Linear(12, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
        self.kernel = kernel

    def act(self, x: Tensor) -> Tensor:
        if self.kernel is None:
            return F.gelu(x)
        out: Tensor = self.KERNELS[self.kernel].apply(x)
        return out

    def forward(self, x: Tensor) -> Tensor:
        return self.l3(self.act(self.l2(self.act(self.l1(x)))))


# --------------------------------------------------------------------------------------------------
# Losses: loss_fn(model, batch) -> scalar
# --------------------------------------------------------------------------------------------------


def classification_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """Mean cross-entropy of ``model(x)`` against ``y`` for ``batch = (x, y)``."""
    x, y = batch
    return F.cross_entropy(model(x), y)


def lm_loss(model: nn.Module, batch: Tensor) -> Tensor:
    """Next-token cross-entropy, averaged over all tokens, for a LongTensor batch ``(B, T+1)``."""
    inputs, targets = batch[:, :-1], batch[:, 1:]
    logits = model(inputs)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


# --------------------------------------------------------------------------------------------------
# Seeded data
# --------------------------------------------------------------------------------------------------


def _labels(x: Tensor, gen: torch.Generator) -> Tensor:
    """Learnable-but-noisy labels: argmax of a fixed random linear map of the flattened input."""
    flat = x.reshape(x.shape[0], -1)
    w = torch.randn(flat.shape[1], NUM_CLASSES, generator=gen, dtype=x.dtype)
    noise = 0.5 * torch.randn(x.shape[0], NUM_CLASSES, generator=gen, dtype=x.dtype)
    return (flat @ w + noise).argmax(dim=1)


def mlp_batch(
    n: int = 16, dtype: torch.dtype = torch.float64, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """``(x, y)`` with ``x`` of shape ``(n, 6)`` and integer labels in ``[0, 3)``."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=gen, dtype=dtype)
    return x, _labels(x, gen)


def cnn_batch(
    n: int = 16, dtype: torch.dtype = torch.float64, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """``(x, y)`` with ``x`` of shape ``(n, 1, 6, 6)`` and integer labels in ``[0, 3)``."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 6, 6, generator=gen, dtype=dtype)
    return x, _labels(x, gen)


def lm_batch(n: int = 16, seed: int = 0, seq_len: int = SEQ_LEN) -> Tensor:
    """LongTensor of shape ``(n, seq_len + 1)`` with tokens in ``[0, 7)``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, seq_len + 1), generator=gen)


# --------------------------------------------------------------------------------------------------
# Dense Hessian oracle
# --------------------------------------------------------------------------------------------------


class _LossWrapper(nn.Module):
    """Module whose forward is ``loss_fn(inner, batch)``, so torch.func can swap its parameters."""

    def __init__(self, inner: nn.Module, loss_fn: LossFn, batch: Any) -> None:
        super().__init__()
        self.inner = inner
        self.loss_fn = loss_fn
        self.batch = batch

    def forward(self) -> Tensor:
        return self.loss_fn(self.inner, self.batch)


def _select_params(
    model: nn.Module, params: Iterable[Tensor | str] | None
) -> list[tuple[str, Tensor]]:
    named = list(model.named_parameters())
    if params is None:
        return [(name, p) for name, p in named if p.requires_grad]
    by_id = {id(p): name for name, p in named}
    by_name = dict(named)
    selected: list[tuple[str, Tensor]] = []
    for p in params:
        if isinstance(p, str):
            if p not in by_name:
                raise KeyError(f"model has no parameter named {p!r}")
            selected.append((p, by_name[p]))
        else:
            if id(p) not in by_id:
                raise ValueError("params must be parameters of `model` (or their names)")
            selected.append((by_id[id(p)], p))
    return selected


def dense_hessian(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    params: Iterable[Tensor | str] | None = None,
    *,
    symmetrize: bool = True,
) -> Tensor:
    """Exact ``(n, n)`` Hessian of ``loss_fn(model, batch)`` w.r.t. ``params``.

    The caller must put the model in ``eval()`` mode first: in train mode BatchNorm would update its
    running statistics in place (not allowed under torch.func) and dropout would make the loss
    random.

    Args:
        model: the network; left unchanged.
        loss_fn: ``loss_fn(model, batch) -> scalar``.
        batch: passed through to ``loss_fn``.
        params: parameters of ``model`` (tensors or names), flattened and concatenated in the order
            given. Default: every parameter with ``requires_grad``, in ``model.named_parameters()``
            order. Parameters not selected are held fixed at their current values.
        symmetrize: return ``(H + H.T) / 2`` (the raw forward-over-reverse result is symmetric
            only up to rounding).

    Returns:
        The Hessian in the parameters' dtype and on their device, indexed like the concatenation
        of ``p.reshape(-1)`` over the selected parameters.
    """
    selected = _select_params(model, params)
    if not selected:
        raise ValueError("no parameters selected")
    names = ["inner." + name for name, _ in selected]
    shapes = [p.shape for _, p in selected]
    sizes = [p.numel() for _, p in selected]
    flat0 = torch.cat([p.detach().reshape(-1) for _, p in selected])
    wrapper = _LossWrapper(model, loss_fn, batch)

    def loss_of(flat: Tensor) -> Tensor:
        pieces: Sequence[Tensor] = flat.split(sizes)
        tensors = {n: t.view(s) for n, t, s in zip(names, pieces, shapes, strict=True)}
        out: Tensor = torch.func.functional_call(wrapper, tensors, ())
        return out

    # Forward-over-reverse, but with `grad` (not `jacrev`) inside: on torch 2.13.0 (CPU) both
    # `torch.func.hessian` (= jacfwd(jacrev)) and jacrev(jacrev) return a WRONG Hessian through an
    # affine LayerNorm whose input also depends on the parameters (vmap of the inner vjp through
    # native_layer_norm_backward), e.g. for TinyCausalAttention. jacfwd(grad) and jacrev(grad)
    # agree with autograd double-backward and with finite differences; tests check this.
    # The math SDPA backend is the reference implementation and supports forward-over-reverse AD
    # in float64 on every device; the fused kernels need not.
    with sdpa_kernel(SDPBackend.MATH):
        hess = torch.func.jacfwd(torch.func.grad(loss_of))(flat0)
    hess = hess.reshape(flat0.numel(), flat0.numel())
    if symmetrize:
        hess = 0.5 * (hess + hess.T)
    return hess


# --------------------------------------------------------------------------------------------------
# One-stop factory
# --------------------------------------------------------------------------------------------------

KINDS = ("mlp", "cnn", "attention")


def batch_statistics_twin(model: nn.Module) -> nn.Module:
    """A train-mode copy of ``model`` whose BatchNorm layers normalise every batch with its own
    statistics and update nothing (the function ``norm_statistics="batch"`` probes)."""
    twin = copy.deepcopy(model).train()
    for m in twin.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = False
    return twin


def skewed_pair(u: Tensor, off: float) -> Tensor:
    """``[u₁, (u₁ + off·u₂)/‖·‖]`` from orthonormal columns ``u``: the same span, unit columns,
    Gram off-diagonal ``1/√(1 + off²)`` (a basis that is not orthonormal)."""
    second = u[:, 0] + off * u[:, 1]
    return torch.stack([u[:, 0], second / second.norm()], dim=1)


def make_model(
    kind: str, dtype: torch.dtype = torch.float64, seed: int = 0
) -> tuple[nn.Module, LossFn, Any]:
    """Return ``(model, loss_fn, batch)`` for ``kind`` in ``{"mlp", "cnn", "attention"}``.

    The model is deterministic in ``seed`` (the global RNG is left untouched), cast to ``dtype`` and
    in ``eval()`` mode. The CNN's BatchNorm has non-trivial running statistics (several train-mode
    forward passes on shifted / scaled data were run first), so eval-mode and train-mode outputs
    differ.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model: nn.Module
        loss_fn: LossFn
        batch: Any
        if kind == "mlp":
            model = MLP().to(dtype)
            loss_fn, batch = classification_loss, mlp_batch(dtype=dtype, seed=seed)
        elif kind == "cnn":
            model = SmallCNN().to(dtype)
            loss_fn, batch = classification_loss, cnn_batch(dtype=dtype, seed=seed)
            model.train()
            with torch.no_grad():
                for i in range(4):
                    x, _ = cnn_batch(n=32, dtype=dtype, seed=seed + 1000 + i)
                    model(1.5 * x + 0.3)
        elif kind == "attention":
            model = TinyCausalAttention().to(dtype)
            loss_fn, batch = lm_loss, lm_batch(seed=seed)
        else:
            raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    model.eval()
    return model, loss_fn, batch


def num_params(model: nn.Module) -> int:
    """Number of trainable scalars."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def random_orthogonal(n: int, seed: int) -> Tensor:
    """A Haar-random ``n × n`` orthogonal matrix (float64) from a private seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))
