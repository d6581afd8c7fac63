"""The Flower ServerApp: run the strategy, evaluate each round, personalise, attack/compress/explain, write the run.

    flwr run .        (or: fedclinic simulate)
"""

from __future__ import annotations

import time
from logging import INFO, WARNING
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedclinic.config import Config, check_classes, check_federation, check_sites, from_run_config, sweep_runs
from fedclinic.data import server_test_set, site_sizes
from fedclinic.device import resolve_device
from fedclinic.model import initial_model
from fedclinic.report import RunRecorder, run_directory
from fedclinic.runtime.runs import finished_row
from fedclinic.server.checkpoint import load_checkpoint
from fedclinic.server.personalization import personalize_sites
from fedclinic.server.post_training import post_training
from fedclinic.server.rounds import CentralEvaluation
from fedclinic.strategies.build import build_strategy
from fedclinic.strategies.sites import FederationStopped, SiteRounds, wait_for_sites

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    # one run, or a sweep's points one after another: one ServerApp process and one Ray for all of them
    for config, point in sweep_runs(from_run_config(context.run_config)):
        run_federation(grid, context, config, point)


def run_federation(grid: Grid, context: Context, config: Config, point: str) -> None:
    """One federation into its run directory; `point`: the keys its sites are sent (a sweep's later point)."""
    started = time.time()
    nodes = connected_sites(grid, config)
    run_dir = run_directory(config)
    resumed = load_checkpoint(run_dir) if config.output.resume else None
    recorder = RunRecorder(run_dir, config, started=started, resumed=resumed and resumed["state"]["central"])
    test_set = server_test_set(config.data)
    check_classes(config, test_set.class_names)
    device = resolve_device(config.training.device)
    model = initial_model(config, test_set).to(device)
    strategy = build_strategy(config, sites=nodes, rounds=config.federation.rounds)
    if resumed:
        model.load_state_dict(resumed["arrays"])
        strategy.load_state_dict(resumed["state"]["strategy"], finished_rounds=resumed["round"])
        log(INFO, "fedclinic: resuming %s after round %d of %d", run_dir, resumed["round"], config.federation.rounds)
    evaluation = CentralEvaluation(model, test_set, config, recorder, strategy, run_dir, device=device,
                                   resumed=bool(resumed))
    final, last_round = federate(grid, strategy, ArrayRecord(model.state_dict()), config, run_dir, evaluation,
                                 point=point)
    model.load_state_dict(final.to_torch_state_dict())

    def say(message: str, step: tuple[str, int, int] | None = None) -> None:
        log(INFO, "fedclinic: %s", message)
        recorder.note(message, step)

    personalization = personalize_sites(grid, final, config, run_dir, last_round=last_round, say=say, point=point)
    found = post_training(model, test_set, config, run_dir, device=device, say=say)
    recorder.finish(model, test_set.class_names, strategy.site_metrics, strategy_seconds=time.time() - started,
                    stop_reason=strategy.stop_reason, central_epsilon=strategy.central_epsilon(),
                    post_training=found, personalization=personalization)
    log(INFO, "fedclinic: run written to %s", run_dir)
    recorder.append(finished_row(context.run_id))  # the last line: the command need not ask Flower how it ended


def connected_sites(grid: Grid, config: Config) -> int:
    """How many SuperNodes are connected, once all are (or after 30 s); the federation's sizes checked for them."""
    fed = config.federation
    # without this, round 1 can start while nodes are still registering and some sites would miss it
    nodes = wait_for_sites(grid, fed.sites, timeout=30.0)
    if nodes != fed.sites:
        log(WARNING, "fedclinic: %d SuperNodes are connected but federation.sites=%d; "
            "in simulation pass --federation-config 'num-supernodes=%d'", nodes, fed.sites, fed.sites)
    if config.data.test_path:  # deployed: the server holds no site data, each site checks its own size
        check_federation(config, max(nodes, 1))
    else:
        check_sites(config, site_sizes(config.data, max(nodes, 1)))
    return nodes


def federate(grid: Grid, strategy: SiteRounds, initial: ArrayRecord, config: Config, run_dir: Path,
             evaluation: CentralEvaluation, *, point: str = "") -> tuple[ArrayRecord, int]:
    """The rounds still to run (all, or those after the checkpoint's): (the final global model, its round).
    Every message tells the sites the run's directory and `point`, a sweep's keys for it."""
    fed = config.federation
    try:
        if fed.rounds - strategy.offset < 1:  # every round had finished: only the post-training steps were left
            raise FederationStopped("", initial, fed.rounds)
        result = strategy.start(
            grid=grid,
            initial_arrays=initial,
            num_rounds=fed.rounds - strategy.offset,
            timeout=fed.round_timeout,
            train_config=ConfigRecord({"run-dir": str(run_dir.resolve()), "point": point}),
            evaluate_config=ConfigRecord({"point": point}),
            evaluate_fn=evaluation,
        )
        return (result.arrays if len(result.arrays) else initial), fed.rounds  # empty when no site ever trained
    except FederationStopped as stopped:
        return stopped.arrays, stopped.last_round
