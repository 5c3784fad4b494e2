"""The ``lightning-landscape`` command line: ``demo``, ``analyze`` and ``compare``.

``python -m lightning_landscape.cli ARGS`` is the same as ``lightning-landscape ARGS``.
"""

from .main import main

__all__ = ["main"]
