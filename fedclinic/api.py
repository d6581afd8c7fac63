"""The library call: run one federation of a configuration and get its typed results.

    import fedclinic
    config = fedclinic.load_config(None, ["federation.sites=3", "privacy.target-epsilon=3"])
    results = fedclinic.run(config)              # through Flower's simulation runtime
    results.final.accuracy, results.sites[0].epsilon, results.run_dir

`fedclinic simulate`, `fedclinic sweep` and the benches are shells over
`run`; `fedclinic demo` shares its checks and its steps after the run (the
membership audit, the baselines).
"""

from __future__ import annotations

import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from fedclinic.config import Config, ConfigError, check_classes, check_sites, pinned
from fedclinic.report.schema import Results

if TYPE_CHECKING:
    from fedclinic.runtime.simulation import LocalSuperLink

Say = Callable[[str], None]
Step = Callable[[str, int, int], None]  # (kind, done, total): a progress bar's state


def _quiet(_: str) -> None:
    pass


def run(config: Config, *, baselines: bool = False, say: Say | None = None,
        on_progress: Callable[[dict], None] | None = None, on_step: Step | None = None,
        link: "LocalSuperLink | None" = None) -> Results:
    """Simulate the federation of `config` into its run directory; returns what it wrote to results.json.

    Refuses a configuration the sites' sizes or the privacy budget make
    impossible (ConfigError) before any site trains; the budget is checked
    while Flower's SuperLink starts, and a refused run leaves no process and
    no folder behind. `say` gets a line per
    step, `on_progress` each line of the run's progress file (a round, or a
    note of a step after training), `on_step` the progress of the audit and
    the baselines, which run in this process. With `baselines` the pooled and silo
    baselines are trained after the federation, in this process. Resumes
    from the checkpoint when `config.output.resume` is set. `link`: a simulation SuperLink already up
    (fedclinic.runtime.simulation.LocalSuperLink) to submit the run to.
    """
    return run_many([config], baselines=baselines, say=say, on_progress=on_progress, on_step=on_step, link=link)[0]


def run_many(configs: list[Config], *, baselines: bool = False, say: Say | None = None,
             on_progress: Callable[[dict], None] | None = None, on_step: Step | None = None,
             link: "LocalSuperLink | None" = None,
             on_result: Callable[[int, Results], None] | None = None) -> list[Results]:
    """`run` for several federations of the same sites (a sweep's points), one after another in one Flower run:
    one ServerApp process, one Ray and one import of the sites' code for all of them, where separate runs pay
    Flower's start-up each. Every configuration is checked before anything starts. `on_result(i, results)`
    follows each run's steps in this process (the audit, the baselines), while the next run trains.
    """
    from fedclinic.report import run_directory, with_wall_time
    from fedclinic.runtime import simulation

    say = say or _quiet
    configs = [pinned(config) for config in configs]
    sizes = [check_data(config) for config in configs]
    paths = [Path(config.output.dir, config.output.name).absolute() for config in configs]
    # the first folder each run would make: a refused run leaves none of them behind
    made = [next((p for p in reversed((path, *path.parents)) if not p.exists()), None) for path in paths]
    run_dirs = [run_directory(config) for config in configs]
    own = link is None
    if own:  # Flower's SuperLink starts (about 2 s) while the budget check imports Opacus (about 1.6 s)
        link = simulation.LocalSuperLink(run_dirs[0]).start()
    try:
        for config, site_sizes in zip(configs, sizes):
            check_budget(config, min(site_sizes))
    except BaseException:
        if own:
            link.stop()
        for folder in made:
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
        raise

    results: list[Results] = []
    started = time.time()

    def finish(i: int) -> None:
        """Run i has written its run directory: its wall time, then its steps in this process."""
        nonlocal started
        config, run_dir = configs[i], run_dirs[i]
        found = with_wall_time(run_dir, time.time() - started)
        started = time.time()
        if config.privacy.audit:
            if config.privacy.audit_canaries:
                say(f"  canary audit: the federation trained once more in this process, with "
                    f"{config.privacy.audit_canaries} canaries, to bound epsilon from below ...")
            say("  membership-inference audit of the final model ...")
            found = audit_into_run(run_dir, on_step=on_step)
        if baselines:
            say("  pooled and silo baselines, in this process ...")
            found = baselines_into_run(run_dir, config, say, on_step=on_step)
        results.append(Results.from_dict(found, run_dir=run_dir))  # what the last step wrote to results.json
        if on_result is not None:
            on_result(i, results[-1])

    say("  starting Flower's simulation runtime ...")
    # the plots of the sites' data are drawn in a thread while Flower starts, when this process has nothing to do
    try:
        with ThreadPoolExecutor(max_workers=1) as plotter:
            plotted = plotter.submit(plot_sites, configs, run_dirs)
            simulation.run(configs[0], run_dirs[0], on_progress=on_progress, link=link,
                           later=list(zip(configs[1:], run_dirs[1:])), on_written=finish)
            plotted.result()
    finally:
        if own:
            link.stop()
    return results


def plot_sites(configs: list[Config], run_dirs: list[Path]) -> None:
    """What the sites hold, into each run directory (in simulation only: the server never sees site data in
    deployment); runs of the same sites get copies of the same plots."""
    from fedclinic.data import site_data
    from fedclinic.report.plots import plot_label_distribution, plot_site_samples

    names = ("label_distribution.png", "site_samples.png")
    drawn: dict[tuple, Path] = {}
    for config, run_dir in zip(configs, run_dirs):
        key = (config.data, config.federation.sites)
        if key in drawn:
            for name in names:
                shutil.copy2(drawn[key] / name, run_dir / name)
            continue
        sites = [site_data(config.data, k, config.federation.sites)[0] for k in range(config.federation.sites)]
        plot_label_distribution(sites, run_dir / names[0])
        plot_site_samples(sites, run_dir / names[1])
        drawn[key] = run_dir


def check_config(config: Config) -> None:
    """Refuse what the sites' actual sizes or the privacy budget make impossible, before anything runs."""
    check_budget(config, min(check_data(config)))


def check_data(config: Config) -> list[int]:
    """Refuse sites too small for their batches, or classes the model cannot have; returns the sites' sizes."""
    from fedclinic.data import CLASS_NAMES, site_sizes

    sizes = site_sizes(config.data, config.federation.sites)
    check_sites(config, sizes)
    if not config.data.path:  # the simulated data's classes (the ServerApp checks a user's against its test set)
        check_classes(config, CLASS_NAMES)
    return sizes


def check_budget(config: Config, smallest_site: int) -> None:
    """Refuse a privacy target no noise level can meet, before any site starts."""
    if not config.privacy.local or config.privacy.noise_multiplier:
        return  # a fixed sigma needs no calibration; the sites' hard stop enforces the budget
    from fedclinic.privacy.accounting import reachable, sample_rate, steps_per_epoch

    t, p = config.training, config.privacy
    target = min([p.target_epsilon, *p.budgets().values()])
    # the smallest site samples at the highest rate: if it can meet the target, every site can
    q = sample_rate(num_examples=smallest_site, batch_size=t.batch_size)
    epochs = config.federation.rounds * t.local_epochs + config.personalize.epochs  # the fine-tuning is planned for too
    steps = epochs * steps_per_epoch(num_examples=smallest_site, batch_size=t.batch_size)
    if not reachable(target_epsilon=target, delta=p.delta, sample_rate=q, steps=steps, accountant=p.accountant):
        raise ConfigError(
            f"no noise level reaches epsilon={target} at delta={p.delta} for the smallest site "
            f"({smallest_site} images, sample rate {q:.4g}, {steps} steps); raise privacy.target-epsilon"
        )


def audit_into_run(run_dir: Path, *, on_step: Step | None = None, canaries: int | None = None) -> dict:
    """Audit a finished run and add the result to its results.json and report.md; returns the results.

    With `canaries` (by default the run's privacy.audit-canaries) the canary
    audit (fedclinic.canary_audit) runs first, in this process: its bounds
    join the audit section and each site's entry, its replay's model is the
    calibrated attack's reference, and canary_audit.json keeps every canary's
    coin and scores.
    """
    from fedclinic.analysis.audit import audit_run
    from fedclinic.config import load_config
    from fedclinic.report import json_safe, update_results, write_json
    from fedclinic.report.text import write_reports

    config = load_config(run_dir / "config.toml")
    canaries = config.privacy.audit_canaries if canaries is None else canaries
    canary = None
    if canaries:
        from fedclinic.canary_audit import canary_audit

        from fedclinic.privacy.ledger import Ledger

        plans = [Ledger.open(run_dir / "sites" / f"site-{k}", site=k).plan for k in range(config.federation.sites)]
        canary = canary_audit(config, canaries=canaries, work_dir=run_dir / "canary-audit", plans=plans,
                              on_round=None if on_step is None else lambda done, total: on_step("canary audit", done,
                                                                                                  total))
        write_json(run_dir / "canary_audit.json", json_safe({**canary.summary, "per_canary": canary.canaries}))
    audit = audit_run(run_dir, reference=None if canary is None else canary.reference,
                      on_site=None if on_step is None else lambda done, total: on_step("audit", done, total))
    section = {k: v for k, v in audit.items() if k != "curve"}
    if "calibrated" in section:
        section["calibrated"] = {k: v for k, v in section["calibrated"].items() if k != "curve"}
    update = {"audit": section}
    if canary is not None:
        by_site = {s["site"]: s for s in canary.summary["sites"]}
        section.update({k: v for k, v in canary.summary.items() if k != "sites"})
        section["sites"] = [{**s, **{k: v for k, v in by_site[s["site"]].items() if k != "site"}}
                            for s in section["sites"]]
        results = existing_results(run_dir) or {}
        update["sites"] = [{**s, "epsilon_lower_bound": by_site[s["site"]]["epsilon_lower_bound"]}
                           for s in results.get("sites", [])]
    results = update_results(run_dir, json_safe(update))
    write_reports(results, run_dir)
    return results


def existing_results(run_dir: Path) -> dict | None:
    """The run's results.json, None when there is none; an unreadable one is refused."""
    path = run_dir / "results.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path} cannot be read as JSON ({err}); refusing to overwrite it") from None


def baselines_into_run(run_dir: Path, config: Config, say: Say = _quiet, *, non_private: bool = True,
                       on_step: Step | None = None) -> dict:
    """Train the baselines of `config`, write baselines.json into `run_dir`, and add them to its results.json and
    report (a report of the baselines alone when the directory holds no federation); returns the results."""
    from fedclinic import __version__
    from fedclinic.baselines import run_baselines
    from fedclinic.report import json_safe, write_json, write_results
    from fedclinic.report.text import write_reports

    found = json_safe(run_baselines(config, say, non_private=non_private, on_step=on_step))
    write_json(run_dir / "baselines.json", {"fedclinic_version": __version__, "run": run_dir.name,
                                            "config": config.to_flat(), **found})
    results = existing_results(run_dir)
    section = {"pooled": found["pooled"], "silo": found["silo"]}
    if results is None:  # no federation here: the report is of the baselines alone
        write_reports({"run": run_dir.name, "baselines": section}, run_dir)
        return {"run": run_dir.name, "baselines": section}
    results["baselines"] = section
    write_results(run_dir, results)
    write_reports(results, run_dir)
    return results
