"""The privacy/utility trade-off: one run directory per privacy setting, side by side, all in one Flower run.

    fedclinic sweep --epsilons 1,3,8
    fedclinic sweep --epsilons 1,3,8 --noise-multipliers 0.5,1.0 --clipping-norms 0.5,1,2 --name dp-sweep
    fedclinic sweep --epsilons 8 --attacks none,sign-flip,backdoor --defences fedavg,fedmedian,clip-1 --attackers 1

Every point runs the same data, seeds and training settings; only privacy
keys differ. The points are, in order: the non-private baseline
(`privacy.mode=off`), one per target epsilon (sigma calibrated to it), one per
fixed noise multiplier sigma (a site stops early when its next round would
exceed privacy.target-epsilon), each private one crossed with every clipping
norm when --clipping-norms is given.

With --attacks or --defences it is a poisoning grid: every privacy point is
crossed with every attack (none = nobody attacks; else federation.attack by
the sites in --attackers) and every defence (a federation.strategy, or clip-C:
FedAvg with each update clipped to norm C, federation.update-clip-norm).
Krum's, MultiKrum's and Bulyan's federation.num-malicious is the number of
attackers. Its points are named <privacy point>-<attack>-<defence>, e.g.
eps-8-backdoor-fedmedian, and the sweep also writes poisoning.md (clean
accuracy, IoU and backdoor success rate per defence) and poisoning.png.

<out>/<name>/
  <point>/          one complete run directory per point: baseline, eps-3, sigma-1, eps-3-clip-0.5, ...
  sweep.csv         a row per point (COLUMNS below); with --baselines also the pooled and silo models at
                    the point's privacy setting (fedclinic.baselines), trained in the CLI's process
  accuracy_vs_epsilon.png, iou_vs_epsilon.png, robust_accuracy_vs_epsilon.png
                    the trade-off (log epsilon; the baseline as a dashed line; in a poisoning grid, of the
                    points where nobody attacks and the first defence)
  poisoning.md, poisoning.png
                    a poisoning grid's table and plot

A point whose directory holds results.json and a config.toml equal to the
configuration it would run now is reused; an unfinished one is run again from
scratch. So an interrupted sweep resumes when the same command is run again.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from fedclinic.config import POISONING, STRATEGIES, Config, ConfigError, load_config, replace, site_ids
from fedclinic.runtime.simulation import SimulationError

# robust_accuracy: accuracy under the configured attack at the largest robustness.eps (empty when it is off);
# pooled_* and silo_*: the baselines at the point's privacy setting, on the server's test set (empty without
# --baselines): the pooled model (DP-SGD at a private point), silo's mean, worst and best site
# attack, defence: a poisoning grid's (none and the configured strategy otherwise); backdoor_success_rate: the final
# model's under a backdoor attack
COLUMNS = ("point", "mode", "target_epsilon", "noise_multiplier", "max_grad_norm", "attack", "defence", "max_epsilon",
           "accuracy", "f1", "iou", "backdoor_success_rate", "robust_accuracy", "audit_auc",
           "epsilon_lower_bound", "pooled_accuracy", "pooled_iou", "pooled_epsilon",
           "silo_accuracy", "silo_worst_accuracy", "silo_best_accuracy", "silo_iou", "silo_max_epsilon",
           "wall_seconds", "run_dir")


@dataclass(frozen=True)
class Point:
    """One setting of the sweep: its label (the name of its run directory) and the full configuration."""

    label: str
    config: Config
    attack: str = ""  # a poisoning grid's attack and defence; "" = the configured ones
    defence: str = ""

    @property
    def run_dir(self) -> Path:
        return Path(self.config.output.dir) / self.config.output.name


def parse_values(text: str | None, flag: str) -> tuple[float, ...]:
    """"1,3,8" -> (1.0, 3.0, 8.0); every value a finite number > 0, repeats dropped; None (not given) -> ()."""
    if text is None:
        return ()
    try:
        values = [float(item) for item in text.split(",")]
    except ValueError:
        raise ConfigError(f"{flag} expects numbers separated by commas, e.g. 1,3,8; got {text!r}") from None
    bad = [v for v in values if not (math.isfinite(v) and v > 0)]
    if bad:
        raise ConfigError(f"{flag} values must be finite numbers > 0, got {bad[0]:g}")
    return tuple(dict.fromkeys(values))


def default_name(options: dict) -> str:
    """sweep-<8 hex digits of the options>: the same command finds the same sweep directory again."""
    digest = hashlib.sha1(json.dumps(options, sort_keys=True, default=str).encode()).hexdigest()
    return f"sweep-{digest[:8]}"


def parse_grid(attacks: str | None, defences: str | None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """--attacks and --defences as tuples, each token checked; () for a flag not given."""
    def tokens(text: str | None) -> tuple[str, ...]:
        return () if text is None else tuple(dict.fromkeys(t.strip() for t in text.split(",")))

    for attack in tokens(attacks):
        if attack not in ("none", *POISONING):
            raise ConfigError(f"--attacks takes none, {', '.join(POISONING)}; got {attack!r}")
    for defence in tokens(defences):
        defence_keys(defence, attackers=1)
    return tokens(attacks), tokens(defences)


def defence_keys(defence: str, *, attackers: int) -> dict:
    """The federation keys of a grid's defence: a strategy of Flower's, or clip-C (FedAvg, updates clipped to C)."""
    if defence in STRATEGIES:
        return {"strategy": defence, "num_malicious": attackers}
    norm = defence.removeprefix("clip-")
    try:
        if defence.startswith("clip-") and math.isfinite(float(norm)) and float(norm) > 0:
            return {"strategy": "fedavg", "update_clip_norm": float(norm)}
    except ValueError:
        pass
    raise ConfigError(f"--defences takes {', '.join(STRATEGIES)} or clip-C (updates clipped to norm C > 0, "
                      f"e.g. clip-1); got {defence!r}")


def build_points(base: Config, *, epsilons: Iterable[float] = (), noise_multipliers: Iterable[float] = (),
                 clipping_norms: Iterable[float] = (), attacks: Iterable[str] = (), defences: Iterable[str] = (),
                 attackers: str = "1") -> list[Point]:
    """The baseline, then each target epsilon, then each fixed sigma, each crossed with the clipping norms; in a
    poisoning grid (attacks or defences given) each of those crossed with every attack and defence."""
    private = [(f"eps-{e:g}", {"mode": "local", "target_epsilon": e, "noise_multiplier": 0.0}) for e in epsilons]
    private += [(f"sigma-{s:g}", {"mode": "local", "noise_multiplier": s}) for s in noise_multipliers]
    clipping_norms = tuple(clipping_norms)
    if clipping_norms:
        private = [(f"{label}-clip-{c:g}", {**keys, "max_grad_norm": c}) for label, keys in private for c in clipping_norms]
    sweep_dir = str(Path(base.output.dir) / base.output.name)
    points = [Point(label, replace(base, privacy=keys, output={"dir": sweep_dir, "name": label}))
              for label, keys in [("baseline", {"mode": "off"}), *private]]
    attacks, defences = tuple(attacks), tuple(defences)
    if not (attacks or defences):
        return points
    who = base.federation.attackers or attackers
    count = len(site_ids(who))  # also where nobody attacks: each defence is the same rule in every row
    grid = []
    for point in points:
        for attack in attacks or ("none",):
            for defence in defences or (base.federation.strategy,):
                federation = {**defence_keys(defence, attackers=count), "attack": "" if attack == "none" else attack,
                              "attackers": "" if attack == "none" else who}
                label = f"{point.label}-{attack}-{defence}"
                grid.append(Point(label, replace(point.config, federation=federation, output={"name": label}),
                                  attack=attack, defence=defence))
    return grid


def _same_run(a: Config, b: Config) -> bool:
    """Equal in everything a run computes; where it is written and how loudly are no part of the result."""
    def computed(config):
        return {k: v for k, v in config.to_flat().items() if not k.startswith("output.")}
    return computed(a) == computed(b)


def reusable(point: Point) -> bool:
    """The point's run finished (results.json) with exactly the configuration it would run now."""
    results, saved = point.run_dir / "results.json", point.run_dir / "config.toml"
    if not (results.exists() and saved.exists()):
        return False
    try:
        return _same_run(load_config(saved), point.config)
    except ConfigError:  # written by another fedclinic version: run it again
        return False


def robust_accuracy(results: dict) -> float | None:
    """Accuracy under attack, once adversarial evaluation writes results["robustness"]; None before."""
    robustness = results.get("robustness")
    return robustness.get("robust_accuracy") if isinstance(robustness, dict) else None


def point_row(point: Point, results: dict) -> dict:
    """A row of sweep.csv: the point's privacy settings and the final metrics of its run (None = empty)."""
    p, final = point.config.privacy, results["final"]
    private = p.mode != "off"
    return {
        "point": point.label,
        "mode": p.mode,
        "target_epsilon": p.target_epsilon if private else None,  # a fixed sigma's hard budget
        "noise_multiplier": (p.noise_multiplier or None) if private else None,  # None: calibrated per site
        "max_grad_norm": p.max_grad_norm,
        "attack": point.attack or point.config.federation.attack or "none",
        "defence": point.defence or point.config.federation.strategy,
        "max_epsilon": final["max_epsilon"] if private else None,  # spent, largest over sites
        "accuracy": final["accuracy"],
        "f1": final["f1"],
        "iou": final["iou"],
        "backdoor_success_rate": final.get("backdoor_success_rate"),
        "robust_accuracy": robust_accuracy(results),
        "audit_auc": results.get("audit", {}).get("auc"),  # membership inference, when privacy.audit is on
        # the canary audit's epsilon-hat, with privacy.audit-canaries
        "epsilon_lower_bound": results.get("audit", {}).get("epsilon_lower_bound"),
        **baseline_cells(results.get("baselines")),
        "wall_seconds": results["timings"].get("wall_seconds"),
        "run_dir": str(point.run_dir),
    }


def baseline_cells(baselines: dict | None) -> dict:
    """The pooled_* and silo_* cells of a row: the pooled model of the point's privacy setting, silo's summary."""
    cells = dict.fromkeys(c for c in COLUMNS if c.startswith(("pooled_", "silo_")))
    if not baselines:
        return cells
    pooled, silo = baselines["pooled"], baselines["silo"]
    model = pooled["private"] or pooled["non_private"]  # a private point's sweep trains only the DP-SGD one
    test = silo["test"]
    cells.update(pooled_accuracy=model["test"]["accuracy"], pooled_iou=model["test"]["iou"],
                 pooled_epsilon=model["epsilon"], silo_accuracy=test["mean"]["accuracy"],
                 silo_worst_accuracy=test["worst"]["accuracy"], silo_best_accuracy=test["best"]["accuracy"],
                 silo_iou=test["mean"]["iou"],
                 silo_max_epsilon=silo["max_epsilon"])
    return cells


def _cell(value, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def setting(point: Point) -> str:
    """The point's privacy setting in words, for its progress line."""
    p = point.config.privacy
    if p.mode == "off":
        return "privacy off (non-private baseline)"
    noise = f"fixed sigma {p.noise_multiplier:g}, budget eps {p.target_epsilon:g}" if p.noise_multiplier else \
        f"target eps {p.target_epsilon:g}"
    return f"DP-SGD, {noise}, clipping norm {p.max_grad_norm:g}"


def describe(row: dict) -> str:
    baselines = "" if row["silo_accuracy"] is None else \
        f"; pooled accuracy {_cell(row['pooled_accuracy'])}, silo {_cell(row['silo_accuracy'])} (mean of sites)"
    return (f"accuracy {_cell(row['accuracy'])}, IoU {_cell(row['iou'])}, eps spent {_cell(row['max_epsilon'], '.2f')}, "
            f"{_cell(row['wall_seconds'], '.0f')} s{baselines}")


def run_points(points: list[Point], *, run_all: Callable[[list[Config], Callable[[int, dict], None]], None],
               say: Callable[[str], None], add_baselines: Callable[[Point], dict] | None = None,
               on_done: Callable[[int, int], None] = lambda done, total: None) -> list[dict]:
    """Reuse every finished point and run the others: `run_all(configs, on_result)` simulates those configurations
    one after another (fedclinic.run_many: one Flower run for all) and calls `on_result(i, results)` as the i-th
    is complete. Returns a row per point, in order.

    With `add_baselines`, a point whose results have no baselines yet gets them: `add_baselines(point)` trains
    them into its run directory and returns its results with them. `on_done(done, total)` follows each point.
    """
    rows: dict[int, dict] = {}
    pending: list[tuple[int, Point]] = []
    head = lambda i: f"[{i}/{len(points)}] {points[i - 1].label}"  # noqa: E731
    for i, point in enumerate(points, 1):
        if not reusable(point):
            if point.run_dir.exists():
                say(f"{head(i)}: {point.run_dir} holds an unfinished or differently configured run; starting it afresh")
                shutil.rmtree(point.run_dir)
            pending.append((i, point))
            continue
        results = json.loads((point.run_dir / "results.json").read_text())
        if add_baselines and "baselines" not in results:
            say(f"{head(i)}: reusing the finished run in {point.run_dir}; training its baselines")
            results = add_baselines(point)
        rows[i] = point_row(point, results)
        say(f"{head(i)}: reused the finished run in {point.run_dir}: {describe(rows[i])}")
        on_done(len(rows), len(points))
    if not pending:
        return [rows[i] for i in sorted(rows)]

    def done(k: int, results: dict) -> None:
        i, point = pending[k]
        if add_baselines:
            results = add_baselines(point)
        rows[i] = point_row(point, results)
        say(f"{head(i)}: done: {describe(rows[i])}")
        on_done(len(rows), len(points))
        if k + 1 < len(pending):
            say(f"{head(pending[k + 1][0])}: started: {setting(pending[k + 1][1])}")

    say(f"{head(pending[0][0])}: started: {setting(pending[0][1])}")
    try:
        run_all([point.config for _, point in pending], done)
    except SimulationError as err:
        failed = next(point for i, point in pending if i not in rows)
        raise SimulationError(f"sweep point {failed.label}: {err}") from None
    return [rows[i] for i in sorted(rows)]


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        out = csv.DictWriter(f, fieldnames=COLUMNS)
        out.writeheader()
        for row in rows:
            out.writerow({k: "" if row[k] is None else row[k] for k in COLUMNS})


def write_sweep(rows: list[dict], sweep_dir: Path, *, grid: bool = False) -> list[Path]:
    """sweep.csv and the trade-off plots (IoU only when the data has boxes), and a poisoning grid's table and
    plot; returns the files written."""
    from fedclinic.report.plots import plot_poisoning, plot_privacy_tradeoff

    written = [sweep_dir / "sweep.csv"]
    write_csv(rows, written[0])
    # the trade-off of the points where nobody attacks, under one defence
    clean = rows if not grid else [r for r in rows if r["attack"] == "none" and r["defence"] == rows[0]["defence"]]
    for metric, ylabel in (("accuracy", "accuracy"), ("iou", "mean IoU (lesions)"),
                           ("robust_accuracy", "robust accuracy (largest attack budget)")):
        if any(row[metric] is not None for row in clean):
            written.append(sweep_dir / f"{metric}_vs_epsilon.png")
            plot_privacy_tradeoff(clean, metric, written[-1], ylabel=ylabel)
    if grid:
        written.append(sweep_dir / "poisoning.md")
        written[-1].write_text(poisoning_table(rows))
        written.append(sweep_dir / "poisoning.png")
        plot_poisoning(rows, written[-1])
    return written


def poisoning_table(rows: list[dict]) -> str:
    """A poisoning grid as markdown: a row per privacy point and attack, a column per defence; each cell is the
    final accuracy / IoU, and the backdoor success rate after a second slash under a backdoor attack."""
    from fedclinic.report.plots import privacy_setting

    defences = list(dict.fromkeys(r["defence"] for r in rows))
    lines = ["Final accuracy / mean IoU on the server's test set (/ backdoor success rate: the share of triggered "
             "test images of other classes classified as the target)", "",
             "| privacy | DP-SGD clip | attack | " + " | ".join(defences) + " |",
             "| --- | ---: | --- | " + " | ".join("---:" for _ in defences) + " |"]
    cells: dict[tuple, dict[str, str]] = {}
    for r in rows:
        cell = f"{_cell(r['accuracy'])} / {_cell(r['iou'])}"
        if r["backdoor_success_rate"] is not None:
            cell += f" / {_cell(r['backdoor_success_rate'])}"
        cells.setdefault((privacy_setting(r), r["max_grad_norm"], r["attack"]), {})[r["defence"]] = cell
    for (privacy, clip, attack), by_defence in cells.items():
        lines.append(f"| {privacy} | {'—' if privacy == 'off' else format(clip, 'g')} | {attack} | " + " | ".join(by_defence.get(d, "—") for d in defences)
                     + " |")
    return "\n".join(lines) + "\n"


def format_points(rows: list[dict]) -> str:
    """The short table `fedclinic sweep` ends with; the canary audit's epsilon-hat when it ran, pooled and silo
    accuracy when the baselines ran, the backdoor success rate when a point ran a backdoor."""
    baselines = any(r["silo_accuracy"] is not None for r in rows)
    backdoor = any(r["backdoor_success_rate"] is not None for r in rows)
    canaries = any(r["epsilon_lower_bound"] is not None for r in rows)
    width = max([20, *(len(r["point"]) for r in rows)])
    extra = ((f"  {'eps-hat':>7}" if canaries else "") + (f"  {'backdoor':>8}" if backdoor else "")
             + (f"  {'pooled':>6}  {'silo':>6}  {'worst':>6}" if baselines else ""))
    lines = [f"{'point':<{width}}  {'eps spent':>9}  {'accuracy':>8}  {'f1':>6}  {'IoU':>6}  {'robust':>6}  "
             f"{'MIA AUC':>7}" + extra, "-" * (width + 54 + len(extra))]
    for r in rows:
        cells = f"  {_cell(r['epsilon_lower_bound'], '.2f'):>7}" if canaries else ""
        cells += f"  {_cell(r['backdoor_success_rate']):>8}" if backdoor else ""
        cells += (f"  {_cell(r['pooled_accuracy']):>6}  {_cell(r['silo_accuracy']):>6}  "
                  f"{_cell(r['silo_worst_accuracy']):>6}") if baselines else ""
        lines.append(f"{r['point']:<{width}}  {_cell(r['max_epsilon'], '.2f'):>9}  {_cell(r['accuracy']):>8}  "
                     f"{_cell(r['f1']):>6}  {_cell(r['iou']):>6}  {_cell(r['robust_accuracy']):>6}  "
                     f"{_cell(r['audit_auc']):>7}" + cells)
    return "\n".join(lines)
