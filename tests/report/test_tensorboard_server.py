"""A real ``tensorboard`` server on the demo's logs: scalars, images and the custom-scalars layout
read back through its HTTP data API."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lightning_landscape.cli.demo import run_demo
from lightning_landscape.report.layout import CATEGORIES
from tests._processes import free_port

STARTUP_TIMEOUT = 90.0


def _get(base: str, path: str, **query: Any) -> bytes:
    url = f"{base}{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    with urllib.request.urlopen(url, timeout=20) as response:
        data: bytes = response.read()
        return data


def _json(base: str, path: str, **query: Any) -> Any:
    return json.loads(_get(base, path, **query))


@pytest.fixture(scope="module")
def demo_logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tb")
    run_demo(
        max_epochs=1, max_steps=12, every_n_steps=3, top_k=2, log_dir=str(root), progress=False
    )
    return root


@pytest.fixture(scope="module")
def server(demo_logs: Path) -> Iterator[str]:
    exe = shutil.which(
        "tensorboard",
        path=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
    )
    if exe is None:
        pytest.skip("the tensorboard executable is not installed next to this Python")
    port = free_port()
    proc = subprocess.Popen(
        [
            exe,
            "--logdir",
            str(demo_logs),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--load_fast=false",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_TIMEOUT
    try:
        while True:
            if proc.poll() is not None:
                out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
                pytest.skip(
                    f"tensorboard exited with code {proc.returncode} at start-up: {out[-500:]}"
                )
            try:
                runs = _json(base, "/data/runs")
                if runs:  # the log directory has been scanned
                    break
            except (urllib.error.URLError, ConnectionError, json.JSONDecodeError):
                pass
            if time.monotonic() > deadline:
                pytest.skip(f"tensorboard did not answer on {base} within {STARTUP_TIMEOUT:.0f} s")
            time.sleep(0.5)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_scalars_through_the_http_api(server: str) -> None:
    runs = _json(server, "/data/runs")
    assert runs == ["demo/version_0"]
    tags = _json(server, "/data/plugin/scalars/tags")["demo/version_0"]
    for tag in ("landscape/lambda_max", "landscape/stability_threshold", "landscape/delta2_D"):
        assert tag in tags, sorted(tags)
    points = _json(
        server, "/data/plugin/scalars/scalars", run="demo/version_0", tag="landscape/lambda_max"
    )
    steps = [p[1] for p in points]
    assert steps == [0, 3, 6, 9, 12]
    assert all(p[2] > 0 for p in points)


def test_images_through_the_http_api(server: str) -> None:
    tags = _json(server, "/data/plugin/images/tags")["demo/version_0"]
    assert {"landscape/alpha_fit", "landscape/delta2_sweep"} <= set(tags), sorted(tags)
    entries = _json(
        server, "/data/plugin/images/images", run="demo/version_0", tag="landscape/delta2_sweep"
    )
    assert entries, "no image entries"
    query = entries[-1]["query"]
    png = _get(server, f"/data/plugin/images/individualImage?{query}")
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000


def test_custom_scalars_layout(server: str) -> None:
    layout = _json(server, "/data/plugin/custom_scalars/layout")
    titles = [c["title"] for c in layout["category"]]
    assert titles == list(CATEGORIES)  # the demo measures everything
    sharp = layout["category"][titles.index("landscape: sharpness")]["chart"][0]
    assert sharp["multiline"]["tag"] == [
        r"landscape/lambda_max$",
        r"landscape/stability_threshold$",
    ]
    spectrum = layout["category"][titles.index("landscape: spectrum")]["chart"]
    (band,) = [c["margin"]["series"] for c in spectrum if "margin" in c]
    assert band == [
        {
            "value": "landscape/negative_mass",
            "lower": "landscape/negative_mass_lower",
            "upper": "landscape/negative_mass_upper",
        }
    ]
