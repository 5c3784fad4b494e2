"""Helpers for tests that start processes: a clean worker environment, ports, bounded waits."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Set by an enclosing launcher (torchrun, SLURM) or by Lightning in this process: none of it may
# reach a worker, which gets its own rank and world size.
_INHERITED = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "NODE_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
)


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1 (for servers that must listen on one).

    It can be taken again before the caller binds it; prefer a rendezvous that needs no port
    (a ``file://`` init method) where there is a choice.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def worker_env(**extra: str) -> dict[str, str]:
    """This process's environment for a distributed worker: no inherited rank or rendezvous,
    one thread, the repository importable, gloo's pairs on the loopback interface."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in _INHERITED and not k.startswith(("TORCHELASTIC_", "SLURM_", "PL_"))
    }
    env.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        MASTER_ADDR="127.0.0.1",
        PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
    )
    if Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"
    env.update(extra)
    return env


def descendants(root: int) -> list[int]:
    """Pids of every live descendant of ``root`` (Linux ``/proc``; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # "pid (comm) state ppid ...": comm may contain spaces, so split after its ')'.
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and, by pid, every process it started (also those in other sessions)."""
    for victim in [pid, *descendants(pid)]:
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_ranks(
    args: Sequence[str], world_size: int, timeout: float, env: dict[str, str]
) -> list[str]:
    """Start ``args`` once per rank (``RANK``/``LOCAL_RANK``/``WORLD_SIZE`` set), wait for all.

    The outputs (stdout and stderr merged) are read concurrently, so a chatty rank cannot block
    on a full pipe while another waits for it in a collective.

    Returns:
        Each rank's output, after every rank exited with status 0.

    Raises:
        pytest.fail.Exception: if any rank is still running after ``timeout`` seconds (all are
            killed) or exits with another status; the message holds every rank's output.
    """
    procs = [
        subprocess.Popen(
            list(args),
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world_size)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world_size)
    ]
    outputs = [""] * world_size

    def read(rank: int) -> None:
        stream = procs[rank].stdout
        assert stream is not None
        outputs[rank] = stream.read()

    readers = [threading.Thread(target=read, args=(r,), daemon=True) for r in range(world_size)]
    for reader in readers:
        reader.start()
    deadline = time.monotonic() + timeout
    hung = False
    for proc in procs:
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.0))
        except subprocess.TimeoutExpired:
            hung = True
            break
    if hung:
        for proc in procs:
            kill_tree(proc.pid)
    for proc in procs:
        proc.wait()
    for reader in readers:
        reader.join(timeout=10)
    report = "\n".join(
        f"--- rank {r} (exit {p.returncode}) ---\n{outputs[r][-3000:]}" for r, p in enumerate(procs)
    )
    if hung:
        pytest.fail(f"a rank was still running after {timeout:.0f} s; killed.\n{report}")
    if any(p.returncode != 0 for p in procs):
        pytest.fail(f"a rank failed.\n{report}")
    return outputs


@dataclass
class Launch:
    """What a two-rank torchrun launch left: its output and each rank's recorded checks."""

    scenario: str
    returncode: int
    output: str
    seconds: float
    outdir: Path
    ranks: dict[int, dict[str, Any]]

    def get(self, rank: int, key: str) -> Any:
        """The result of one check on one rank; fails with the launch's output if it is missing."""
        data = self.ranks.get(rank, {})
        assert key in data, f"rank {rank} did not record {key!r}.\n{self.tail()}"
        value = data[key]
        if isinstance(value, dict) and "crashed" in value:
            pytest.fail(f"check {key!r} crashed on rank {rank}:\n{value['crashed']}")
        return value

    def both(self, key: str) -> tuple[Any, Any]:
        return self.get(0, key), self.get(1, key)

    def tail(self, chars: int = 6000) -> str:
        return f"--- {self.scenario} launch output (tail) ---\n{self.output[-chars:]}"


def torchrun_launch(
    module_args: Sequence[str],
    scenario: str,
    outdir: Path,
    records: Sequence[Path],
    timeout: float,
) -> Launch:
    """``torchrun --standalone --nproc_per_node=2 <module_args>``, bounded by ``timeout`` seconds.

    A launch still running at the timeout is killed with every process it started, and the test
    fails with its output. ``records`` are the ranks' JSON files (rank order), read afterwards.
    """
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # torchrun's store binds a port itself: no port picked here to race for
        "--nproc_per_node=2",
        "--monitor-interval=0.1",
        *module_args,
    ]
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=worker_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except BaseException as err:  # a hang, or pytest interrupted: leave nothing running
        kill_tree(proc.pid)
        output, _ = proc.communicate(timeout=30)
        if not isinstance(err, subprocess.TimeoutExpired):
            raise
        pytest.fail(
            f"the {scenario!r} launch hung: killed after {timeout:.0f} s.\n{output[-6000:]}"
        )
    seconds = time.perf_counter() - t0
    ranks = {r: json.loads(p.read_text()) for r, p in enumerate(records) if p.exists()}
    return Launch(scenario, proc.returncode, output, seconds, outdir, ranks)
