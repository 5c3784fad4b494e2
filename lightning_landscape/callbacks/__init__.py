"""Lightning callbacks: scheduling, fault isolation, logging and checkpointing of probes."""

from .control import SharpnessAdaptiveRho, StabilityLRGuard
from .hooks import LandscapeHook, ProbeReport
from .monitor import LandscapeMonitor

__all__ = [
    "LandscapeHook",
    "LandscapeMonitor",
    "ProbeReport",
    "SharpnessAdaptiveRho",
    "StabilityLRGuard",
]
