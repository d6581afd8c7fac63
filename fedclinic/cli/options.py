"""What `simulate` and `sweep` share: the options of a run, how they resolve to a Config, the checks before it starts."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace as dc_replace
from pathlib import Path

from fedclinic.cli.progress import Progress
from fedclinic.config import Config, ConfigError, load_config, parse_override, pinned


def add_run_options(p: argparse.ArgumentParser, *, name_help: str) -> None:
    """The options of a run's configuration, shared by simulate and sweep (read back by `resolve`)."""
    p.add_argument("--config", metavar="FILE", help="TOML file of settings (same keys as --set)")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], help="override one setting, e.g. privacy.target-epsilon=3")
    p.add_argument("--sites", type=int, help="number of hospital sites (federation.sites)")
    p.add_argument("--rounds", type=int, help="number of federated rounds (federation.rounds)")
    p.add_argument("--data", metavar="FILE.npz", help="MedMNIST-style .npz file instead of synthetic sites (data.path)")
    p.add_argument("--out", metavar="DIR", help="folder for run directories (output.dir, default runs)")
    p.add_argument("--name", help=name_help)
    p.add_argument("--quiet", action="store_true", help="no progress lines or bars, only the final table")


def resolve(args: argparse.Namespace, *, default_name: str | None = None, defaults: list[str] = ()) -> Config:
    """Defaults (then the command's own `defaults`) -> --config -> --set -> the shortcut flags; paths made absolute.

    An unnamed run is named `default_name`, or else by the time it starts.
    """
    overrides = list(args.set)
    for flag, key in (("sites", "federation.sites"), ("rounds", "federation.rounds"), ("data", "data.path"),
                      ("out", "output.dir"), ("name", "output.name"), ("accountant", "privacy.accountant")):
        value = getattr(args, flag, None)  # budget --plan has no --out / --name, only it has --accountant
        if value is not None:
            overrides.append(f"{key}={json.dumps(value)}")
    if getattr(args, "quiet", False):
        overrides.append("output.quiet=true")
    config = load_config(args.config, overrides, defaults=defaults)
    if config.output.resume and not getattr(args, "resume", None):
        raise ConfigError("output.resume is set by --resume RUN_DIR, which also checks the run's checkpoint; use that")
    return pinned(config, default_name=default_name)


# what a resumed run may set differently: how it waits, what it prints, the steps after training
RESUMABLE = ("federation.round-timeout", "federation.rejoin-wait", "output.quiet", "robustness.", "compression.",
             "explain.", "privacy.audit")


def refuse_changes(args: argparse.Namespace, *, who: str, may_change: tuple[str, ...], why: str) -> None:
    """Refuse options that would change the config.toml of a run directory: any of the run options, and a --set
    of a key that does not start with one of `may_change`; `who` is the command, `why` why it may not."""
    given = [f"--{flag}" for flag in ("config", "sites", "rounds", "data", "out", "name") if getattr(args, flag)]
    if given:
        raise ConfigError(f"{who} uses the run's own config.toml; {', '.join(given)} cannot change it")
    fixed = [key for key in (parse_override(text)[0] for text in args.set) if not key.startswith(may_change)]
    if fixed:
        raise ConfigError(f"{who} cannot change {fixed[0]}: {why} (only {', '.join(may_change)} may change)")


def resolve_resume(args: argparse.Namespace) -> Config:
    """The Config of the run in args.resume, to continue from its checkpoint (--set still applies)."""
    from fedclinic.server.checkpoint import load_checkpoint

    refuse_changes(args, who="--resume", may_change=RESUMABLE,
                   why="the sites' ledgers and the checkpoint were made with the run's own value")
    run_dir = Path(args.resume).resolve()
    found = load_checkpoint(run_dir)  # refuses a directory with nothing to resume, before anything starts
    config = load_config(run_dir / "config.toml", list(args.set))
    if found["round"] >= config.federation.rounds and (run_dir / "results.json").exists():
        raise ConfigError(f"{run_dir} finished all {config.federation.rounds} rounds; there is nothing to resume")
    return dc_replace(config, output=dc_replace(config.output, dir=str(run_dir.parent), name=run_dir.name, resume=True))


def describe_privacy(config: Config) -> str:
    p = config.privacy
    parts = []
    if p.local:
        parts.append(f"record-level DP-SGD budget eps={p.target_epsilon:g}, delta={p.delta:g} per site")
    if p.central:
        parts.append(f"site-level central DP (noise {p.central_noise_multiplier:g}, clip {p.central_clipping_norm:g})")
    return " + ".join(parts) or "privacy OFF (non-private baseline)"


def progress_printer(config: Config) -> Progress:
    """The command's progress lines and bars (none with output.quiet; bars only on a terminal)."""
    return Progress(quiet=config.output.quiet)


def show_row(say: Progress, row: dict, rounds: int) -> None:
    """A line of the run's progress file: a round (the rounds bar) or a message (its step's bar, if any)."""
    from fedclinic.report import format_progress

    say(format_progress(row, rounds))
    if "step" in row:
        say.step(*row["step"])
    elif "round" in row:
        say.step("rounds", row["round"], rounds)
