"""A simulation that joins a running Ray cluster (``federation.ray_address``) instead of starting its own Ray.

The "cluster" is a Ray head started here as a subprocess on loopback (``ray start --head``
with its own temp dir, so nothing else on the machine is touched); a 2-round tiny simulation
runs through it; afterwards every process whose command line names that temp dir (GCS,
raylet, monitors, the workers that ran the ClientApps) is stopped by pid. The multi-machine
recipe is docs/performance.md "Beyond one machine".
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from fopro_kd.config import config_from_dict
from simulations.simulate import simulate
from simulations.tiny_federation import tiny_federation_values

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _pids_naming(text: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                cmdline = handle.read().decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            pids.append(int(entry))
    return pids


def _stop(pids_of: str) -> list[int]:
    """SIGTERM, then SIGKILL after 10 s, every process naming ``pids_of``; returns the pids still alive."""
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        for pid in _pids_naming(pids_of):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while _pids_naming(pids_of) and time.monotonic() < deadline:
            time.sleep(0.2)
    return _pids_naming(pids_of)


@pytest.fixture()
def ray_head():
    """``ray start --head`` on loopback with a private temp dir; yields its address; stops its processes by pid."""
    if shutil.which("ray") is None:
        pytest.skip("the ray command line is not installed")
    # a short path: Ray's unix socket names must stay under the 107-character limit
    temp_dir = Path(tempfile.gettempdir()) / f"rayt-{uuid.uuid4().hex[:8]}"
    port = _free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    started = subprocess.run(
        ["ray", "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
         "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp_dir}"],
        capture_output=True, text=True, timeout=180, env=env,
    )
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        assert _pids_naming(str(temp_dir)), "ray start returned but no process of the head is running"
        yield f"127.0.0.1:{port}", str(temp_dir)
    finally:
        left = _stop(str(temp_dir))
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"Ray processes still alive after SIGKILL: {left}"


def test_simulation_runs_through_a_running_ray_cluster(ray_head, tmp_path: Path) -> None:
    address, temp_dir = ray_head
    values = tiny_federation_values(federation={"ray_address": address, "partition": {"kind": "iid",
                                                                                      "min_per_site": 1}})
    metrics = simulate(config_from_dict(values), tmp_path / "run")
    assert metrics["rounds"] == 2 and metrics["best_round"] in (1, 2)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["failed_replies"] == {}
    # the ClientApps ran in the head's workers (their command lines name its temp dir), not in a private Ray
    workers = [pid for pid in _pids_naming(temp_dir) if "default_worker" in open(f"/proc/{pid}/cmdline").read()]
    assert workers, "no worker process of the external cluster was started"
    sessions = list(Path(temp_dir).glob("session_*/logs"))
    assert sessions and any(p.name.startswith("worker-") for p in sessions[0].iterdir())
