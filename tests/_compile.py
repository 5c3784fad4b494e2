"""``torch.compile`` in tests: the ``aot_eager`` backend, recording each graph it compiles.

Dynamo and AOT autograd trace a product as with the default backend, without inductor's C++ code
generation (about 15 s per graph on these CPUs). Used by the ``fast_compile`` fixture and, through
:func:`recording_compile`, by the distributed worker, which runs outside pytest.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch


def recording_aot_eager(graphs: list[torch.fx.GraphModule]) -> Callable[..., Any]:
    """A ``torch.compile`` backend: ``aot_eager``, appending each compiled graph to ``graphs``."""
    from torch._dynamo.backends.registry import lookup_backend

    aot_eager = lookup_backend("aot_eager")

    def backend(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Any:
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    return backend


@contextlib.contextmanager
def recording_compile(graphs: list[torch.fx.GraphModule]) -> Iterator[None]:
    """``torch.compile`` with :func:`recording_aot_eager` inside the block (restored after), for
    code outside pytest, which has no ``monkeypatch``."""
    compile_ = torch.compile
    torch.compile = functools.partial(  # type: ignore[assignment]
        compile_, backend=recording_aot_eager(graphs)
    )
    try:
        yield
    finally:
        torch.compile = compile_  # type: ignore[assignment]
