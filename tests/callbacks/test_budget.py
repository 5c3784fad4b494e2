"""`LandscapeMonitor(max_overhead=...)`: the ledger with a fake clock, and real Trainer runs."""

import itertools

import lightning.pytorch as pl
import pytest

from lightning_landscape import CurvatureExponent, LandscapeMonitor, Sharpness, Trace
from lightning_landscape.callbacks import budget as budget_module
from lightning_landscape.callbacks import monitor as monitor_module
from tests._lightning import ClassifierModule, MemoryLogger, make_dataloader, trainer_kwargs


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("budget", [0.02, 0.1, 0.3])
def test_ledger_keeps_probe_time_within_the_budget(monkeypatch, budget: float) -> None:
    """Steps take 1 s, probes 5 s; probing whenever the ledger allows it keeps the fraction of
    wall time in probes at or below the budget at every moment after the first probe, and close
    to it (within one probe's share) at the end."""
    clock = FakeClock()
    monkeypatch.setattr(budget_module.time, "perf_counter", clock)
    ledger = budget_module.OverheadLedger()
    ledger.start(0)

    def probe() -> None:
        clock.now += 5.0
        ledger.record_probe(5.0)

    probe()  # the probe at train start
    probes, step = 1, 0
    for step in range(1, 20_001):
        clock.now += 1.0
        ledger.record_step(step)
        if ledger.next_step is None and ledger.ready:
            ledger.next_step = step + ledger.gap(budget)
        if ledger.next_step is not None and step >= ledger.next_step:
            probe()
            probes += 1
            ledger.next_step = step + ledger.gap(budget)
            assert ledger.fraction() <= budget + 1e-12
    elapsed = clock.now - 100.0
    assert ledger.spent == 5.0 * probes
    assert budget - 5.0 / elapsed <= ledger.fraction() <= budget + 1e-12
    # the steady-state gap: cost (1 - b) / (b · step time)
    assert ledger.gap(budget) <= 5.0 * (1 - budget) / budget + 2


def test_ledger_excludes_probe_time_from_step_times(monkeypatch) -> None:
    clock = FakeClock()
    monkeypatch.setattr(budget_module.time, "perf_counter", clock)
    ledger = budget_module.OverheadLedger()
    ledger.start(0)
    for step in range(1, 4):
        clock.now += 0.5
        if step == 2:
            clock.now += 7.0  # a probe inside this interval
            ledger.record_probe(7.0)
        ledger.record_step(step)
    assert ledger.ready
    assert list(ledger._steps) == [0.5, 0.5, 0.5]


def test_max_overhead_probes_adaptively_and_logs_the_overhead(monkeypatch) -> None:
    """A fake clock makes the run deterministic: every optimizer step takes 1 s and every probe
    5 s, so with a 25 % budget the steady gap is 5 · 0.75 / 0.25 = 15 steps."""
    clock = FakeClock()
    monkeypatch.setattr(budget_module.time, "perf_counter", clock)
    monkeypatch.setattr(monitor_module.time, "perf_counter", clock)
    real_round = LandscapeMonitor._measure_all

    def slow_round(self, trainer, pl_module, due):  # type: ignore[no-untyped-def]
        clock.now += 5.0
        return real_round(self, trainer, pl_module, due)

    class Tick(pl.Callback):
        def on_train_batch_start(self, *args) -> None:  # type: ignore[no-untyped-def]
            clock.now += 1.0

    monkeypatch.setattr(LandscapeMonitor, "_measure_all", slow_round)
    logger = MemoryLogger()
    monitor = LandscapeMonitor(
        probes=[
            Sharpness(2, every_n_steps=None, on_train_end=False),
            Trace(every_n_steps=None, on_train_end=False),
        ],
        max_overhead=0.25,
        num_probe_samples=32,
    )
    trainer = pl.Trainer(
        **trainer_kwargs(max_steps=100, logger=logger, callbacks=[Tick(), monitor])
    )
    trainer.fit(ClassifierModule(), make_dataloader())
    steps = [r.step for r in monitor.history]
    gaps = [b - a for a, b in itertools.pairwise(steps)]
    assert steps[0] == 0 and len(steps) >= 5, steps
    assert all(14 <= g <= 16 for g in gaps[1:]), steps  # the steady state
    overheads = [
        m["landscape/cost/overhead"] for _, m in logger.records if "landscape/cost/overhead" in m
    ]
    assert len(overheads) == len(steps)
    assert all(o <= 0.25 + 1e-9 for o in overheads[1:])
    elapsed = clock.now - 100.0
    assert 0.25 - 5.0 / elapsed <= monitor.overhead <= 0.25 + 1e-9


def test_every_n_steps_is_the_longest_gap_under_a_budget() -> None:
    # A budget far too small for any probe: the floor alone sets the cadence.
    monitor = LandscapeMonitor(every_n_steps=7, max_overhead=1e-9, top_k=2, num_probe_samples=32)
    trainer = pl.Trainer(**trainer_kwargs(max_steps=30, callbacks=[monitor]))
    trainer.fit(ClassifierModule(), make_dataloader())
    steps = [r.step for r in monitor.history]
    assert steps[:1] == [0]
    gaps = [b - a for a, b in itertools.pairwise(steps[:-1])]
    assert gaps and all(g == 7 for g in gaps), steps
    assert steps[-1] == 30  # the train-end probe
    assert all(r.trace is not None for r in monitor.history)  # Trace runs in the same rounds


def test_epoch_cadenced_probes_keep_their_cadence_under_a_budget() -> None:
    """Probes without an epoch cadence share the budgeted rounds; an epoch-cadenced one does not."""
    monitor = LandscapeMonitor(
        probes=[
            Sharpness(1, lambda_min=False, every_n_steps=5),
            CurvatureExponent(3, every_n_steps=None, every_n_epochs=1, on_train_end=False),
        ],
        max_overhead=1e-9,
        num_probe_samples=32,
    )
    trainer = pl.Trainer(**trainer_kwargs(max_steps=32, callbacks=[monitor]))
    trainer.fit(ClassifierModule(), make_dataloader())  # 16 steps per epoch
    assert [r.step for r in monitor.history] == [0, 5, 10, 15, 20, 25, 30, 32]
    assert monitor.probe_named("alpha").last_step == 32  # epoch ends at steps 16 and 32


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 2.0])
def test_max_overhead_must_be_a_fraction(bad: float) -> None:
    with pytest.raises(ValueError, match=r"max_overhead must be a finite number in \(0, 1\)"):
        LandscapeMonitor(max_overhead=bad)
