"""``python -m lightning_landscape.cli``: the ``lightning-landscape`` command."""

from .main import main

raise SystemExit(main())
