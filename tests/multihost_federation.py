"""One fedclinic federation with the SuperLink and each SuperNode on an address of its own.

    unshare -r -n --kill-child python tests/multihost_federation.py --mode netns WORKDIR
    python tests/multihost_federation.py --mode loopback-addresses WORKDIR

Run by tests/test_multihost.py. In `netns` mode this process runs in a fresh
network namespace (the hub, made by `unshare -r -n`) and gives each site a
namespace of its own, joined to the hub by a veth pair: site K is 10.9.K+1.2
and reaches the SuperLink at 10.9.K+1.1, as a hospital reaches the
coordinator's address across a network. Where namespaces are not permitted,
`loopback-addresses` puts the SuperLink on 127.0.0.2 instead.

Either way the federation is fedclinic's own LocalDeployment, the sequence
`fedclinic demo` runs and the README's "Run across machines" gives: `fedclinic
certs` with the SuperLink's addresses as IP SANs, TLS, `--enable-supernode-auth`
and `flwr supernode register`, each site with its own data file and state
directory; only where each process runs and which address it dials differ. The address each SuperNode connected from is
read from the kernel's socket tables (/proc/PID/net/tcp) at both ends, which
is the proof the traffic crossed separate addresses. WORKDIR/summary.json
says what ran and what was seen; every process started is stopped by PID on
exit, which also removes the namespaces and their veths.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

os.environ["OMP_NUM_THREADS"] = "1"  # inherited by every Flower process: two sites share two cores
os.environ["MKL_NUM_THREADS"] = "1"

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from fedclinic.config import load_config  # noqa: E402
from fedclinic.runtime.local import LocalDeployment  # noqa: E402
from fedclinic.runtime.processes import Daemon, free_port  # noqa: E402

MODES = ("netns", "loopback-addresses")
PORT = 9092  # netns: the hub namespace is private to this run, so a fixed port cannot collide
# tiny and fast: the point is the network, not the model
SETTINGS = ["data.site-size=150", "data.test-size=60", "training.batch-size=32", "robustness.enabled=false",
            "compression.enabled=false", "explain.enabled=false", "privacy.audit=false"]


def ip(*args: str, netns_pid: int | None = None) -> None:
    """`ip ARGS` in this namespace, or in the network namespace of `netns_pid`."""
    enter = [] if netns_pid is None else ["nsenter", f"--net=/proc/{netns_pid}/ns/net"]
    subprocess.run([*enter, "ip", *args], check=True, capture_output=True, text=True, timeout=30)


def netns_id(pid: int | str = "self") -> str:
    """'net:[4026532...]': equal for two processes exactly when they share a network namespace."""
    return os.readlink(f"/proc/{pid}/ns/net")


class SiteNetworks:
    """A network namespace per site, each joined to this (the hub) namespace by a veth pair.

    A namespace lives as long as a process holds it: here `sleep infinity`,
    started by `unshare -n`. Killing the holders (and whatever was started in
    the namespaces) removes the namespaces with their veths; nothing global is
    left behind, unlike `ip netns add`.
    """

    def __init__(self) -> None:
        self.holders: list[subprocess.Popen] = []
        ip("link", "set", "lo", "up")  # the SuperLink's own processes reach it on loopback

    def add(self, site: int) -> int:
        """Site `site`'s namespace: 10.9.K+1.2, default route via the hub's 10.9.K+1.1; returns its holder's PID."""
        n = site + 1
        holder = subprocess.Popen(["unshare", "-n", "sleep", "infinity"])
        self.holders.append(holder)
        deadline = time.monotonic() + 10
        while netns_id(holder.pid) == netns_id():  # unshare has not made the namespace yet
            if holder.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"`unshare -n` for site {site} did not make a network namespace")
            time.sleep(0.05)
        ip("link", "add", f"hub{n}", "type", "veth", "peer", "name", f"site{n}")
        ip("link", "set", f"site{n}", "netns", str(holder.pid))
        ip("addr", "add", f"10.9.{n}.1/24", "dev", f"hub{n}")
        ip("link", "set", f"hub{n}", "up")
        for args in (["link", "set", "lo", "up"], ["addr", "add", f"10.9.{n}.2/24", "dev", f"site{n}"],
                     ["link", "set", f"site{n}", "up"], ["route", "add", "default", "via", f"10.9.{n}.1"]):
            ip(*args, netns_pid=holder.pid)
        return holder.pid

    def close(self) -> None:
        for holder in self.holders:
            holder.kill()
            holder.wait(timeout=10)


def established(pid: int) -> list[tuple[str, int, str, int]]:
    """(local address, local port, remote address, remote port) of each established TCP connection in the
    network namespace of `pid`, from the kernel's tables (IPv4-mapped IPv6 addresses read as IPv4)."""
    found = []
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] != "01":  # TCP_ESTABLISHED
                continue
            (local, local_port), (remote, remote_port) = (_address(f) for f in fields[1:3])
            found.append((local, local_port, remote, remote_port))
    return found


def _address(field: str) -> tuple[str, int]:
    """'0100007F:2384' -> ('127.0.0.1', 9092): the kernel writes each 32-bit word of the address little-endian."""
    hex_address, hex_port = field.split(":")
    raw = bytes.fromhex(hex_address)
    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    address = ipaddress.ip_address(raw)
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return str(address), int(hex_port, 16)


def addresses(mode: str, sites: int) -> tuple[str, int, list[str], list[str]]:
    """(SuperLink --host, --port, the address each site dials, the certificate's hosts)."""
    if mode == "loopback-addresses":  # the SuperLink alone on 127.0.0.2
        port = free_port("127.0.0.2")
        return "127.0.0.2", port, [f"127.0.0.2:{port}"] * sites, ["127.0.0.2"]
    # each site dials the hub's end of its own veth. With --host 0.0.0.0 the SuperLink's own SuperExec (which
    # starts the ServerApp) dials 127.0.0.1:PORT and checks the certificate too: without 127.0.0.1 among its
    # names the run stays pending for ever
    hub_ends = [f"10.9.{k + 1}.1" for k in range(sites)]
    return "0.0.0.0", PORT, [f"{a}:{PORT}" for a in hub_ends], ["localhost", "127.0.0.1", *hub_ends]


def run(workdir: Path, mode: str, sites: int, rounds: int, summary: dict, *, run_timeout: float = 150) -> None:
    """Bring the federation up (fedclinic's LocalDeployment, the demo's own sequence), run fedclinic on it,
    and note in `summary` what was seen; stops all it started."""
    config = load_config(None, [*SETTINGS, f"federation.sites={sites}", f"federation.rounds={rounds}",
                                f"output.dir={workdir}", "output.name=multihost"])
    host, port, dials, hosts = addresses(mode, sites)
    networks = SiteNetworks() if mode == "netns" else None
    try:
        # the veths first: the SuperLink's addresses (and its health check) are the hub's ends of them
        holders = [networks.add(k) for k in range(sites)] if networks is not None else []
        enter = (lambda k: ["nsenter", f"--net=/proc/{holders[k]}/ns/net"]) if holders else None
        deployment = LocalDeployment(workdir / "multihost", config, host=host, port=port, cert_hosts=tuple(hosts),
                                     dial=lambda k: dials[k], site_prefix=enter, startup_timeout=90)
        with deployment:
            summary["superlink"] = {"listens": f"{host}:{port}", "netns": netns_id(deployment.superlink.pid)}
            summary["online"] = deployment.online()
            seen = look(deployment.superlink, deployment.supernodes, port, dials)
            deadline = time.monotonic() + run_timeout

            def watch() -> None:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the run did not finish within {run_timeout:.0f} s")

            try:
                summary["run_id"] = deployment.run(
                    on_progress=lambda row: print("progress:", json.dumps(row), flush=True), while_running=watch)
            finally:
                summary["status"] = deployment.connection.status(summary["run_id"]) if "run_id" in summary else None
            summary["run_dir"] = str(deployment.run_dir)
            summary["state_dirs"] = [str(deployment.dir / "sites" / f"site-{k}" / "state") for k in range(sites)]
            summary.update(merge(seen, look(deployment.superlink, deployment.supernodes, port, dials)))
            summary["superlink_log_fleet_clients"] = fleet_clients(deployment.superlink.log)
    finally:
        if networks is not None:
            networks.close()


def fleet_clients(log: Path) -> list[str]:
    """The client addresses of the Fleet API requests in the SuperLink's access log (what the SuperLink saw)."""
    found = re.findall(r'\[uvicorn\.access\] (\S+):\d+ - "\w+ /v1/fleet/', log.read_text(errors="replace"))
    return sorted(set(found))


def look(superlink: Daemon, supernodes: dict[int, Daemon], port: int, dials: list[str]) -> dict:
    """Who is connected to the SuperLink's port, seen from the SuperLink's namespace and from each site's."""
    peers = {remote for _, local_port, remote, _ in established(superlink.pid) if local_port == port}
    sites = []
    for k, daemon in supernodes.items():
        host, _ = dials[k].rsplit(":", 1)
        sent_from = {local for local, _, remote, remote_port in established(daemon.pid)
                     if (remote, remote_port) == (host, port)}
        sites.append({"site": k, "dials": dials[k], "netns": netns_id(daemon.pid), "connected_from": sorted(sent_from)})
    return {"superlink_peers": sorted(peers), "sites": sites}


def merge(first: dict, second: dict) -> dict:
    sites = [{**a, "connected_from": sorted(set(a["connected_from"]) | set(b["connected_from"]))}
             for a, b in zip(first["sites"], second["sites"])]
    return {"superlink_peers": sorted(set(first["superlink_peers"]) | set(second["superlink_peers"])), "sites": sites}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--mode", choices=MODES, required=True)
    parser.add_argument("--sites", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    workdir = args.workdir.resolve()
    started = time.monotonic()
    summary: dict = {"mode": args.mode}
    try:
        run(workdir, args.mode, args.sites, args.rounds, summary)
        code = 0
    except Exception as err:  # the summary still says how far it got
        summary["error"], code = f"{type(err).__name__}: {err}", 1
        print(f"multihost federation failed: {summary['error']}", file=sys.stderr)
    summary["seconds"] = round(time.monotonic() - started, 1)
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    return code


if __name__ == "__main__":
    sys.exit(main())
