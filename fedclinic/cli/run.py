"""The commands that run federations: `fedclinic simulate` and `fedclinic sweep` (each optionally with baselines)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

from fedclinic import api
from fedclinic.api import baselines_into_run, check_config, check_data
from fedclinic.cli.options import add_run_options, describe_privacy, progress_printer, resolve, resolve_resume, show_row
from fedclinic.cli.privacy import format_audit, privacy_bug_status
from fedclinic.cli.progress import Progress
from fedclinic.config import DEFAULTS, Config, ConfigError


def simulate_parser(sub) -> None:
    p = sub.add_parser(
        "simulate",
        help="run a federation of simulated hospital sites through Flower's simulation runtime",
        description="Run hospital sites that train one multi-task model with DP-SGD, aggregated by the server. "
        "Configuration keys (for --set and --config files): " + ", ".join(sorted(DEFAULTS)),
    )
    add_run_options(p, name_help="name of this run's directory (output.name, default a timestamp)")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue a run whose server stopped, from its checkpoint.pt, with its own config.toml "
                        "(--set still applies); it ends with the number of rounds that run was given")
    p.add_argument("--baselines", action="store_true",
                   help="after the federation, train the pooled and silo baselines in this process (no Flower) into "
                        "the same run directory, as `fedclinic baselines RUN_DIR` does")
    p.add_argument("--strict", action="store_true",
                   help="exit with status 3 when the canary audit (privacy.audit-canaries) flags a likely privacy "
                        "bug: an epsilon lower bound above the accountant's epsilon")


def run_once(config: Config, say: Progress, *, baselines: bool = False) -> dict:
    """fedclinic.run of `config`, its lines and bars shown by `say`; returns its results.json."""
    rounds = config.federation.rounds
    return api.run(config, baselines=baselines, say=say, on_progress=lambda row: show_row(say, row, rounds),
                   on_step=say.step).to_dict()


def run_all(configs: list[Config], say: Progress, link, on_result: Callable[[int, dict], None]) -> None:
    """fedclinic.run_many of a sweep's `configs` on `link`, its lines and bars shown by `say`; `on_result(i,
    results.json)` as each is complete."""
    rounds = configs[0].federation.rounds
    api.run_many(configs, say=say, on_progress=lambda row: show_row(say, row, rounds), on_step=say.step, link=link,
                 on_result=lambda i, results: on_result(i, results.to_dict()))


def personalization_line(results: dict) -> str:
    """Global -> personalised accuracy on the sites' own validation splits (beside silo's, when the baselines ran)."""
    from fedclinic.report.text import format_metric

    p, acc = results["personalization"], lambda scores: format_metric(scores["accuracy"], ".2f")
    line = (f"personalised on own validation splits: mean accuracy {acc(p['global']['mean'])} -> "
            f"{acc(p['personalized']['mean'])}, worst site {acc(p['global']['worst'])} -> "
            f"{acc(p['personalized']['worst'])}")
    if p["compared"] < len(p["sites"]):
        line += f" ({p['compared']} of {len(p['sites'])} sites fine-tuned)"
    silo = results["baselines"]["silo"]["val"] if results.get("baselines") else None
    return line + (f"; silo alone {acc(silo['mean'])}, worst {acc(silo['worst'])}" if silo else "")


def post_training_summary(results: dict) -> list[str]:
    """One line each for the personalisation, the attack, the compressed model and the explanations, when they ran."""
    lines = [personalization_line(results)] if results.get("personalization") else []
    if results.get("robustness"):
        r = results["robustness"]
        lines.append(f"under attack ({r['attack'].upper()} {r['norm']}): accuracy {r['clean_accuracy']:.3f} clean, "
                     f"{r['robust_accuracy']:.3f} at eps {r['headline_eps'] * 255:.0f}/255")
    if results.get("compression"):
        c = results["compression"]
        from fedclinic.report.text import format_ratio

        lines.append(f"int8 model: {format_ratio(c['size_ratio'], 'smaller', 'larger', 'x')}, "
                     f"{format_ratio(c['speedup_b64'], 'faster', 'slower', 'x')} at batch 64, "
                     f"accuracy {c['accuracy_change'] * 100:+.1f} points ({c['files']['int8_path']})")
    if results.get("explanations"):
        ig = results["explanations"]["integrated_gradients"]
        if ig["images"]:
            lines.append(f"explanations: {ig['mass_in_box']:.2f} of Integrated Gradients' mass lies in the lesion box "
                         f"(chance {ig['chance_mass']:.2f}); explanations.png")
    return lines


def simulate(args: argparse.Namespace) -> int:
    config = resolve_resume(args) if args.resume else resolve(args)
    check_data(config)  # the budget is checked by fedclinic.run, while Flower's SuperLink starts
    run_dir = Path(config.output.dir, config.output.name)  # made by fedclinic.run
    say = progress_printer(config)
    fed = config.federation
    what = "resuming" if config.output.resume else "fedclinic:"
    say(f"{what} {fed.sites} sites, {fed.rounds} rounds, {describe_privacy(config)} -> {run_dir}")
    results = run_once(config, say, baselines=args.baselines)
    print_results(results, run_dir)
    return privacy_bug_status(results.get("audit") or {}, strict=args.strict)


def print_results(results: dict, run_dir: Path) -> None:
    """The round table and one line per finding: what simulate and demo print at the end."""
    from fedclinic.report import format_table
    from fedclinic.report.text import format_comparison

    print(format_table(results))
    if "baselines" in results:
        print(format_comparison(results))
    for site in results["sites"]:
        if site["stopped_in_round"]:
            print(f"site {site['site']} stopped before round {site['stopped_in_round']}: its budget of epsilon "
                  f"{site['budget']:g} would have been exceeded (spent {site['epsilon']:.3f})")
    if results["stop_reason"]:
        print(results["stop_reason"])
    if "audit" in results:
        print(format_audit(results["audit"]))
    for line in post_training_summary(results):
        print(line)
    print(f"run directory: {run_dir}  ({', '.join(run_files(run_dir))})")


# what a run directory holds, in the order the end-of-run line names it
RUN_FILES = ("report.html", "report.md", "results.json", "metrics.csv", "global_model.pt", "global_model.int8.onnx")


def run_files(run_dir: Path) -> list[str]:
    """The files of RUN_FILES that the run left in `run_dir`, then "plots" if it left any .png."""
    found = [name for name in RUN_FILES if (run_dir / name).is_file()]
    return found + (["plots"] if any(run_dir.glob("*.png")) else [])


def sweep_parser(sub) -> None:
    p = sub.add_parser(
        "sweep",
        help="the privacy/utility trade-off: the non-private baseline and one simulation per privacy setting",
        description="Run the non-private baseline, then one simulation per target epsilon, per fixed noise "
        "multiplier, each crossed with every clipping norm; same data and seeds for every point. Writes "
        "<out>/<name>/sweep.csv, accuracy_vs_epsilon.png, iou_vs_epsilon.png and one run directory per point; "
        "with --attacks or --defences, a poisoning grid (each privacy point crossed with every attack and "
        "defence) that also writes poisoning.md and poisoning.png. "
        "Finished points are reused, so rerunning an interrupted sweep resumes it. Other options as in simulate.",
    )
    p.add_argument("--epsilons", metavar="E,E,...", help="target epsilons, e.g. 1,3,8 (sigma calibrated to each)")
    p.add_argument("--noise-multipliers", metavar="S,S,...",
                   help="fixed noise multipliers, e.g. 0.5,1.0 (a site stops when privacy.target-epsilon would be exceeded)")
    p.add_argument("--clipping-norms", metavar="C,C,...", help="per-example clipping norms to cross every private point with")
    p.add_argument("--attacks", metavar="A,A,...",
                   help="a poisoning grid: cross every privacy point with these attacks: none (nobody attacks), "
                        "label-flip, sign-flip, scale, noise, nan, backdoor; adds poisoning.md and poisoning.png")
    p.add_argument("--defences", metavar="D,D,...",
                   help="a poisoning grid's defences: federation.strategy values (fedavg, fedmedian, fedtrimmedavg, "
                        "krum, multikrum, bulyan, ...) or clip-C (FedAvg, every update clipped to L2 norm C)")
    p.add_argument("--attackers", metavar="K,K,...", default="1",
                   help="the attacking sites of a poisoning grid, unless federation.attackers is set (default 1)")
    p.add_argument("--baselines", action="store_true",
                   help="also the pooled and silo baselines of every point, in this process: at the non-private "
                        "point non-private, at each private point with DP-SGD at that point's epsilon")
    add_run_options(p, name_help="name of the sweep's directory (output.name, default sweep-<hash of these options>, "
                                  "so the same command finds the same sweep)")


def sweep(args: argparse.Namespace) -> int:
    from fedclinic.runtime.simulation import LocalSuperLink
    from fedclinic.sweep import (build_points, default_name, format_points, parse_grid, parse_values, reusable,
                                 run_points, write_sweep)

    attacks, defences = parse_grid(args.attacks, args.defences)
    grid = bool(attacks or defences)
    if args.epsilons is None and args.noise_multipliers is None and not grid:
        raise ConfigError("sweep needs --epsilons (e.g. 1,3,8) or --noise-multipliers (e.g. 0.5,1.0), or both, "
                          "or a poisoning grid's --attacks or --defences")
    # --baselines is left out: the same sweep with it adds the baselines to the points already finished
    options = {k: v for k, v in vars(args).items() if k not in ("quiet", "name", "baselines")}
    points = build_points(resolve(args, default_name=default_name(options)),
                          epsilons=parse_values(args.epsilons, "--epsilons"),
                          noise_multipliers=parse_values(args.noise_multipliers, "--noise-multipliers"),
                          clipping_norms=parse_values(args.clipping_norms, "--clipping-norms"),
                          attacks=attacks, defences=defences, attackers=args.attackers)
    for point in points:
        check_config(point.config)
    base = points[0].config
    sweep_dir = Path(base.output.dir)
    say = progress_printer(base)
    say(f"fedclinic sweep: {len(points)} points ({', '.join(p.label for p in points)}), "
        f"{base.federation.sites} sites, {base.federation.rounds} round(s) each -> {sweep_dir}")
    # the non-private pooled model once, at the baseline point; every private point its DP-SGD pooled model
    add_baselines = (lambda point: baselines_into_run(point.run_dir, point.config, say, on_step=say.step,
                                                      non_private=point.config.privacy.mode == "off")
                     ) if args.baselines else None
    say.step("sweep points", 0, len(points))
    # the points still to run are one Flower run: one SuperLink, one ServerApp process and one Ray for all
    link = LocalSuperLink(sweep_dir)
    try:
        try:
            rows = run_points(points, run_all=lambda configs, on_result: run_all(configs, say, link, on_result),
                              say=say, add_baselines=add_baselines,
                              on_done=lambda done, total: say.step("sweep points", done, total))
        finally:
            link.stop()
    except KeyboardInterrupt:
        done = sum(reusable(point) for point in points)
        print(f"fedclinic: sweep interrupted with {done} of {len(points)} points done; every process it started has "
              "been stopped; run the same command again to resume from there", file=sys.stderr)
        return 130
    written = write_sweep(rows, sweep_dir, grid=grid)
    print(format_points(rows))
    print(f"sweep directory: {sweep_dir}  ({', '.join(path.name for path in written)}, one run directory per point)")
    return 0
