"""What the ServerApp does after every round: score the global model centrally, record it, checkpoint it.

    evaluation = CentralEvaluation(model, test_set, config, recorder, strategy, run_dir, device=device)
    strategy.start(..., evaluate_fn=evaluation)       # Flower calls it with (round, arrays) after each round

The score is on the server's test set (and the cheap FGSM check of every round
when robustness.round-check-eps is set, and the backdoor's success rate under
federation.attack=backdoor); the round goes to the run's
progress file and results, and the model and the strategy's state to
checkpoint.pt, so that `simulate --resume` can go on from the last round.
"""

from __future__ import annotations

import time
from logging import INFO
from pathlib import Path

from flwr.app import ArrayRecord, MetricRecord
from flwr.common.logger import log
from torch import nn

from fedclinic.analysis.adversarial import fgsm_check
from fedclinic.config import Config
from fedclinic.data import ImageSet
from fedclinic.evaluation import backdoor_success_rate, evaluate
from fedclinic.report import RunRecorder
from fedclinic.server.checkpoint import save_checkpoint
from fedclinic.server.post_training import sample
from fedclinic.strategies.sites import SiteRounds


class CentralEvaluation:
    """Flower's `evaluate_fn`: the global model after a round, scored, recorded, logged and checkpointed."""

    def __init__(self, model: nn.Module, test_set: ImageSet, config: Config, recorder: RunRecorder,
                 strategy: SiteRounds, run_dir: Path, *, device, resumed: bool = False) -> None:
        self.model, self.test_set, self.config, self.recorder = model, test_set, config, recorder
        self.strategy, self.run_dir, self.device, self.resumed = strategy, run_dir, device, resumed
        self.check_eps = config.robustness.round_check_eps
        self.checked = sample(test_set, config.robustness.max_images, seed=config.data.seed)

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        t0 = time.perf_counter()
        self.model.load_state_dict(arrays.to_torch_state_dict())
        scores = evaluate(self.model, self.test_set, box_weight=self.config.model.box_weight, device=self.device)
        if self.resumed and server_round == 0:  # the checkpoint's model, recorded before the server stopped
            return MetricRecord({k: float(v) for k, v in scores.items()})
        server_round += self.strategy.offset
        if self.check_eps and server_round > 0:  # the cheap robustness check of every round
            scores["fgsm_accuracy"] = fgsm_check(self.model, self.checked, self.check_eps,
                                                 device=self.device)["robust_accuracy"]
        if self.config.federation.attack == "backdoor":  # the share of triggered test images the attack owns
            scores["backdoor_success_rate"] = backdoor_success_rate(
                self.model, self.test_set, target=self.config.federation.backdoor_target, device=self.device)
        scores["seconds"] = time.perf_counter() - t0
        line = self.recorder.central_round(server_round, scores, self.strategy.site_metrics,
                                           self.strategy.central_epsilon())
        save_checkpoint(self.run_dir, server_round, self.model.state_dict(),
                        {"strategy": self.strategy.state_dict(), "central": self.recorder.central})
        log(INFO, "%s", line)
        return MetricRecord({k: float(v) for k, v in scores.items()})
