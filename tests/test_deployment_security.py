"""Who a live TLS + SuperNode-authentication SuperLink turns away, with Flower's real processes.

    .venv/bin/pytest tests/test_deployment_security.py

One LocalDeployment (one legitimate site) on loopback serves the whole module.
Each intruder differs from the legitimate site in one thing only: the CA it
trusts, its key, or TLS itself. The legitimate site being online and `flwr ls`
working with the federation's CA are the positive controls: the refusals
cannot pass because nothing works, and each would fail with security off
(the intruder would come online or list runs).
"""

import json
import time
from dataclasses import dataclass

import pytest

from fedclinic.config import load_config
from fedclinic.runtime.certs import write_certs
from fedclinic.runtime.local import LocalDeployment
from fedclinic.runtime.processes import Daemon, free_port
from fedclinic.runtime.runs import Connection

TINY = ["federation.sites=1", "data.site-size=60", "data.test-size=20"]
# Flower's exit code for "the SuperNode could not establish a connection to the SuperLink"
NO_CONNECTION = "Exit Code: 305"
# what `flwr` says for any transport failure, a certificate one included (it drops the cause)
UNAVAILABLE = "Connection to the SuperLink is unavailable"
# intruders normally give up within ~10 s of starting; this only bounds a broken run
DEADLINE = 60.0
FLWR_TIMEOUT = 60.0

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """A TLS SuperLink with SuperNode authentication and one registered, online site; always stopped."""
    with LocalDeployment(tmp_path_factory.mktemp("federation"), load_config(None, TINY)) as fed:
        yield fed


@pytest.fixture(scope="module")
def elsewhere(tmp_path_factory):
    """A second, foreign set: another CA and two more SuperNode keys."""
    return write_certs(tmp_path_factory.mktemp("elsewhere"), supernodes=2)


def nodes(fed: LocalDeployment) -> dict[str, dict]:
    """node-id -> `flwr supernode ls` entry, as the SuperLink knows them."""
    out = fed.connection.flwr("supernode", "ls", fed.connection.name, "--format", "json", timeout=FLWR_TIMEOUT)
    return {node["node-id"]: node for node in json.loads(out.stdout)["nodes"]}


@dataclass(frozen=True)
class Attempt:
    """How one intruding `flower-supernode` ended."""

    exit_code: int | None  # None: still trying at the deadline, then stopped
    seconds: float  # from start to exit, to within 0.2 s
    log: str


@dataclass(frozen=True)
class Intrusions:
    attempts: dict[str, Attempt]
    online: int  # SuperNodes online once every intruder had given up (or at the deadline)
    nodes: dict[str, dict]  # the SuperLink's nodes once all had ended
    registered_id: str  # the node the foreign-CA intruder's key was registered as


@pytest.fixture(scope="module")
def intrusions(federation, elsewhere, tmp_path_factory):
    """Four intruding SuperNodes, started together (each spends ~8 s importing) and watched until they end.

    - "foreign CA": trusts another CA, with a key that *is* registered, so only TLS can stop it;
    - "unregistered key": the federation's CA, a key never registered;
    - "no key": the federation's CA and no key, so it asks the SuperLink to register one it makes up;
    - "no TLS": --insecure, no key (Flower itself refuses a key without TLS, exit 303).
    Each is stopped by PID (with its process tree) on the way out, whatever happened.
    """
    fed = federation
    registered = fed.connection.flwr("supernode", "register", str(elsewhere["supernode-0.pub"]), fed.connection.name,
                                     "--format", "json", timeout=FLWR_TIMEOUT)
    registered_id = str(json.loads(registered.stdout)["node-id"])
    ca = str(fed.certs / "ca.crt")
    security = {
        "foreign CA": ["--root-certificates", str(elsewhere["ca.crt"]),
                       "--auth-supernode-private-key", str(elsewhere["supernode-0"])],
        "unregistered key": ["--root-certificates", ca, "--auth-supernode-private-key", str(elsewhere["supernode-1"])],
        "no key": ["--root-certificates", ca],
        # a dropped plaintext connection is retried for ever unless Flower is told to give up
        "no TLS": ["--insecure", "--max-retries", "3", "--max-wait-time", "20"],
    }
    logs = tmp_path_factory.mktemp("intruders")
    daemons: dict[str, Daemon] = {}
    try:
        started = time.monotonic()
        for name, args in security.items():
            # the deployment's own environment: its stop() also sweeps any process an intruder left behind
            daemons[name] = Daemon("flower-supernode", [*args, "--superlink", fed.connection.address,
                                                        "--host", "127.0.0.1", "--port", str(free_port())],
                                   env=fed.env, log=logs / f"{name.replace(' ', '-')}.log").start()
        ended: dict[str, tuple[int, float]] = {}
        while len(ended) < len(daemons) and time.monotonic() - started < DEADLINE:
            for name, daemon in daemons.items():
                if name not in ended and not daemon.running():
                    ended[name] = (daemon.process.returncode, time.monotonic() - started)
            time.sleep(0.2)
        # asked before any intruder is stopped: one let in would still be running, and online
        online = fed.online()
        attempts = {name: Attempt(*ended.get(name, (None, time.monotonic() - started)),
                                  log=daemon.log.read_text(errors="replace"))
                    for name, daemon in daemons.items()}
        yield Intrusions(attempts, online, nodes(fed), registered_id)
    finally:
        for daemon in daemons.values():
            daemon.stop()


@pytest.fixture(scope="module")
def strangers(federation, elsewhere, tmp_path_factory):
    """`flwr` connections to the same SuperLink address: one trusting the foreign CA, one insecure."""
    connections = {}
    for name, ca in [("foreign CA", elsewhere["ca.crt"]), ("insecure", None)]:
        connection = Connection(tmp_path_factory.mktemp("flwr-home"), federation.connection.address,
                                name="stranger", root_certificates=ca)
        connection.write()
        connections[name] = connection
    return connections


def test_registered_site_with_the_federation_ca_is_online_and_flwr_lists_runs(federation):
    # Execute
    listed = federation.connection.flwr("ls", federation.connection.name, "--format", "json", timeout=FLWR_TIMEOUT)
    # Assert
    assert federation.online() == 1
    assert federation.supernodes[0].running()
    assert json.loads(listed.stdout)["success"] is True, listed.stdout + listed.stderr


def test_supernode_trusting_another_ca_fails_tls_verification_and_exits(intrusions):
    # Execute (fixture): a registered key, but the SuperLink's certificate does not chain to the CA it trusts
    attempt = intrusions.attempts["foreign CA"]
    # Assert
    assert attempt.exit_code not in (None, 0), f"still running or exited 0 after {attempt.seconds:.0f} s"
    assert "CERTIFICATE_VERIFY_FAILED" in attempt.log, attempt.log
    assert "unable to get local issuer certificate" in attempt.log
    assert NO_CONNECTION in attempt.log
    assert intrusions.nodes[intrusions.registered_id]["status"] == "registered"  # never activated
    assert intrusions.nodes[intrusions.registered_id]["online-at"] == "N/A"
    assert intrusions.online == 1


def test_supernode_with_an_unregistered_key_is_refused_activation_and_exits(intrusions, federation):
    # Execute (fixture): the federation's CA, a key the SuperLink was never told about
    attempt = intrusions.attempts["unregistered key"]
    # Assert
    assert attempt.exit_code not in (None, 0), f"still running or exited 0 after {attempt.seconds:.0f} s"
    assert "[code: 2004] Failed to activate SuperNode." in attempt.log, attempt.log
    assert NO_CONNECTION in attempt.log
    superlink_log = federation.superlink.log.read_text(errors="replace")
    assert "No SuperNode found with the given public key" in superlink_log
    assert len(intrusions.nodes) == 2  # the site and the foreign-CA intruder's registration: no node was created
    assert intrusions.online == 1


def test_supernode_without_a_key_may_not_register_itself_and_exits(intrusions):
    # Execute (fixture): the federation's CA, no key. A SuperNode with a key only ever asks to be
    # activated, so this is the one intruder that --enable-supernode-auth (not the key check) stops
    attempt = intrusions.attempts["no key"]
    # Assert
    assert attempt.exit_code not in (None, 0), f"still running or exited 0 after {attempt.seconds:.0f} s"
    assert "[code: 2001] SuperNode authentication is enabled. All SuperNodes must be registered via the CLI." \
        in attempt.log, attempt.log
    assert NO_CONNECTION in attempt.log
    assert len(intrusions.nodes) == 2
    assert intrusions.online == 1


def test_plaintext_supernode_gets_no_answer_from_the_tls_superlink(intrusions):
    # Execute (fixture): --insecure, told to give up after 3 retries
    attempt = intrusions.attempts["no TLS"]
    # Assert
    assert attempt.exit_code not in (None, 0), f"still running or exited 0 after {attempt.seconds:.0f} s"
    # the TLS SuperLink drops the plaintext HTTP/2 connection: httpx words it either way, depending on timing
    assert any(dropped in attempt.log for dropped in ("Server disconnected without sending a response.",
                                                      "Connection reset by peer")), attempt.log
    assert "Giving up reconnection" in attempt.log
    assert NO_CONNECTION in attempt.log
    assert intrusions.online == 1


@pytest.mark.parametrize("stranger", ["foreign CA", "insecure"])
def test_flwr_without_the_federation_ca_can_neither_list_runs_nor_register_a_key(stranger, strangers, elsewhere):
    # Prepare
    connection = strangers[stranger]
    # Execute
    listed = connection.flwr("ls", connection.name, timeout=FLWR_TIMEOUT)
    registered = connection.flwr("supernode", "register", str(elsewhere["supernode-1.pub"]), connection.name,
                                 timeout=FLWR_TIMEOUT)
    # Assert
    assert listed.returncode != 0
    assert UNAVAILABLE in listed.stdout + listed.stderr, listed.stdout + listed.stderr
    assert registered.returncode != 0
    assert UNAVAILABLE in registered.stdout + registered.stderr, registered.stdout + registered.stderr
