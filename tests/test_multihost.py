"""The SuperLink and the SuperNodes on separate network addresses, with TLS and SuperNode authentication.

    .venv/bin/pytest tests/test_multihost.py -s     # -s prints which network mode ran

Where the machine permits network namespaces (`unshare -r -n`, also unprivileged),
the SuperLink runs in a namespace of its own and each site in another, joined by
veth pairs (mode `netns`); otherwise the SuperLink listens on 127.0.0.2 alone
(mode `loopback-addresses`). The mode is in the test id, in the printed output
and in the junit property `network_mode`. FEDCLINIC_MULTIHOST_MODE=loopback-addresses
forces the fallback. The federation itself is tests/multihost_federation.py.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fedclinic.runtime.processes import stop_processes, with_env

HELPER = Path(__file__).with_name("multihost_federation.py")
MARKER = "FEDCLINIC_MULTIHOST_RUN"  # in the environment of every process of one run, namespace holders included
SITES = 2


# what the netns mode needs, tried in a throwaway namespace: a user + network namespace, a veth pair in it,
# a nested network namespace, and nsenter to join one
PROBE = "ip link add hub0 type veth peer name site0 && unshare -n true && nsenter --version >/dev/null"


def network_mode() -> tuple[str, str]:
    """('netns', why) where this machine lets us make network namespaces, else ('loopback-addresses', why not)."""
    forced = os.environ.get("FEDCLINIC_MULTIHOST_MODE")
    if forced:
        return forced, f"FEDCLINIC_MULTIHOST_MODE={forced}"
    try:
        probe = subprocess.run(["unshare", "-r", "-n", "sh", "-c", PROBE], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as err:
        return "loopback-addresses", f"network namespaces not available: {err}"
    if probe.returncode != 0:
        return "loopback-addresses", f"network namespaces not permitted: {probe.stderr.strip()[-200:]}"
    return "netns", "unshare -r -n permitted"


MODE, WHY = network_mode()


@pytest.mark.slow
@pytest.mark.parametrize("mode", [MODE])
def test_sites_on_their_own_addresses_train_through_a_tls_superlink(mode, tmp_path, record_property):
    # Prepare
    record_property("network_mode", mode)
    print(f"\nmultihost federation: network mode {mode} ({WHY})")
    command = [sys.executable, str(HELPER), "--mode", mode, "--sites", str(SITES), "--rounds", "1", str(tmp_path)]
    if mode == "netns":  # this process's namespace is the hub; --kill-child: the helper dies with the wrapper
        command = ["unshare", "-r", "-n", "--kill-child", *command]
    marker = f"{MARKER}={tmp_path}"
    env = {**os.environ, MARKER: str(tmp_path)}
    log_path = tmp_path / "federation.log"

    # Execute
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        proc.wait(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        left = with_env(marker)  # what the run itself failed to stop...
        stop_processes(left)  # ...stopped here all the same (the daemons run in sessions of their own)
    output = log_path.read_text()
    assert (tmp_path / "summary.json").exists(), f"the federation did not end within 240 s:\n{output[-3000:]}"
    summary = json.loads((tmp_path / "summary.json").read_text())

    # Assert
    assert proc.returncode == 0 and "error" not in summary, output[-3000:]
    print(f"multihost federation: {json.dumps(summary)}")
    record_property("addresses_seen", ",".join(summary["superlink_log_fleet_clients"]))
    assert summary["mode"] == mode and summary["online"] == SITES
    assert summary["status"] == "finished:completed"
    sites = summary["sites"]
    if mode == "netns":
        # each site reached the SuperLink from its own address and namespace, as the SuperLink saw it
        # (access log, kernel socket table) and as the site saw it (its own socket table)
        expected = [f"10.9.{k + 1}.2" for k in range(SITES)]
        assert [s["connected_from"] for s in sites] == [[a] for a in expected]
        assert set(expected) <= set(summary["superlink_peers"])
        assert summary["superlink_log_fleet_clients"] == expected
        namespaces = {summary["superlink"]["netns"], *(s["netns"] for s in sites)}
        assert len(namespaces) == SITES + 1 and os.readlink("/proc/self/ns/net") not in namespaces
        # no veth ever reached this namespace; the site namespaces die with their last process (checked below)
        assert not [name for name in os.listdir("/sys/class/net") if name.startswith(("hub", "site"))]
    else:
        assert summary["superlink"]["listens"].startswith("127.0.0.2:")
        assert all(s["dials"] == summary["superlink"]["listens"] and s["connected_from"] for s in sites)
        assert summary["superlink_log_fleet_clients"]
    run = json.loads((Path(summary["run_dir"]) / "results.json").read_text())
    assert [r["round"] for r in run["rounds"]] == [0, 1]
    assert [(s["site"], s["rounds_trained"]) for s in run["sites"]] == [(k, 1) for k in range(SITES)]
    for k in range(SITES):  # each site's privacy ledger is in its own state directory, nowhere else
        ledger = json.loads((Path(summary["state_dirs"][k]) / "ledger.json").read_text())
        assert ledger["site"] == k and [(e["round"], e["kind"]) for e in ledger["entries"]] == [(1, "round"),
                                                                                                 (2, "fine-tuning")]
    assert not (Path(summary["run_dir"]) / "sites").exists()
    assert left == set(), "processes of the run were left running"
