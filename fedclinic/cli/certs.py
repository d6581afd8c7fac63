"""`fedclinic certs`: TLS certificates and SuperNode keys for Flower's Deployment Engine.

    fedclinic certs --out certs                                                   # localhost only, 1 SuperNode
    fedclinic certs --out certs --hosts localhost,127.0.0.1,superlink.hospital.org --supernodes 3 --days 365

Writes ca.crt, ca.key, superlink.crt, superlink.key and supernode-K, supernode-K.pub
(K = 0 .. N-1) and prints which Flower flag takes each file.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fedclinic.config import ConfigError
from fedclinic.runtime.certs import DEFAULT_HOSTS, superlink_hosts, write_certs


def certs_parser(sub) -> None:
    p = sub.add_parser(
        "certs",
        help="a CA, a SuperLink TLS certificate and SuperNode authentication keys for a deployment",
        description="Create a private CA, a SuperLink server certificate signed by it for the given host names "
        "and IP addresses, and SuperNode key pairs (OpenSSH, P-384) for `flwr supernode register` and "
        "`flower-supernode --auth-supernode-private-key`. Private keys are written with mode 600.",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the files (created if missing)")
    p.add_argument("--hosts", default=",".join(DEFAULT_HOSTS), metavar="H1,H2",
                   help="comma-separated host names and IP addresses the SuperLink is reached by "
                   f"(default {','.join(DEFAULT_HOSTS)})")
    p.add_argument("--supernodes", type=int, default=1, metavar="N", help="SuperNode key pairs to create (default 1)")
    p.add_argument("--days", type=int, default=365, help="validity of the certificates in days (default 365)")
    p.add_argument("--force", action="store_true", help="overwrite files that already exist")


def certs(args: argparse.Namespace) -> int:
    hosts = [host.strip() for host in args.hosts.split(",")]
    try:
        paths = write_certs(args.out, hosts, args.supernodes, days=args.days, force=args.force)
    except (ValueError, FileExistsError) as err:
        raise ConfigError(str(err)) from None
    print(format_summary(paths, superlink_hosts(hosts)))
    return 0


def format_summary(paths: dict[str, Path], hosts: list[str]) -> str:
    p = {name: str(path) for name, path in paths.items()}
    nodes = sorted((name for name in p if name.startswith("supernode-") and not name.endswith(".pub")),
                   key=lambda name: int(name.removeprefix("supernode-")))
    lines = [
        f"CA              {p['ca.crt']} (keep {p['ca.key']} offline: it signs certificates)",
        f"SuperLink       {p['superlink.crt']}, {p['superlink.key']} for {', '.join(hosts)}",
        (f"  flower-superlink --ssl-ca-certfile {p['ca.crt']} --ssl-certfile {p['superlink.crt']} "
         f"--ssl-keyfile {p['superlink.key']} --enable-supernode-auth"),
        f"flwr connection  root-certificates = \"{Path(p['ca.crt']).resolve()}\" in $FLWR_HOME/config.toml",
    ]
    for name in nodes:
        lines += [
            f"SuperNode       {p[name]}, {p[name + '.pub']}",
            f"  flwr supernode register {p[name + '.pub']} CONNECTION",
            (f"  flower-supernode --superlink HOST:PORT --root-certificates {p['ca.crt']} "
             f"--auth-supernode-private-key {p[name]}"),
        ]
    return "\n".join(lines)
