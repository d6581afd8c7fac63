"""Shared fixtures."""

import pytest


@pytest.fixture
def flower_task():
    """Messages can only be built inside a Flower task; give the test process an identity."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    yield TaskIdentity
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


@pytest.fixture(scope="session")
def full_run(tmp_path_factory):
    """One real `fedclinic simulate --baselines --strict` with every step on: the rounds, the fine-tuning, the
    attacks, compression, explanations, the membership audit with 300 canaries, then the pooled and silo baselines.
    Shared by the tests of what it leaves: (the command's CompletedProcess, its run directory). Three sites, two
    DP rounds; label-alpha=100 (near iid) and three local epochs, so two rounds learn; cheap attack and
    explanation settings."""
    import subprocess
    import sys

    from fedclinic.runtime.processes import of_flwr_home, stop_processes

    out = tmp_path_factory.mktemp("full-run")
    settings = ["data.test-size=300", "data.label-alpha=100", "training.local-epochs=3", "robustness.max-images=120",
                "robustness.steps=3", "explain.max-images=40", "robustness.round-check-eps=0.0078",
                "privacy.audit-canaries=300"]
    try:
        proc = subprocess.run([sys.executable, "-m", "fedclinic.cli", "simulate", "--sites", "3", "--rounds", "2",
                               "--out", str(out), "--name", "e2e", "--baselines", "--strict", *[a for s in settings for a in ("--set", s)]],
                              capture_output=True, text=True, timeout=900)
        yield proc, out / "e2e"
    finally:  # whatever the tests found, nothing of the run is left running
        stop_processes(of_flwr_home(out / "e2e" / ".flwr"))
