"""The `fedclinic` command.

    fedclinic simulate                                   # 5 synthetic sites, DP on (eps = 8 per site)
    fedclinic simulate --sites 8 --rounds 6 --set privacy.target-epsilon=3
    fedclinic simulate --data my.npz --set data.partitioner=iid
    fedclinic simulate --baselines                       # and the pooled and silo baselines beside it
    fedclinic baselines runs/NAME                        # pooled and silo baselines of a run, no Flower
    fedclinic sweep --epsilons 1,3,8 --noise-multipliers 0.5,1.0   # accuracy and IoU against epsilon
    fedclinic budget --plan --set privacy.target-epsilon=3          # sigma and epsilon per site and round
    fedclinic ledger show runs/NAME/sites/site-0                    # what a site has spent
    fedclinic audit runs/NAME                                       # membership inference on the global model
    fedclinic audit runs/NAME --canaries 1000 --strict              # and epsilon-hat, a lower bound on epsilon
    fedclinic evaluate --model runs/NAME/global_model.pt --data scans.npz --attack pgd --eps 2/255 8/255
    fedclinic certs --out certs --hosts localhost,127.0.0.1 --supernodes 3   # TLS + SuperNode auth files
    fedclinic demo                                       # SuperLink + 3 SuperNodes on loopback, TLS + auth

run.py holds the commands that run federations, baselines.py `fedclinic baselines`, privacy.py the privacy
commands, evaluate.py `fedclinic evaluate`, certs.py `fedclinic certs`, deploy.py `fedclinic demo`, options.py what
simulate and sweep share.
"""


from __future__ import annotations

import argparse
import gc
import signal
import sys
import threading

from fedclinic.cli.baselines import baselines, baselines_parser
from fedclinic.cli.certs import certs, certs_parser
from fedclinic.cli.deploy import demo, demo_parser
from fedclinic.cli.evaluate import evaluate, evaluate_parser
from fedclinic.cli.privacy import audit_parser, budget_parser, ledger_parser, audit, budget, ledger
from fedclinic.cli.run import simulate_parser, sweep_parser, simulate, sweep
from fedclinic.config import ConfigError
from fedclinic.data import DataError


def _terminated(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # `kill PID` stops what the command started, as Ctrl-C does


# the errors a command reports as one sentence, not a traceback, beside ConfigError and DataError: module -> class
ONE_SENTENCE = {"fedclinic.analysis.audit": "AuditError", "fedclinic.privacy.ledger": "LedgerError",
                "fedclinic.runtime.processes": "FlowerError", "fedclinic.server.checkpoint": "CheckpointError"}


def said_in_one_sentence() -> tuple[type[Exception], ...]:
    """The errors a command reports as one sentence. An error can only have been raised by a module already
    imported, and importing the others would cost seconds (the ledger's module alone imports Opacus, 1.6 s)."""
    loaded = [getattr(sys.modules[module], name) for module, name in ONE_SENTENCE.items() if module in sys.modules]
    return (ConfigError, DataError, *loaded)


def main(argv: list[str] | None = None) -> int:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminated)
    parser = argparse.ArgumentParser(prog="fedclinic", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    simulate_parser(sub)
    baselines_parser(sub)
    budget_parser(sub)
    sweep_parser(sub)
    ledger_parser(sub)
    audit_parser(sub)
    evaluate_parser(sub)
    certs_parser(sub)
    demo_parser(sub)
    args = parser.parse_args(argv)
    try:
        commands = {"simulate": simulate, "baselines": baselines, "budget": budget, "sweep": sweep, "ledger": ledger,
                    "audit": audit, "evaluate": evaluate, "certs": certs, "demo": demo}
        return commands[args.command](args)
    except Exception as err:
        if not isinstance(err, said_in_one_sentence()):
            raise
        print(f"fedclinic: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedclinic: interrupted; every process it started has been stopped", file=sys.stderr)
        return 130


def entry() -> None:
    """The `fedclinic` command: `main`, then exit. Objects alive at exit are frozen first (gc.freeze), so that
    Python's last garbage collection does not walk every object torch and Opacus made: it took 1.1 s of every
    command's exit (measured with torch, Opacus and matplotlib imported; 0.2 s frozen). Nothing is left to
    collect then: the process ends."""
    code = main()
    gc.freeze()
    sys.exit(code)
