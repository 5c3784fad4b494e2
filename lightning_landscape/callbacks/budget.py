"""The overhead ledger behind ``LandscapeMonitor(max_overhead=...)``."""

from __future__ import annotations

import math
import statistics
import time
from collections import deque


class OverheadLedger:
    """Wall time since training started, time spent in probes, and optimizer-step times.

    Step times are measured between consecutive optimizer steps with probe time excluded; the
    median of the last 50 is the step-time estimate. The next probe is allowed once

        (spent + cost) <= budget · (elapsed + gap · step_time + cost),

    where ``cost`` is the last probe's duration: the fraction of wall time in probes, including
    the next one, stays within the budget. A single process checks this directly at every step
    (:meth:`allows`); under DDP, where wall clocks differ between ranks, the number of steps to
    wait (:meth:`gap`) is agreed between ranks instead.
    """

    _MIN_STEPS = 3

    def __init__(self) -> None:
        self.start(0)

    def start(self, step: int) -> None:
        """Reset at the start of training (``step``: the global step training starts from)."""
        self.t_start = time.perf_counter()
        self.spent = 0.0
        self.last_cost = 0.0
        self.next_step: int | None = None
        self._step = step
        self._mark = self.t_start
        self._steps: deque[float] = deque(maxlen=50)

    def record_step(self, step: int) -> None:
        """Call at every batch end; a change of ``step`` closes one optimizer-step interval."""
        now = time.perf_counter()
        if step != self._step:
            self._steps.append((now - self._mark) / max(step - self._step, 1))
            self._step = step
            self._mark = now

    def record_probe(self, seconds: float) -> None:
        """Book a probe's duration (and keep it out of the next step interval)."""
        self.spent += seconds
        self.last_cost = seconds
        self._mark += seconds

    @property
    def ready(self) -> bool:
        """Whether enough optimizer steps were timed to schedule."""
        return len(self._steps) >= self._MIN_STEPS

    def allows(self, budget: float) -> bool:
        """Whether a probe now (costing about the last one) keeps probe time within ``budget``."""
        elapsed = time.perf_counter() - self.t_start
        return self.spent + self.last_cost <= budget * (elapsed + self.last_cost)

    def gap(self, budget: float) -> int:
        """Optimizer steps to wait before the next probe fits in ``budget``."""
        elapsed = time.perf_counter() - self.t_start
        step_time = max(statistics.median(self._steps), 1e-9)
        cost = self.last_cost
        needed = ((self.spent + cost) / budget - cost - elapsed) / step_time
        return max(1, math.ceil(needed))

    def fraction(self) -> float:
        """Fraction of the wall time since the start spent in probes."""
        elapsed = time.perf_counter() - self.t_start
        return self.spent / elapsed if elapsed > 0 else 0.0
