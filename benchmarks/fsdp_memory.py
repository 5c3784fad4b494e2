"""Memory per process of a λ_max probe under FSDP2, on 1 and 2 processes (CPU, gloo).

The 27 M-parameter GPT of ``real_sizes.py`` (6 × 512, vocab 8192, untied head) is sharded with
``fully_shard`` (each block, then the root); each process holds its slice of every solver vector
(:class:`~lightning_landscape.operators.ShardedHessianOperator`). For W = 1 and W = 2 processes
over the same probe data (2 sequences of 64 tokens, split between the processes), every process
reports the peak of its resident memory above its baseline during one AdamW training step and
during a λ_max solve (``lanczos(k=1, tol=1e-3)``, default basis of 20 vectors), and the size of
its slice. The solver basis is ``21 × slice × 4`` bytes: it should halve from W = 1 to W = 2.

    python benchmarks/fsdp_memory.py              # both launches, writes results_fsdp_memory.json
    python benchmarks/fsdp_memory.py --quick      # a small GPT, seconds (smoke test)

Run it with nothing else on the machine: the W = 2 launch puts one process on each core.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lightning_landscape as ll  # noqa: E402
from benchmarks.bench_cpu import TinyGPT, gpt_loss  # noqa: E402
from benchmarks.memory import peak_above_baseline  # noqa: E402
from lightning_landscape.operators.sharded import ShardedHessianOperator  # noqa: E402

SEQUENCES, TOKENS = 2, 64
OUT = Path(__file__).with_name("results_fsdp_memory.json")


def worker(quick: bool, out: Path) -> None:
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=20))
    rank, world = dist.get_rank(), dist.get_world_size()
    vocab, d, heads, layers = (512, 64, 4, 2) if quick else (8192, 512, 8, 6)
    torch.manual_seed(0)
    model = TinyGPT(vocab, TOKENS, d, heads, layers)
    num_params = sum(p.numel() for p in model.parameters())
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, vocab, (SEQUENCES, TOKENS), generator=g)
    y = torch.randint(0, vocab, (SEQUENCES, TOKENS), generator=g)
    per = SEQUENCES // world
    mine = (x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train_step() -> None:
        opt.zero_grad(set_to_none=True)
        gpt_loss(model, mine).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    train_step()  # AdamW's state exists before anything is measured
    step_mib, step_s, _ = peak_above_baseline(train_step)

    def probe() -> Any:
        with ll.curvature_context(model):
            op = ShardedHessianOperator(model, gpt_loss, [mine])
            return op.size, ll.lanczos(op, k=1, tol=1e-3, return_eigenvectors=False)

    probe_mib, probe_s, (size, res) = peak_above_baseline(probe)
    row = {
        "world": world,
        "rank": rank,
        "num_params": num_params,
        "slice": size,
        "basis_mib": 21 * size * 4 / 2**20,
        "train_step_mib": step_mib,
        "train_step_s": step_s,
        "lambda_max_mib": probe_mib,
        "lambda_max_s": probe_s,
        "lambda_max": float(res.eigenvalues[0]),
        "hvps": res.num_hvps,
        "converged": res.all_converged,
    }
    rows: list[Any] = [None] * world
    dist.all_gather_object(rows, row)
    if rank == 0:
        out.write_text(json.dumps(rows))
    dist.destroy_process_group()


def launch(world: int, quick: bool) -> list[dict[str, Any]]:
    out = Path(f"/tmp/fsdp_memory_w{world}.json")
    out.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={world}",
        __file__,
        "--worker",
        str(out),
        *(["--quick"] if quick else []),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, timeout=3600)
    rows: list[dict[str, Any]] = json.loads(out.read_text())
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        worker(args.quick, args.worker)
        return
    rows = [row for world in (1, 2) for row in launch(world, args.quick)]
    for r in rows:
        print(
            f"W={r['world']} rank {r['rank']}: slice {r['slice']:,} of {r['num_params']:,}; "
            f"train step {r['train_step_mib']:.0f} MiB; λ_max {r['lambda_max']:.4f} "
            f"({r['hvps']} HVPs, {r['lambda_max_s']:.0f} s) {r['lambda_max_mib']:.0f} MiB "
            f"(basis {r['basis_mib']:.0f} MiB)"
        )
    if not args.quick:
        record = {
            "date": time.strftime("%Y-%m-%d"),
            "device": "CPU, 1 thread per process, gloo",
            "command": "python benchmarks/fsdp_memory.py",
            "torch": torch.__version__,
            "rows": rows,
        }
        OUT.write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
