"""Memory cap of the curvature probe: micro-batches (``split_batch``) and ``retain_graph``.

A probe batch split into micro-batches and weighted by sample count gives the same operator as the
whole batch (models without train-mode BatchNorm), while every route keeps only one micro-batch's
activations and gradient graph alive at a time, provided the double-backward route rebuilds its
graphs per product (``retain_graph=False``, the default with several batches).

Memory is measured on the CPU with a proxy: the bytes of tensors saved for backward that are alive
at once (see :class:`SavedBytes`).
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict, namedtuple
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from lightning_landscape import HessianOperator, curvature_context
from lightning_landscape.operators import HVPRoute, join_batches, split_batch
from tests._models import KINDS, cnn_batch, lm_batch, make_model, mlp_batch

F64 = torch.float64
EXACT_ROUTES = ("double_backward", "functorch")
ROUTES = (*EXACT_ROUTES, "finite_difference")
Pair = namedtuple("Pair", ["x", "y"])


def _randn(*shape: int, seed: int = 0) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _rel_err(actual: Tensor, expected: Tensor) -> float:
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-300))


def _big_batch(kind: str, n: int = 48) -> Any:
    if kind == "mlp":
        return mlp_batch(n=n, seed=3)
    return cnn_batch(n=n, seed=3) if kind == "cnn" else lm_batch(n=n, seed=3)


# --------------------------------------------------------------------------------------------------
# split_batch
# --------------------------------------------------------------------------------------------------


def test_join_batches_inverts_split_batch() -> None:
    Pair = namedtuple("Pair", "x y")
    batch = {
        "pair": Pair(torch.arange(14.0).reshape(7, 2), torch.arange(7)),
        "mask": [torch.ones(7, 3, dtype=torch.bool)],
        "scale": torch.tensor(2.0),
        "tag": "train",
    }
    joined = join_batches(split_batch(batch, 3))
    assert isinstance(joined["pair"], Pair) and joined["tag"] == "train"
    torch.testing.assert_close(joined["pair"].x, batch["pair"].x, rtol=0, atol=0)
    torch.testing.assert_close(joined["pair"].y, batch["pair"].y, rtol=0, atol=0)
    torch.testing.assert_close(joined["mask"][0], batch["mask"][0], rtol=0, atol=0)
    assert joined["scale"] is batch["scale"]
    one = (torch.zeros(2, 3),)
    assert join_batches([one]) is one  # one batch: itself, not a copy
    assert join_batches([]) is None


@pytest.mark.parametrize(
    "other",
    [
        pytest.param((torch.zeros(2, 5), torch.zeros(2), "a"), id="ragged-length"),
        pytest.param((torch.zeros(2, 4), torch.zeros(2, dtype=torch.long), "a"), id="dtype"),
        pytest.param((torch.zeros(2, 4), torch.zeros(2), "b"), id="leaf"),
        pytest.param([torch.zeros(2, 4), torch.zeros(2), "a"], id="container"),
        pytest.param((torch.zeros(2, 4), torch.zeros(2)), id="length"),
        pytest.param((torch.zeros(2, 4), torch.tensor(1.0), "a"), id="0-d"),
    ],
)
def test_join_batches_refuses_what_it_cannot_join(other: Any) -> None:
    assert join_batches([(torch.zeros(3, 4), torch.zeros(3), "a"), other]) is None


def test_split_tensor_with_remainder_gives_views() -> None:
    t = torch.arange(14.0).reshape(7, 2)
    pieces = split_batch(t, 3)
    assert [p[:, 0].tolist() for p in pieces] == [[0, 2, 4], [6, 8, 10], [12]]
    storage = t.untyped_storage().data_ptr()
    assert all(p.untyped_storage().data_ptr() == storage for p in pieces)  # views, no copies
    torch.testing.assert_close(torch.cat(pieces), t, rtol=0, atol=0)


@pytest.mark.parametrize("max_size", [7, 8, 100])
def test_split_batch_not_larger_than_max_size_is_one_piece(max_size: int) -> None:
    x, y = mlp_batch(n=7)
    (piece,) = split_batch((x, y), max_size)
    assert isinstance(piece, tuple)
    assert torch.equal(piece[0], x) and torch.equal(piece[1], y)


def test_split_exact_multiple_and_size_one() -> None:
    t = torch.arange(6)
    assert [p.tolist() for p in split_batch(t, 2)] == [[0, 1], [2, 3], [4, 5]]
    assert [p.tolist() for p in split_batch(t, 1)] == [[i] for i in range(6)]


def test_split_tuple_and_list() -> None:
    x, y = mlp_batch(n=5)
    pieces = split_batch((x, y), 2)
    assert len(pieces) == 3 and all(type(p) is tuple for p in pieces)
    assert [p[0].shape[0] for p in pieces] == [2, 2, 1]
    assert torch.equal(pieces[2][1], y[4:])
    lists = split_batch([x, [y, x]], 4)
    assert all(type(p) is list and type(p[1]) is list for p in lists)
    assert [p[1][1].shape[0] for p in lists] == [4, 1]
    assert torch.equal(lists[1][1][1], x[4:])


def test_split_dicts_namedtuples_and_shared_leaves() -> None:
    x, y = mlp_batch(n=5)
    scale = torch.tensor(2.0)  # 0-d: repeated
    batch: OrderedDict[str, Any] = OrderedDict(
        pair=Pair(x, y), scale=scale, name="probe", meta={"mask": torch.ones(5, 3), "k": None}
    )
    pieces = split_batch(batch, 3)
    assert len(pieces) == 2
    for piece, (lo, hi) in zip(pieces, [(0, 3), (3, 5)], strict=True):
        assert type(piece) is OrderedDict and list(piece) == list(batch)
        assert type(piece["pair"]) is Pair
        assert torch.equal(piece["pair"].x, x[lo:hi]) and torch.equal(piece["pair"].y, y[lo:hi])
        assert piece["scale"] is scale and piece["name"] == "probe"
        assert piece["meta"]["mask"].shape == (hi - lo, 3) and piece["meta"]["k"] is None
    assert batch["pair"].x is x  # the input is not modified


def test_split_batch_sample_weights_are_piece_sizes() -> None:
    model, loss_fn, _ = make_model("mlp")
    with curvature_context(model):
        op = HessianOperator(model, loss_fn, split_batch(mlp_batch(n=16), 3))
    assert op.weights == pytest.approx([3 / 16] * 5 + [1 / 16])


@pytest.mark.parametrize("max_size", [0, -2, 1.5, True, None])
def test_split_batch_rejects_bad_max_size(max_size: Any) -> None:
    with pytest.raises(ValueError, match=r"max_size must be an integer >= 1.*pass e\.g\."):
        split_batch(torch.zeros(4), max_size)


def test_split_batch_rejects_mismatched_sample_dims() -> None:
    with pytest.raises(ValueError, match="leading") as info:
        split_batch({"x": torch.zeros(4, 2), "y": torch.zeros(3)}, 2)
    assert "batch['x']: 4" in str(info.value) and "batch['y']: 3" in str(info.value)
    with pytest.raises(ValueError, match=r"batch\[1\]\[0\]: 5"):
        split_batch((torch.zeros(4), [torch.zeros(5)]), 2)


@pytest.mark.parametrize("batch", [{"a": 1, "b": "x"}, (torch.tensor(1.0),), []])
def test_split_batch_rejects_batch_without_sample_dim(batch: Any) -> None:
    with pytest.raises(ValueError, match="sample"):
        split_batch(batch, 2)


def test_split_batch_rejects_empty_batch() -> None:
    with pytest.raises(ValueError, match="0 samples"):
        split_batch((torch.zeros(0, 3), torch.zeros(0)), 2)


# --------------------------------------------------------------------------------------------------
# Micro-batches give the operator of the whole batch
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("kind", KINDS)
def test_micro_batches_equal_whole_batch(kind: str, route: HVPRoute) -> None:
    model, loss_fn, batch = make_model(kind)  # the CNN's BatchNorm is in eval mode
    pieces = split_batch(batch, 3)
    assert len(pieces) == 6  # 16 samples: 5 pieces of 3 and a remainder of 1
    with curvature_context(model):
        whole = HessianOperator(model, loss_fn, [batch], route=route)
        block = _randn(whole.size, 4, seed=1)
        expected = whole.matmat(block)
        rebuilt = HessianOperator(model, loss_fn, pieces, route=route, retain_graph=False)
        kept = HessianOperator(model, loss_fn, pieces, route=route, retain_graph=True)
        out_rebuilt, out_kept = rebuilt.matmat(block), kept.matmat(block)
        again = rebuilt.matmat(block)  # rebuilding on every product changes nothing
        single = rebuilt.matvec(block[:, 2])
    assert rebuilt.loss_value == pytest.approx(whole.loss_value, rel=1e-12)
    rtol = 1e-7 if route == "finite_difference" else 1e-10
    assert _rel_err(out_rebuilt, expected) <= rtol
    assert _rel_err(single, expected[:, 2]) <= rtol
    # Kept graphs on a CPU apply the block vector by vector, rebuilt ones batched: rounding only.
    assert _rel_err(out_kept, out_rebuilt) <= rtol
    torch.testing.assert_close(again, out_rebuilt, rtol=0, atol=0)
    assert not out_rebuilt.requires_grad


def test_auto_route_calibrates_on_micro_batches() -> None:
    model, loss_fn, batch = make_model("mlp")
    block = _randn(155, 3, seed=2)
    with curvature_context(model):
        expected = HessianOperator(model, loss_fn, [batch], route="double_backward").matmat(block)
        op = HessianOperator(model, loss_fn, split_batch(batch, 5), route="auto", calibrate=True)
        assert op.retain_graph is False
        first = op.matmat(block)
        later = op.matmat(block)
    assert set(op.route_seconds) == {"functorch", "double_backward"}
    assert op.route in ("functorch", "double_backward")
    assert op._graphs is None  # nothing retained by the calibration either
    assert _rel_err(first, expected) <= 1e-10
    assert _rel_err(later, expected) <= 1e-10


def test_retain_graph_default_and_validation() -> None:
    model, loss_fn, batch = make_model("mlp")
    with curvature_context(model):
        assert HessianOperator(model, loss_fn, [batch]).retain_graph is True
        assert HessianOperator(model, loss_fn, split_batch(batch, 8)).retain_graph is False
        assert HessianOperator(model, loss_fn, [batch], retain_graph=False).retain_graph is False
        with pytest.raises(TypeError, match="retain_graph"):
            HessianOperator(model, loss_fn, [batch], retain_graph=1)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# Forward passes: retained graph vs rebuilt per product
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _count_forwards(model: nn.Module) -> Iterator[list[int]]:
    """Record the number of samples of every forward pass of ``model``."""
    calls: list[int] = []
    handle = model.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    try:
        yield calls
    finally:
        handle.remove()


@pytest.mark.parametrize(
    ("num_pieces", "retain_graph", "per_product"),
    [
        (1, None, [1, 0, 0]),  # default with one batch: graph kept, built on the first product
        (4, None, [4, 4, 4]),  # default with several batches: rebuilt on every product
        (4, True, [4, 0, 0]),
        (1, False, [1, 1, 1]),
    ],
)
def test_forward_passes_per_product(
    num_pieces: int, retain_graph: bool | None, per_product: list[int]
) -> None:
    model, loss_fn, batch = make_model("mlp")
    batches = split_batch(batch, 16 // num_pieces)
    assert len(batches) == num_pieces
    block = _randn(155, 3, seed=3)
    with curvature_context(model):
        op = HessianOperator(
            model, loss_fn, batches, route="double_backward", retain_graph=retain_graph
        )
        counts = []
        with _count_forwards(model) as calls:
            for _ in range(3):
                before = len(calls)
                op.matmat(block)
                counts.append(len(calls) - before)
        op.release()
    assert counts == per_product
    assert all(n == 16 // num_pieces for n in calls)


# --------------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------------


class SavedBytes:
    """Bytes of tensors saved for backward that are alive at the same time (a CPU memory proxy).

    Inside :meth:`watch`, a ``saved_tensors_hooks`` pack hook wraps every tensor autograd saves
    for backward (activations, and in the double-backward route the tensors saved by the
    ``create_graph`` backward) in a :class:`_Packed` object held by the graph. Creating it adds
    the tensor's bytes to :attr:`live`; the object is destroyed exactly when autograd lets go of
    it (the graph's node is freed, or a backward without ``retain_graph`` releases its buffers),
    and its ``__del__`` subtracts them. :attr:`peak` is the largest ``live`` seen, i.e. the most
    activation memory held at once. These saved tensors are what scales with the number of
    samples whose graph is alive, so retaining the graphs of all micro-batches gives (at least)
    the peak of the whole batch, while freeing each graph before the next micro-batch's forward
    pass gives the peak of one micro-batch. The packed tensor is stored detached: keeping the
    original would close a reference cycle (node → saved tensor → its ``grad_fn``) that Python's
    garbage collector cannot see, so graphs would never be freed.

    Views of one storage are counted once per view, so this over-counts a little, in the same
    way for every route; it does not see allocations that are not saved for backward (gradient
    buffers, products), which do not scale with the number of samples alive.
    """

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0

    @contextlib.contextmanager
    def watch(self) -> Iterator[SavedBytes]:
        with torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack):
            yield self

    def _pack(self, t: Tensor) -> _Packed:
        return _Packed(t, self)


class _Packed:
    __slots__ = ("nbytes", "tensor", "tracker")

    def __init__(self, t: Tensor, tracker: SavedBytes) -> None:
        self.tensor = t.detach()
        self.tracker = tracker
        self.nbytes = t.numel() * t.element_size()
        tracker.live += self.nbytes
        tracker.peak = max(tracker.peak, tracker.live)

    def __del__(self) -> None:
        self.tracker.live -= self.nbytes


def _unpack(packed: _Packed) -> Tensor:
    return packed.tensor


def _probe(
    model: nn.Module, loss_fn: Any, batches: list[Any], **kwargs: Any
) -> tuple[SavedBytes, list[int], HessianOperator]:
    """Peak saved bytes of two 4-vector products, and the live bytes as each forward starts."""
    op = HessianOperator(model, loss_fn, batches, **kwargs)
    tracker = SavedBytes()
    live_at_forward: list[int] = []
    handle = model.register_forward_pre_hook(lambda m, a: live_at_forward.append(tracker.live))
    try:
        with tracker.watch():
            for seed in (4, 5):
                op.matmat(_randn(op.size, 4, seed=seed))
    finally:
        handle.remove()
    return tracker, live_at_forward, op


@pytest.mark.parametrize("kind", KINDS)
def test_double_backward_peak_is_one_micro_batch(kind: str) -> None:
    model, loss_fn, _ = make_model(kind)
    batch = _big_batch(kind)
    pieces = split_batch(batch, 6)  # 8 micro-batches
    with curvature_context(model):
        whole, _, _ = _probe(model, loss_fn, [batch], route="double_backward")
        capped, live_at_forward, op = _probe(model, loss_fn, pieces, route="double_backward")
        kept, kept_live_at_forward, kept_op = _probe(
            model, loss_fn, pieces, route="double_backward", retain_graph=True
        )
        assert kept.live > 0  # the retained graphs hold memory until release()
        kept_op.release()
    assert capped.peak <= 0.25 * whole.peak  # ideally 1/8, plus parameter-sized saved tensors
    # Each micro-batch's graph is freed before the next one's forward pass (two products, one
    # forward per micro-batch each), and nothing is left afterwards.
    assert live_at_forward == [0] * (2 * len(pieces))
    assert capped.live == 0
    # Control: retaining the graphs of all micro-batches costs the whole batch's memory again,
    # which the proxy sees (the test above would fail if graphs were retained).
    assert kept.peak >= 0.9 * whole.peak
    assert max(kept_live_at_forward) > 0
    assert kept.live == 0
    assert op.retain_graph is False  # the default with several batches


@pytest.mark.parametrize("kind", KINDS)
def test_finite_difference_peak_is_one_micro_batch(kind: str) -> None:
    model, loss_fn, _ = make_model(kind)
    batch = _big_batch(kind)
    pieces = split_batch(batch, 6)
    with curvature_context(model):
        whole, _, _ = _probe(model, loss_fn, [batch], route="finite_difference")
        capped, live_at_forward, _ = _probe(model, loss_fn, pieces, route="finite_difference")
    assert live_at_forward == [0] * (4 * 4 * 2 * len(pieces))  # 4 gradients per vector (order 4)
    assert capped.live == 0
    assert capped.peak <= 0.25 * whole.peak


@pytest.mark.parametrize("kind", KINDS)
def test_probe_peak_within_issue_budget_of_a_training_step(kind: str) -> None:
    """The issue's goal: probe peak ≤ 2.5× the training step's (here: saved-tensor bytes).

    The double backward on a whole training batch holds about 3× a training step's saved
    tensors (activations plus the ``create_graph`` backward graph); micro-batches of half the
    training batch bring it under the budget.
    """
    model, loss_fn, _ = make_model(kind)
    batch = _big_batch(kind)
    train = SavedBytes()
    with train.watch():
        loss = loss_fn(model, batch)
        torch.autograd.grad(loss, list(model.parameters()))
        del loss
    with curvature_context(model):
        probe, _, _ = _probe(model, loss_fn, split_batch(batch, 24), route="double_backward")
    assert probe.peak <= 2.5 * train.peak


@pytest.mark.parametrize("kind", KINDS)
def test_functorch_traces_one_micro_batch_at_a_time(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Samples forwarded inside each traced (vmapped) ``jvp(grad)`` call.

    ``torch.func`` refuses saved-tensor hooks, so :class:`SavedBytes` cannot watch this route.
    Instead: a ``torch.func`` call holds no state between calls, so the activations alive at once
    are at most those of the samples forwarded within one call. A spy on ``torch.vmap`` opens a
    new record per call and a forward pre-hook adds each forward's sample count to it. A route
    that summed the losses of all micro-batches inside one traced function (the whole batch's
    activations at once) would record 16 samples in a call; the capped route records one
    micro-batch per call.
    """
    model, loss_fn, batch = make_model(kind)
    pieces = split_batch(batch, 3)
    per_call: list[list[int]] = []
    real_vmap = torch.vmap

    def spy_vmap(fn, *args, **kwargs):  # type: ignore[no-untyped-def]
        inner = real_vmap(fn, *args, **kwargs)

        def call(*xs: Tensor):  # type: ignore[no-untyped-def]
            per_call.append([])
            return inner(*xs)

        return call

    monkeypatch.setattr(torch, "vmap", spy_vmap)
    block = _randn(sum(p.numel() for p in model.parameters()), 4, seed=6)
    with curvature_context(model):
        op = HessianOperator(model, loss_fn, pieces, route="functorch")
        handle = model.register_forward_pre_hook(
            lambda m, a: per_call[-1].append(a[0].shape[0]) if per_call else None
        )
        try:
            for _ in range(2):
                op.matmat(block)
        finally:
            handle.remove()
    assert per_call == [[3]] * 5 + [[1]] + [[3]] * 5 + [[1]]


def test_monitor_probe_micro_batch_size_gives_the_same_spectrum() -> None:
    import lightning.pytorch as pl

    from lightning_landscape import LandscapeMonitor
    from tests._lightning import ClassifierModule, make_dataloader, trainer_kwargs

    results = {}
    for size in (None, 7):
        pl.seed_everything(0, verbose=False)
        monitor = LandscapeMonitor(  # running statistics: micro-batching is exact (eval mode)
            every_n_steps=5,
            top_k=2,
            num_probe_samples=32,
            probe_micro_batch_size=size,
            norm_statistics="running",
        )
        trainer = pl.Trainer(**trainer_kwargs(max_steps=10, callbacks=[monitor]))
        trainer.fit(ClassifierModule(), make_dataloader())
        assert monitor._batches is None  # released at train end
        results[size] = [(r.step, r.eigenvalues, r.lambda_min) for r in monitor.history]
    for (s1, e1, m1), (s2, e2, m2) in zip(results[None], results[7], strict=True):
        assert s1 == s2
        assert e1 == pytest.approx(e2, rel=1e-4) and m1 == pytest.approx(m2, rel=1e-3, abs=1e-6)
    with pytest.raises(ValueError, match="probe_micro_batch_size"):
        LandscapeMonitor(probe_micro_batch_size=0)
