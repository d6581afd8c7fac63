"""`fedclinic demo`: a Deployment Engine federation on this machine, secured as across machines.

    fedclinic demo                       # SuperLink + 3 SuperNodes on loopback, TLS + SuperNode auth, 3 rounds
    fedclinic demo --sites 4 --rounds 2 --set privacy.target-epsilon=3
"""

from __future__ import annotations

import argparse
import sys
import time

from fedclinic.api import audit_into_run, check_config
from fedclinic.cli.options import add_run_options, describe_privacy, progress_printer, resolve, show_row
from fedclinic.cli.run import print_results


def demo_parser(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="a real Flower deployment on this machine: SuperLink + one SuperNode per site, TLS and node auth on",
        description="Start a SuperLink and one SuperNode per site on loopback with TLS and SuperNode authentication, "
        "each site with its own data file and ledger, run fedclinic on them with `flwr run`, print the same table "
        "as simulate and stop every process it started. The commands it runs are written to "
        "<run>/deployment/commands.txt; they are the 'Run across machines' sequence of docs/deployment.md.",
    )
    add_run_options(p, name_help="name of the run directory (output.name, default demo-<time>)")
    p.add_argument("--insecure", action="store_true",
                   help="no TLS and no SuperNode authentication (never across machines)")


def demo(args: argparse.Namespace) -> int:
    from fedclinic.runtime.local import LocalDeployment
    from fedclinic.report import run_directory, with_wall_time

    config = resolve(args, default_name=time.strftime("demo-%Y%m%d-%H%M%S"),
                     defaults=["federation.sites=3", "federation.rounds=3"])
    check_config(config)
    run_dir = run_directory(config)
    say = progress_printer(config)
    fed = config.federation
    if args.insecure:
        print("fedclinic: WARNING: --insecure: no TLS and no SuperNode authentication; model updates travel in "
              "the clear and any process can join as a site. Never use this across machines.", file=sys.stderr)
    security = "insecure" if args.insecure else "TLS + SuperNode authentication"
    say(f"fedclinic demo: SuperLink + {fed.sites} SuperNodes on loopback ({security}), {fed.rounds} rounds, "
        f"{describe_privacy(config)} -> {run_dir}")
    started = time.time()
    with LocalDeployment(run_dir, config, insecure=args.insecure) as deployment:
        say(f"  {fed.sites} SuperNodes online after {time.time() - started:.0f} s; each ClientApp message starts "
            "a fresh process, so rounds are slower than in simulation")
        deployment.run(on_progress=lambda row: show_row(say, row, fed.rounds))
    results = with_wall_time(run_dir, time.time() - started)
    if config.privacy.audit:
        say("  membership-inference audit of the final model (possible here: every site's file is on this machine) ...")
        results = audit_into_run(run_dir, on_step=say.step)
    print_results(results, run_dir)
    print(f"deployment: {run_dir / 'deployment'}  (commands.txt, certs, each site's data file, ledger and log)")
    return 0
