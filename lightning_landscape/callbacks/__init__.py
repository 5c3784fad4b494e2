"""Lightning callbacks: scheduling, fault isolation, logging and checkpointing of probes."""

from ._hooks import LandscapeHook
from .monitor import LandscapeMonitor

__all__ = ["LandscapeHook", "LandscapeMonitor"]
