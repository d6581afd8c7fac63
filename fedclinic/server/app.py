"""The Flower ServerApp: run the strategy, evaluate each round, personalise, attack/compress/explain, write the run.

    flwr run .        (or: fedclinic simulate)
"""

from __future__ import annotations

import time
from logging import INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedclinic.config import check_federation, check_sites, from_run_config
from fedclinic.data import server_test_set, site_sizes
from fedclinic.device import resolve_device
from fedclinic.evaluation import evaluate
from fedclinic.analysis.adversarial import fgsm_check
from fedclinic.model import initial_model
from fedclinic.report import RunRecorder, run_directory
from fedclinic.server.checkpoint import load_checkpoint, save_checkpoint
from fedclinic.server.personalization import personalize_sites
from fedclinic.server.post_training import post_training, sample
from fedclinic.strategies.build import build_strategy
from fedclinic.strategies.sites import FederationStopped, wait_for_sites

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    started = time.time()
    config = from_run_config(context.run_config)
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

    run_dir = run_directory(config)
    resumed = load_checkpoint(run_dir) if config.output.resume else None
    recorder = RunRecorder(run_dir, config, started=started, resumed=resumed and resumed["state"]["central"])
    test_set = server_test_set(config.data)
    model = initial_model(config, test_set)
    device = resolve_device(config.training.device)
    model.to(device)
    strategy = build_strategy(config, sites=nodes, rounds=fed.rounds)
    if resumed:
        model.load_state_dict(resumed["arrays"])
        strategy.load_state_dict(resumed["state"]["strategy"], finished_rounds=resumed["round"])
        log(INFO, "fedclinic: resuming %s after round %d of %d", run_dir, resumed["round"], fed.rounds)
    check_eps = config.robustness.round_check_eps
    checked = sample(test_set, config.robustness.max_images, seed=config.data.seed)

    def central_evaluation(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        t0 = time.perf_counter()
        model.load_state_dict(arrays.to_torch_state_dict())
        scores = evaluate(model, test_set, box_weight=config.model.box_weight, device=device)
        if resumed and server_round == 0:  # the checkpoint's model, recorded before the server stopped
            return MetricRecord({k: float(v) for k, v in scores.items()})
        server_round += strategy.offset
        if check_eps and server_round > 0:  # the cheap robustness check of every round
            scores["fgsm_accuracy"] = fgsm_check(model, checked, check_eps, device=device)["robust_accuracy"]
        scores["seconds"] = time.perf_counter() - t0
        line = recorder.central_round(server_round, scores, strategy.site_metrics, strategy.central_epsilon())
        save_checkpoint(run_dir, server_round, model.state_dict(),
                        {"strategy": strategy.state_dict(), "central": recorder.central})
        log(INFO, "%s", line)
        return MetricRecord({k: float(v) for k, v in scores.items()})

    initial = ArrayRecord(model.state_dict())
    remaining = fed.rounds - strategy.offset
    last_round = fed.rounds
    try:
        if remaining < 1:  # every round had finished: only the post-training steps were left
            raise FederationStopped("", initial, fed.rounds)
        result = strategy.start(
            grid=grid,
            initial_arrays=initial,
            num_rounds=remaining,
            timeout=fed.round_timeout,
            train_config=ConfigRecord({"run-dir": str(run_dir.resolve())}),
            evaluate_fn=central_evaluation,
        )
        final = result.arrays if len(result.arrays) else initial  # empty when no site ever trained
    except FederationStopped as stopped:
        final, last_round = stopped.arrays, stopped.last_round
    model.load_state_dict(final.to_torch_state_dict())

    def say(message: str, step: tuple[str, int, int] | None = None) -> None:
        log(INFO, "fedclinic: %s", message)
        recorder.note(message, step)

    personalization = personalize_sites(grid, final, config, run_dir, last_round=last_round, say=say)
    found = post_training(model, test_set, config, run_dir, device=device, say=say)
    recorder.finish(
        model,
        test_set.class_names,
        strategy.site_metrics,
        strategy_seconds=time.time() - started,
        stop_reason=strategy.stop_reason,
        central_epsilon=strategy.central_epsilon(),
        post_training=found,
        personalization=personalization,
    )
    log(INFO, "fedclinic: run written to %s", run_dir)
