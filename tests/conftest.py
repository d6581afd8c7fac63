"""Shared fixtures, and the torch threads of pytest-xdist's workers."""

import os

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs a worker per core: one torch thread each, inherited by the Flower processes a test starts,
    # instead of every worker's processes spinning a thread per core on cores the other workers are using
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`make test`: `--dist loadscope`, a module per unit, in this order), the modules with the
    most end-to-end (`slow`) tests first, so that no long one starts last while the other workers sit idle."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    modules = {}
    for item in items:
        modules.setdefault(item.nodeid.split("::")[0], []).append(item)
    order = sorted(modules.values(), key=lambda tests: -sum(1 for t in tests if t.get_closest_marker("slow")))
    items[:] = [item for tests in order for item in tests]


@pytest.fixture
def flower_task():
    """Messages can only be built inside a Flower task; give the test process an identity."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    yield TaskIdentity
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved
