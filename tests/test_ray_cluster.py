"""A simulation on an existing Ray cluster: a local `ray start --head` stands in for one."""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from fedclinic.runtime.processes import command_of, free_port, kill_processes, with_env

TINY = ["data.site-size=150", "data.test-size=60", "training.batch-size=32", "robustness.enabled=false",
        "compression.enabled=false", "explain.enabled=false", "privacy.audit=false",
        "federation.client-cpus=2"]  # one actor on the head's 2 CPUs


@pytest.fixture
def ray_head():
    """`ray start --head` in a short temp dir (Ray's socket paths are length-limited), stopped by PID.

    Never `ray stop`: it stops every Ray process on the machine, other runs' too.
    """
    temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    marker = f"FEDCLINIC_TEST_RAY_HEAD={temp}"
    env = {**os.environ, "FEDCLINIC_TEST_RAY_HEAD": str(temp), "RAY_USAGE_STATS_ENABLED": "0"}
    port = free_port()
    ray = str(Path(sys.executable).parent / "ray")
    args = [ray, "start", "--head", "--port", str(port), "--num-cpus", "2", "--include-dashboard=false",
            "--temp-dir", str(temp), "--ray-client-server-port", str(free_port()),
            "--dashboard-agent-listen-port", str(free_port()), "--disable-usage-stats"]
    try:
        started = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
        assert started.returncode == 0, started.stdout + started.stderr
        yield {"address": f"127.0.0.1:{port}", "temp": temp, "pids": with_env(marker)}
    finally:
        kill_processes(with_env(marker))  # with every process under it: nothing of it is kept
        shutil.rmtree(temp, ignore_errors=True)


def driver_logs(temp: Path) -> list[Path]:
    """Logs of every driver that connected to the cluster (Flower's simulation is one)."""
    return sorted(temp.glob("session_*/logs/python-core-driver-*"))


@pytest.mark.slow
def test_a_simulation_joins_an_existing_ray_cluster_and_leaves_it_running(ray_head, tmp_path):
    before = driver_logs(ray_head["temp"])
    env = {**os.environ, "RAY_ADDRESS": ray_head["address"]}
    proc = subprocess.run([sys.executable, "-m", "fedclinic.cli", "simulate", "--sites", "2", "--rounds", "1",
                           "--out", str(tmp_path), "--name", "onray", *[a for s in TINY for a in ("--set", s)]],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "onray" / "results.json").exists()
    # the run's Ray driver connected to this cluster...
    assert len(driver_logs(ray_head["temp"])) > len(before)
    # ...and stopping the run left the cluster up
    alive = {pid for pid in ray_head["pids"] if Path(f"/proc/{pid}").exists()}
    assert any("gcs_server" in command_of(pid) for pid in alive)
    status = subprocess.run([str(Path(sys.executable).parent / "ray"), "status", "--address", ray_head["address"]],
                            capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stdout + status.stderr
