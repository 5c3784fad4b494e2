from collections.abc import Callable

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():  # type: ignore[no-untyped-def]
    # Every test problem is tiny: a multi-threaded OpenMP pool only adds overhead, and on a busy
    # 2-core machine oversubscription makes small kernels 10-100x slower.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def fast_compile(monkeypatch: pytest.MonkeyPatch) -> list[torch.fx.GraphModule]:
    """``torch.compile`` with the recording ``aot_eager`` backend of ``tests/_compile.py``.

    Returns the list of graphs compiled while the test runs. The compiled route's one inductor
    test does not use it.
    """
    import functools

    from tests._compile import recording_aot_eager

    graphs: list[torch.fx.GraphModule] = []
    backend = recording_aot_eager(graphs)
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=backend))
    return graphs


@pytest.fixture
def as_two_ranks(monkeypatch: pytest.MonkeyPatch) -> Callable[[], None]:
    """Call it to make this process look like one rank of an initialised 2-rank group (no
    collective runs: a ``SyncBatchNorm`` that tried to synchronise on the CPU raises first)."""
    import torch.distributed as dist

    def apply() -> None:
        monkeypatch.setattr(dist, "is_initialized", lambda: True)
        monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
        monkeypatch.setattr(dist, "group", type("G", (), {"WORLD": object()}))

    return apply
