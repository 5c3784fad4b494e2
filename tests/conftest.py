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
    """``torch.compile`` with the ``aot_eager`` backend: dynamo and AOT autograd trace the product
    as with the default backend, without inductor's C++ code generation (about 15 s per graph on
    these CPUs). Returns the list of graphs compiled while the test runs. The compiled route's one
    inductor test does not use it."""
    import functools

    from torch._dynamo.backends.registry import lookup_backend

    aot_eager = lookup_backend("aot_eager")
    graphs: list[torch.fx.GraphModule] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> object:
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=backend))
    return graphs
