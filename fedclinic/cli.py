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
        value = getattr(args, flag, None)  # budget --plan has no --out / --name
        if value is not None:
            overrides.append(f"{key}={json.dumps(value)}")
    if getattr(args, "quiet", False):
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
    if not config.privacy.local:
        return
    from fedclinic.privacy.accounting import reachable, sample_rate, steps_per_epoch

    t, p = config.training, config.privacy
    # the smallest site samples at the highest rate: if it can meet the target, every site can
    q = sample_rate(num_examples=smallest_site, batch_size=t.batch_size)
    steps = config.federation.rounds * t.local_epochs * steps_per_epoch(num_examples=smallest_site, batch_size=t.batch_size)
    if not reachable(target_epsilon=p.target_epsilon, delta=p.delta, sample_rate=q, steps=steps, accountant=p.accountant):
        raise ConfigError(
            f"no noise level reaches epsilon={p.target_epsilon} at delta={p.delta} for the smallest site "
            f"({smallest_site} images, sample rate {q:.4g}, {steps} steps); raise privacy.target-epsilon"
        )


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
               if config.privacy.local else "privacy OFF (non-private baseline)")
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


def _budget_parser(sub) -> None:
    p = sub.add_parser(
        "budget",
        help="privacy budget calculator: epsilon, the noise for a target epsilon, or a per-site plan",
        description="epsilon of DP-SGD (--noise-multiplier), the noise multiplier for a target (--target-epsilon), "
        "or with --plan a per-site table for a simulate configuration (same options as simulate).",
    )
    p.add_argument("--sample-rate", type=float, metavar="Q", help="Poisson sampling rate q = batch size / examples")
    p.add_argument("--noise-multiplier", type=float, metavar="S", help="sigma: print the epsilon it gives")
    p.add_argument("--target-epsilon", type=float, metavar="E", help="print the sigma that meets this epsilon")
    p.add_argument("--steps", type=int, metavar="T", help="optimizer steps over the whole training")
    p.add_argument("--delta", type=float, metavar="D", default=1e-5, help="delta (default 1e-5)")
    p.add_argument("--accountant", choices=["rdp", "prv"], default="rdp")
    p.add_argument("--plan", action="store_true", help="a table per site for the configuration given by the options below")
    p.add_argument("--site-sizes", metavar="N,N,...", help="training images of each site (instead of the configured data)")
    p.add_argument("--config", metavar="FILE")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[])
    p.add_argument("--sites", type=int)
    p.add_argument("--rounds", type=int)
    p.add_argument("--data", metavar="FILE.npz")
    p.add_argument("--json", action="store_true", help="one JSON object instead of text")


def budget(args: argparse.Namespace) -> int:
    from fedclinic.privacy.accounting import calibrate_noise, epsilon, plan_sites

    if args.plan:
        return _budget_plan(args, plan_sites)
    if args.sample_rate is None or args.steps is None:
        raise ConfigError("budget needs --sample-rate and --steps (or --plan)")
    if (args.noise_multiplier is None) == (args.target_epsilon is None):
        raise ConfigError("budget needs exactly one of --noise-multiplier (to get epsilon) or --target-epsilon (to get sigma)")
    q, steps, delta = args.sample_rate, args.steps, args.delta
    for ok, message in ((0 < q <= 1, f"--sample-rate must be in (0, 1], got {q}"),
                        (steps >= 1, f"--steps must be at least 1, got {steps}"),
                        (0 < delta < 1, f"--delta must be in (0, 1), got {delta}")):
        if not ok:
            raise ConfigError(message)
    out = {"sample_rate": q, "steps": steps, "delta": delta, "accountant": args.accountant}
    if args.noise_multiplier is not None:
        if args.noise_multiplier <= 0:
            raise ConfigError(f"--noise-multiplier must be > 0, got {args.noise_multiplier}")
        out["noise_multiplier"] = args.noise_multiplier
        out["epsilon"] = epsilon([(args.noise_multiplier, q, steps)], delta=delta, accountant=args.accountant)
    else:
        if args.target_epsilon <= 0:
            raise ConfigError(f"--target-epsilon must be > 0, got {args.target_epsilon}")
        try:
            sigma = calibrate_noise(target_epsilon=args.target_epsilon, delta=delta, sample_rate=q, steps=steps,
                                    accountant=args.accountant)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        out["noise_multiplier"] = sigma
        out["epsilon"] = epsilon([(sigma, q, steps)], delta=delta, accountant=args.accountant)
    if args.json:
        print(json.dumps(out))
    else:
        print(f"epsilon = {out['epsilon']:.4f} at delta = {delta:g} ({args.accountant.upper()}), "
              f"sigma = {out['noise_multiplier']:.4f}, q = {q:g}, {steps} steps")
    return 0


def _budget_plan(args: argparse.Namespace, plan_sites) -> int:
    from fedclinic.data import site_sizes

    config = resolve(args)
    if args.site_sizes:
        try:
            sizes = [int(n) for n in args.site_sizes.split(",")]
        except ValueError:
            raise ConfigError(f"--site-sizes expects whole numbers separated by commas, got {args.site_sizes!r}") from None
    else:
        sizes = site_sizes(config.data, config.federation.sites)
    check_sites(config, sizes)
    t, p = config.training, config.privacy
    try:
        rows = plan_sites(sizes, batch_size=t.batch_size, local_epochs=t.local_epochs,
                          rounds=config.federation.rounds, target_epsilon=p.target_epsilon, delta=p.delta,
                          accountant=p.accountant)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if args.json:
        print(json.dumps({"target_epsilon": p.target_epsilon, "delta": p.delta, "accountant": p.accountant,
                          "sites": rows}))
        return 0
    print(f"target epsilon {p.target_epsilon:g} at delta {p.delta:g} per site over {config.federation.rounds} rounds "
          f"({p.accountant.upper()}); batch {t.batch_size}, {t.local_epochs} local epoch(s)")
    head = "  ".join(f"eps@r{r}" for r in range(1, config.federation.rounds + 1))
    print(f"{'site':>4}  {'images':>6}  {'q':>7}  {'steps/r':>7}  {'sigma':>6}  {head}")
    for row in rows:
        eps = "  ".join(f"{e:>6.2f}" for e in row["epsilon_by_round"])
        print(f"{row['site']:>4}  {row['n']:>6}  {row['sample_rate']:>7.4f}  {row['steps_per_round']:>7}  "
              f"{row['noise_multiplier']:>6.3f}  {eps}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedclinic", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _simulate_parser(sub)
    _budget_parser(sub)
    args = parser.parse_args(argv)
    from fedclinic.simulation import SimulationError

    try:
        return {"simulate": simulate, "budget": budget}[args.command](args)
    except (ConfigError, DataError, SimulationError) as err:
        print(f"fedclinic: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedclinic: interrupted; every process it started has been stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
