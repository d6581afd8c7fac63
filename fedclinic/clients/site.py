"""What one hospital site does when the server asks: train a round, or evaluate.

Flower-free: the handlers in clients/app.py turn Flower records into these
calls and the returned dicts back into records.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from fedclinic.clients.training import resolve_device, train_locally
from fedclinic.config import Config
from fedclinic.data import ImageSet, load_site_file, site_data
from fedclinic.evaluation import evaluate
from fedclinic.model import MultiTaskNet
from fedclinic.privacy.ledger import Ledger, make_plan


@dataclass(frozen=True)
class Site:
    index: int  # partition-id in simulation
    count: int  # num-partitions in simulation
    state_dir: Path | None  # where the site's ledger lives; None keeps it in memory
    data_path: Path | None = None  # a deployed site's own .npz file; None = its simulated partition

    def data(self, config: Config) -> tuple[ImageSet, ImageSet]:
        """(train, val): the site's own file when it has one, else its share of the simulated data."""
        if self.data_path is not None:
            return load_site_file(self.data_path)
        return site_data(config.data, self.index, self.count)


def build_model(config: Config, data: ImageSet, state_dict: dict[str, torch.Tensor] | None = None) -> MultiTaskNet:
    model = MultiTaskNet(in_channels=data.channels, num_classes=data.num_classes, width=config.model.width)
    if state_dict is not None:
        model.load_state_dict(state_dict)
    return model


def train_round(config: Config, site: Site, state_dict: dict, *, server_round: int) -> tuple[dict, dict]:
    """One round of local training; returns (new state dict, metrics for the server)."""
    train, _ = site.data(config)
    model = build_model(config, train, state_dict)
    ledger = Ledger.open(site.state_dir, site=site.index)
    sigma = 0.0
    if config.privacy.local:
        if ledger.plan is None:  # calibrated once, before the first round, for all planned rounds
            ledger.set_plan(
                make_plan(
                    num_examples=len(train),
                    batch_size=config.training.batch_size,
                    local_epochs=config.training.local_epochs,
                    rounds=config.federation.rounds,
                    privacy=config.privacy,
                )
            )
        sigma = ledger.plan.noise_multiplier
    result = train_locally(
        model,
        train,
        training=config.training,
        privacy=config.privacy,
        box_weight=config.model.box_weight,
        noise_multiplier=sigma,
        seed=config.data.seed * 100_003 + site.index * 1009 + server_round,
    )
    if config.privacy.local:
        ledger.record(round=server_round, noise_multiplier=sigma, sample_rate=result.sample_rate, steps=result.steps)
    metrics = {
        "num-examples": result.num_examples,
        "site": site.index,
        "train-loss": result.loss,
        "train-seconds": result.seconds,
        "steps": result.steps,
        "sigma": result.noise_multiplier,
        "sample-rate": result.sample_rate,
        "epsilon": ledger.epsilon(),
        "delta": config.privacy.delta if config.privacy.local else 0.0,
        "rounds-trained": ledger.rounds_trained if config.privacy.local else server_round,
    }
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return state, metrics


def evaluate_round(config: Config, site: Site, state_dict: dict) -> dict:
    """The global model on the site's local validation split."""
    train, val = site.data(config)
    device = resolve_device(config.training.device)
    model = build_model(config, train, state_dict).to(device)
    scores = evaluate(model, val, box_weight=config.model.box_weight, device=device)
    return {
        "num-examples": scores["n"],
        "site": site.index,
        "loss": scores["loss"],
        "accuracy": scores["accuracy"],
        "f1": scores["f1"],
        "iou": scores["iou"],
    }
