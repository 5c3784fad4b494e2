"""Lightning callbacks: scheduling, fault isolation, logging and checkpointing of probes."""

from .monitor import LandscapeMonitor

__all__ = ["LandscapeMonitor"]
