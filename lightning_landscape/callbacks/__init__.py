"""Lightning callbacks: scheduling, fault isolation, logging and checkpointing of probes."""

from ._hooks import LandscapeHook
from .control import SharpnessAdaptiveRho, StabilityLRGuard
from .monitor import LandscapeMonitor

__all__ = ["LandscapeHook", "LandscapeMonitor", "SharpnessAdaptiveRho", "StabilityLRGuard"]
