"""A whole Deployment Engine federation on this machine: what `fedclinic demo` runs.

    with LocalDeployment(run_dir, config) as fed:   # certificates, site files, SuperLink, SuperNodes
        fed.run(on_progress=print)                   # flwr run, followed to the end

Everything is Flower's own commands, the same ones docs/deployment.md's "Run
across machines" gives for separate machines: `flower-superlink` with TLS
and SuperNode authentication, `flwr supernode register` for each site's
public key, one `flower-supernode` per site with its own data file and state
directory, and `flwr run`. Each command is written to
deployment/commands.txt as it is run. Every process started is stopped on
exit, also on error or Ctrl-C.
"""

from __future__ import annotations

import shlex
import ssl
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

from fedclinic.config import Config
from fedclinic.runtime.certs import DEFAULT_HOSTS, write_certs
from fedclinic.runtime.processes import Daemon, FlowerError, free_port, last_error, stop_all
from fedclinic.runtime.runs import Connection, follow, submit


class DeploymentError(FlowerError):
    """The local deployment did not come up or its run failed; the message says why."""


def write_site_files(config: Config, sites: int, out: Path) -> tuple[list[Path], Path]:
    """Each site's own .npz file (train + val) and the server's test file, from the configured data."""
    from fedclinic.data import save_file, server_test_set, site_data

    files = []
    for k in range(sites):
        train, val = site_data(config.data, k, sites)
        files.append(save_file(out / "sites" / f"site-{k}" / "data.npz", train=train, val=val))
    return files, save_file(out / "server" / "test.npz", test=server_test_set(config.data))


def refusal(log: Path) -> str:
    """Why Flower's SuperNode gave up, from its log: the line after 'Failed to initialize the connection'."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines()] if log.exists() else []
    marks = [i for i, line in enumerate(lines) if "Failed to initialize the connection" in line]
    if marks and marks[-1] + 1 < len(lines):
        return f": {lines[marks[-1] + 1]}"
    return last_error(log)


class LocalDeployment:
    """A SuperLink and one SuperNode per site, with TLS and SuperNode authentication (or insecure).

    By default all on loopback. `host`/`port` are where the SuperLink listens,
    `cert_hosts` the names its certificate carries, `dial(site)` the address
    site K reaches it at, and `site_prefix(site)` a command that runs site K's
    SuperNode elsewhere (tests/multihost_federation.py puts each site in a
    network namespace of its own with `nsenter`).
    """

    def __init__(self, run_dir: Path, config: Config, *, insecure: bool = False, startup_timeout: float = 60.0,
                 host: str = "127.0.0.1", port: int | None = None, cert_hosts: tuple[str, ...] = DEFAULT_HOSTS,
                 dial: Callable[[int], str] | None = None, site_prefix: Callable[[int], list[str]] | None = None) -> None:
        self.run_dir = run_dir
        self.dir = run_dir / "deployment"
        self.config = config
        self.sites = config.federation.sites
        self.insecure = insecure
        self.startup_timeout = startup_timeout
        self.host, self.cert_hosts = host, cert_hosts
        self.port = port or free_port(host if host != "0.0.0.0" else "127.0.0.1")
        self.certs = self.dir / "certs"
        local = "127.0.0.1" if host == "0.0.0.0" else host  # this machine's way in, for flwr and the health check
        self.connection = Connection(
            self.dir / "flwr-home", f"{local}:{self.port}", name="fedclinic-demo",
            root_certificates=None if insecure else self.certs / "ca.crt",
        )
        self.dial = dial or (lambda site: self.connection.address)
        self.site_prefix = site_prefix or (lambda site: [])
        self.env = self.connection.env
        self.superlink: Daemon | None = None
        self.supernodes: dict[int, Daemon] = {}
        self.site_files: list[Path] = []
        self.test_file: Path | None = None

    # -- the commands, as docs/deployment.md gives them --------------------------------------------

    def superlink_args(self) -> list[str]:
        security = (["--insecure"] if self.insecure else
                    ["--ssl-ca-certfile", str(self.certs / "ca.crt"), "--ssl-certfile", str(self.certs / "superlink.crt"),
                     "--ssl-keyfile", str(self.certs / "superlink.key"), "--enable-supernode-auth"])
        return [*security, "--host", self.host, "--port", str(self.port),
                "--database", str(self.dir / "superlink" / "state.db"), "--disable-runtime-dependency-installation"]

    def supernode_args(self, site: int) -> list[str]:
        site_dir = self.dir / "sites" / f"site-{site}"
        security = (["--insecure"] if self.insecure else
                    ["--root-certificates", str(self.certs / "ca.crt"),
                     "--auth-supernode-private-key", str(self.certs / f"supernode-{site}")])
        node_config = f'site-id={site} data-path="{site_dir / "data.npz"}" state-dir="{site_dir / "state"}"'
        return [*security, "--superlink", self.dial(site), "--node-config", node_config,
                "--host", "127.0.0.1", "--port", str(free_port())]

    def _log_command(self, name: str, args: list[str]) -> None:
        with open(self.dir / "commands.txt", "a") as f:
            f.write(shlex.join([name, *args]) + "\n")

    # -- bringing it up ----------------------------------------------------------------------------

    def __enter__(self) -> "LocalDeployment":
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "commands.txt").write_text("")
        try:
            self.prepare()
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def prepare(self) -> None:
        """Certificates and keys (unless insecure) and each site's own data file."""
        if not self.insecure:
            write_certs(self.certs, hosts=self.cert_hosts, supernodes=self.sites, days=2, force=True)
            self._log_command("fedclinic", ["certs", "--out", str(self.certs), "--hosts", ",".join(self.cert_hosts),
                                            "--supernodes", str(self.sites)])
        self.site_files, self.test_file = write_site_files(self.config, self.sites, self.dir)

    def _start(self) -> None:
        self.connection.write()
        self.superlink = Daemon("flower-superlink", self.superlink_args(), env=self.env,
                                log=self.dir / "superlink" / "superlink.log")
        self._log_command("flower-superlink", self.superlink.args)
        self.superlink.start()
        context = None if self.insecure else ssl.create_default_context(cafile=str(self.certs / "ca.crt"))
        scheme = "http" if self.insecure else "https"
        try:
            self.superlink.wait_healthy(f"{scheme}://{self.connection.address}/health", self.startup_timeout,
                                        context=context)
        except FlowerError as err:
            raise DeploymentError(str(err)) from None
        for site in range(self.sites):
            if not self.insecure:
                self.register(self.certs / f"supernode-{site}.pub")
            self.start_site(site)
        self.wait_online(self.sites)

    def register(self, public_key: Path) -> None:
        """`flwr supernode register KEY.pub CONNECTION`: the SuperLink will accept the holder of its private key."""
        args = ["supernode", "register", str(public_key), self.connection.name]
        self._log_command("flwr", args)
        out = self.connection.flwr(*args)
        if out.returncode != 0:
            said = (out.stdout + out.stderr).strip().splitlines() or ["no reason given"]
            raise DeploymentError(f"flwr supernode register {public_key.name} failed: {said[-1]}")

    def start_site(self, site: int) -> Daemon:
        daemon = Daemon("flower-supernode", self.supernode_args(site), env=self.env,
                        log=self.dir / "sites" / f"site-{site}" / "supernode.log", prefix=self.site_prefix(site))
        self._log_command("flower-supernode", daemon.args)
        self.supernodes[site] = daemon.start()
        return daemon

    def kill_site(self, site: int) -> None:
        """SIGKILL a site's SuperNode and whatever ClientApp it was running: a crash, not a shutdown."""
        self.supernodes.pop(site).kill()

    def online(self) -> int:
        """How many SuperNodes the SuperLink lists as online (DeploymentError if it cannot be asked)."""
        try:
            nodes = self.connection.ask("supernode", "ls", self.connection.name, expect="nodes",
                                        failing=f"cannot list the SuperNodes at {self.connection.address}")["nodes"]
        except FlowerError as err:
            raise DeploymentError(str(err)) from None
        return sum(1 for node in nodes if str(node.get("status", "")).lower() == "online")

    def wait_online(self, count: int) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while self.online() < count:
            for site, daemon in self.supernodes.items():
                if not daemon.running():
                    raise DeploymentError(f"the SuperNode of site {site} exited at start{refusal(daemon.log)}; "
                                          f"see {daemon.log}")
            if time.monotonic() > deadline:
                raise DeploymentError(f"only {self.online()} of {count} SuperNodes came online within "
                                      f"{self.startup_timeout:.0f} s; see {self.dir / 'sites'}")
            time.sleep(0.5)

    # -- running fedclinic on it -------------------------------------------------------------------

    def run_config(self) -> Path:
        """The run's config for the ServerApp: the server reads only its own test file."""
        config = replace(self.config, data=replace(self.config.data, test_path=str(self.test_file.resolve())))
        path = self.dir / "run-config.toml"
        path.write_text(config.to_toml())
        return path

    def run(self, on_progress: Callable[[dict], None] | None = None,
            *, while_running: Callable[[], None] | None = None) -> int:
        """Submit fedclinic with `flwr run` and follow it to the end; returns the run id."""
        run_config = self.run_config()
        self._log_command("flwr", ["run", ".", self.connection.name, "--run-config", str(run_config), "--stream"])

        def watch() -> None:
            if not self.superlink.running():
                raise DeploymentError("the SuperLink exited")
            if while_running is not None:
                while_running()

        try:
            run_id = submit(self.connection, run_config)
            follow(self.connection, run_id, self.run_dir, on_progress, while_running=watch)
        except FlowerError as err:
            if not self.superlink.running():  # also when `flwr log` noticed first and the verdict is 'unknown'
                raise DeploymentError(f"the SuperLink exited during the run; see {self.superlink.log}") from None
            raise DeploymentError(str(err)) from None
        return run_id

    def stop(self) -> None:
        """SuperNodes first, then the SuperLink, then anything else that carries this deployment's FLWR_HOME."""
        superlink = [self.superlink] if self.superlink is not None else []
        stop_all([*self.supernodes.values(), *superlink], self.connection.flwr_home)
