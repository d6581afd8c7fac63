"""The `fedclinic` command.

    fedclinic simulate                                   # 5 synthetic sites, DP on (eps = 8 per site)
    fedclinic simulate --sites 8 --rounds 6 --set privacy.target-epsilon=3
    fedclinic simulate --data my.npz --set data.partitioner=iid
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace as dc_replace
from pathlib import Path

from fedclinic.config import Config, ConfigError, DEFAULTS, check_sites, load_config
from fedclinic.data import DataError


def _simulate_parser(sub) -> None:
    p = sub.add_parser(
        "simulate",
        help="run a federation of simulated hospital sites through Flower's simulation runtime",
        description="Run hospital sites that train one multi-task model with DP-SGD, aggregated by the server. "
        "Configuration keys (for --set and --config files): " + ", ".join(sorted(DEFAULTS)),
    )
    p.add_argument("--config", metavar="FILE", help="TOML file of settings (same keys as --set)")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], help="override one setting, e.g. privacy.target-epsilon=3")
    p.add_argument("--sites", type=int, help="number of hospital sites (federation.sites)")
    p.add_argument("--rounds", type=int, help="number of federated rounds (federation.rounds)")
    p.add_argument("--data", metavar="FILE.npz", help="MedMNIST-style .npz file instead of synthetic sites (data.path)")
    p.add_argument("--out", metavar="DIR", help="folder for run directories (output.dir, default runs)")
    p.add_argument("--name", help="name of this run's directory (output.name, default a timestamp)")
    p.add_argument("--quiet", action="store_true", help="no progress lines, only the final table")


def resolve(args: argparse.Namespace) -> Config:
    """Defaults -> --config -> --set -> the shortcut flags; paths made absolute."""
    overrides = list(args.set)
    for flag, key in (("sites", "federation.sites"), ("rounds", "federation.rounds"), ("data", "data.path"),
                      ("out", "output.dir"), ("name", "output.name")):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={json.dumps(value)}")
    if args.quiet:
        overrides.append("output.quiet=true")
    config = load_config(args.config, overrides)
    name = config.output.name or time.strftime("%Y%m%d-%H%M%S")
    data_path = str(Path(config.data.path).resolve()) if config.data.path else ""
    return dc_replace(
        config,
        data=dc_replace(config.data, path=data_path),
        output=dc_replace(config.output, dir=str(Path(config.output.dir).resolve()), name=name),
    )


def check_budget(config: Config, smallest_site: int) -> None:
    """Refuse a privacy target no noise level can meet, before any site starts."""
    if not config.privacy.enabled:
        return
    from fedclinic.privacy.accounting import plan_site

    try:  # the smallest site samples at the highest rate: if it can plan, every site can
        plan_site(num_examples=smallest_site, batch_size=config.training.batch_size,
                  local_epochs=config.training.local_epochs, rounds=config.federation.rounds,
                  target_epsilon=config.privacy.target_epsilon, delta=config.privacy.delta,
                  accountant=config.privacy.accountant)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def simulate(args: argparse.Namespace) -> int:
    from fedclinic import simulation
    from fedclinic.data import site_data, site_sizes
    from fedclinic.plots import plot_label_distribution, plot_site_samples
    from fedclinic.report import format_progress, format_table, run_directory

    config = resolve(args)
    fed = config.federation
    sizes = site_sizes(config.data, fed.sites)
    check_sites(config, sizes)
    check_budget(config, min(sizes))
    run_dir = run_directory(config)
    say = (lambda *a: None) if config.output.quiet else (lambda *a: print(*a, flush=True))
    privacy = (f"DP-SGD eps={config.privacy.target_epsilon:g}, delta={config.privacy.delta:g} per site"
               if config.privacy.enabled else "privacy OFF (non-private baseline)")
    say(f"fedclinic: {fed.sites} sites, {fed.rounds} rounds, {privacy} -> {run_dir}")

    # what the sites hold: simulation only, the server never sees site data in deployment
    sites = [site_data(config.data, k, fed.sites)[0] for k in range(fed.sites)]
    plot_label_distribution(sites, run_dir / "label_distribution.png")
    plot_site_samples(sites, run_dir / "site_samples.png")
    say("  starting Flower's simulation runtime ...")
    started = time.time()
    simulation.run(config, run_dir, on_progress=lambda row: say(format_progress(row, fed.rounds)))
    results = json.loads((run_dir / "results.json").read_text())
    results["timings"]["wall_seconds"] = time.time() - started
    (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    print(format_table(results))
    print(f"run directory: {run_dir}  (report.md, results.json, metrics.csv, global_model.pt, plots)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedclinic", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _simulate_parser(sub)
    args = parser.parse_args(argv)
    from fedclinic.simulation import SimulationError

    try:
        return {"simulate": simulate}[args.command](args)
    except (ConfigError, DataError, SimulationError) as err:
        print(f"fedclinic: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedclinic: interrupted; every process it started has been stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
