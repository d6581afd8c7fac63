"""`fedclinic baselines`: the pooled and silo baselines of a run, in this process, without Flower.

    fedclinic baselines runs/NAME                  # next to a finished federation, with its config.toml
    fedclinic baselines --sites 8 --set privacy.target-epsilon=3 --name alone   # no federation
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fedclinic.api import baselines_into_run, check_config, existing_results
from fedclinic.cli.options import add_run_options, progress_printer, refuse_changes, resolve
from fedclinic.config import Config, ConfigError, load_config, replace

# what `fedclinic baselines RUN_DIR` may set differently from the run: where it trains and how loudly
RUN_DIR_SETTABLE = ("training.device", "output.quiet")


def baselines_parser(sub) -> None:
    p = sub.add_parser(
        "baselines",
        help="pooled and single-site (silo) baselines on the federation's test set, with its model and seeds",
        description="Train, in this process and without Flower, the pooled baselines (every site's training data "
        "in one place: non-private, and one DP-SGD run at the run's record-level (epsilon, delta)) and the silo "
        "baselines (each site alone on its own data at its own budget), with the federation's model, initial "
        "weights, local training and seeds, for as many passes over the data as a site makes in the federation; "
        "all are scored on the server's test set, silo also on each site's own validation split. "
        "With RUN_DIR (a run directory of fedclinic simulate): its config.toml is used, baselines.json is written "
        "into it, and its results.json, when there is one, gets a `baselines` section and report.md/html are "
        "rendered again (only --quiet and --set training.device may be given). Without RUN_DIR the configuration "
        "comes from the options, as in simulate, and a new run directory gets config.toml, baselines.json and "
        "a report of the baselines.",
    )
    p.add_argument("run_dir", nargs="?", metavar="RUN_DIR",
                   help="a run directory of fedclinic simulate to add the baselines to")
    add_run_options(p, name_help="name of the baselines' run directory (output.name, default a timestamp)")


def baselines(args: argparse.Namespace) -> int:
    from fedclinic.report import run_directory
    from fedclinic.report.text import format_comparison

    if args.run_dir:
        run_dir = Path(args.run_dir).resolve()
        config = run_dir_config(args, run_dir)
        check_config(config)
        existing_results(run_dir)  # refuses an unreadable results.json before anything trains
    else:
        config = resolve(args)
        check_config(config)
        run_dir = Path(config.output.dir) / config.output.name
        if (run_dir / "results.json").exists():
            raise ConfigError(f"{run_dir} already holds a federated run; give it as RUN_DIR to add baselines to it")
        run_directory(config)
        (run_dir / "config.toml").write_text(config.to_toml())
    say = progress_printer(config)
    say(f"fedclinic baselines: pooled and silo, {config.federation.sites} sites -> {run_dir}")
    results = baselines_into_run(run_dir, config, say, on_step=say.step)
    print(format_comparison(results))
    written = "results.json, " if "rounds" in results else "config.toml, "
    print(f"run directory: {run_dir}  (baselines.json, {written}report.md, report.html)")
    return 0


def run_dir_config(args: argparse.Namespace, run_dir: Path) -> Config:
    """The configuration of an existing run directory: its own config.toml, with only RUN_DIR_SETTABLE changed."""
    refuse_changes(args, who="fedclinic baselines RUN_DIR", may_change=RUN_DIR_SETTABLE,
                   why="the baselines train with the run's own settings")
    if not run_dir.is_dir():
        raise ConfigError(f"run directory {run_dir} does not exist")
    if not (run_dir / "config.toml").exists():
        raise ConfigError(f"{run_dir} holds no config.toml, so it is not a fedclinic run directory")
    config = load_config(run_dir / "config.toml", [*args.set, *(["output.quiet=true"] if args.quiet else [])])
    return replace(config, output={"dir": str(run_dir.parent), "name": run_dir.name})
