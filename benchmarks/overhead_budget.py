"""Does `LandscapeMonitor(max_overhead=...)` keep monitoring within its wall-time budget?

Trains the demo's digits CNN (lightning_landscape.cli.demo) for a fixed wall time per budget
with the monitor reading λ_max (top-1 eigenvalue on 128 probe samples, warm-started) and
reports, per budget: the probes taken, how often λ_max was read (mean steps between probes), the
monitor's own overhead figure, and the overhead measured from outside (probe seconds /
`trainer.fit` wall time).

    python benchmarks/overhead_budget.py                 # budgets 0.02 and 0.05; 90 s each
    python benchmarks/overhead_budget.py --budgets 0.05 --seconds 20
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import time

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from lightning_landscape import LandscapeMonitor, Sharpness
from lightning_landscape.cli.demo import DigitsCNN, load_digits_tensors


def run(budget: float, seconds: float, floor: int | None) -> dict[str, object]:
    pl.seed_everything(0, verbose=False)
    train, _, _ = load_digits_tensors()
    monitor = LandscapeMonitor(
        probes=[Sharpness(1, lambda_min=False, every_n_steps=floor, on_train_end=False)],
        max_overhead=budget,
        num_probe_samples=128,
    )
    trainer = pl.Trainer(
        max_time={"seconds": seconds},
        max_epochs=-1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[monitor],
    )
    loader = DataLoader(
        train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    t0 = time.perf_counter()
    trainer.fit(DigitsCNN(), loader)
    wall = time.perf_counter() - t0
    steps = [r.step for r in monitor.history]
    gaps = [b - a for a, b in itertools.pairwise(steps)]
    probe_seconds = sum(r.seconds for r in monitor.history)
    return {
        "budget": budget,
        "floor_every_n_steps": floor,
        "optimizer_steps": trainer.global_step,
        "probes": len(steps),
        "mean_steps_between_probes": sum(gaps) / len(gaps) if gaps else None,
        "mean_probe_seconds": probe_seconds / max(len(steps), 1),
        "monitor_overhead": monitor.overhead,
        "measured_overhead": probe_seconds / wall,
        "fit_wall_seconds": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default="0.02,0.05")
    parser.add_argument("--seconds", type=float, default=90.0, help="training wall time per run")
    parser.add_argument("--floor", type=int, default=None, help="every_n_steps (longest gap)")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    meta = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "loadavg_start": os.getloadavg(),
    }
    rows = [run(float(b), args.seconds, args.floor) for b in args.budgets.split(",")]
    meta["loadavg_end"] = os.getloadavg()
    header = f"{'budget':>7} {'steps':>6} {'probes':>6} {'steps/probe':>11} {'s/probe':>8} "
    header += f"{'monitor':>8} {'measured':>8}"
    print(header)
    for r in rows:
        gap = r["mean_steps_between_probes"]
        print(
            f"{r['budget']:7.3f} {r['optimizer_steps']:6d} {r['probes']:6d} "
            f"{'-' if gap is None else f'{gap:.0f}':>11} {r['mean_probe_seconds']:8.3f} "
            f"{r['monitor_overhead']:8.4f} {r['measured_overhead']:8.4f}"
        )
    print(json.dumps(meta))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"meta": meta, "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
