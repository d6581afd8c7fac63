"""What one hospital site does when the server asks: train a round, or evaluate.

Flower-free: the handlers in clients/app.py turn Flower records into these
calls and the returned dicts back into records.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedclinic.atomic import atomic_file
from fedclinic.clients.training import round_lr_scale, train_locally
from fedclinic.config import Config, check_site_size
from fedclinic.data import ImageSet, load_site_file, site_data
from fedclinic.device import resolve_device
from fedclinic.evaluation import evaluate
from fedclinic.model import build_model
from fedclinic.poisoning.attacks import poison_data, poison_update
from fedclinic.privacy.ledger import ROUND, Ledger, Plan, make_plan


@dataclass(frozen=True)
class Site:
    index: int  # partition-id in simulation
    count: int  # num-partitions in simulation
    state_dir: Path | None  # where the site's ledger lives; None keeps it in memory
    data_path: Path | None = None  # a deployed site's own .npz file; None = its simulated partition
    max_epsilon: float | None = None  # a deployed site's own budget; None = privacy.site-budgets / target-epsilon
    # training records handed in whole, with no validation split (the canary audit's replay of a site,
    # fedclinic.canary_audit); None = its file or its simulated partition
    records: ImageSet | None = None

    def budget(self, config: Config) -> float:
        """The record-level epsilon this site will never exceed."""
        return self.max_epsilon if self.max_epsilon is not None else config.privacy.budget(self.index)

    def data(self, config: Config) -> tuple[ImageSet, ImageSet]:
        """(train, val): the records handed in, the site's own file, or its share of the simulated data."""
        if self.records is not None:
            return self.records, self.records.subset(np.arange(0))
        if self.data_path is not None:
            return load_site_file(self.data_path)
        return site_data(config.data, self.index, self.count)


def training_seed(config: Config, site: int, server_round: int) -> int:
    """The seed of a site's local training in a round (its batches, DP noise and attacks): one per site and round."""
    return config.data.seed * 100_003 + site * 1009 + server_round


def train_round(config: Config, site: Site, state_dict: dict, *, server_round: int,
                proximal_mu: float = 0.0) -> tuple[dict, dict, str]:
    """One round of local training: (new state dict, metrics for the server, reason if it declined).

    With record-level DP the site first checks its ledger: if this round would
    take its epsilon past its budget, it declines, spends nothing, and returns
    the model it was sent unchanged (a zero update) with `declined` = 1.
    `proximal_mu` > 0 is FedProx: the local loss gains mu/2 * ||w - w_global||^2.
    """
    with Ledger.locked(site.state_dir, site=site.index) as ledger:
        return _train_round(config, site, ledger, state_dict, server_round, proximal_mu)


def _train_round(config: Config, site: Site, ledger: Ledger, state_dict: dict, server_round: int, mu: float):
    train, _ = site.data(config)
    attack = config.federation.attack_of(site.index)  # "" for an honest site
    # a backdoor poisons the same images every round: its seed is the site's, not the round's
    train = poison_data(attack, train, target=config.federation.backdoor_target,
                        seed=training_seed(config, site.index, 0))
    if site.data_path is not None:  # a deployed site: only it knows its size, so it checks itself
        check_site_size(config, len(train), site=site.index)
    budget = site.budget(config)
    sigma = 0.0
    if config.privacy.local:
        sigma = plan_once(config, site, ledger, len(train)).noise_multiplier
        repeat = resend(site, ledger, REPLY, server_round=server_round, kind=ROUND,
                        sent=fingerprint(state_dict, config, mu))
        if repeat is not None:  # the server lost this round's aggregate (it was restarted): send the same update
            state, stats = repeat["state"], json.loads(repeat["stats"])
            metrics = _round_metrics(config, site, ledger, min(budget, ledger.plan.target_epsilon),
                                     num_examples=len(train), declined=False)
            return state, {**metrics, **stats}, ""
        # the budget agreed when the plan was made binds too: a restart with a larger one cannot raise it
        budget = min(budget, ledger.plan.target_epsilon)
        after = ledger.epsilon_after_round()
        if after > budget:
            reason = (
                f"site {site.index} declines round {server_round}: its epsilon would reach {after:.3f}, "
                f"past its budget of {budget:g} (spent so far {ledger.epsilon():.3f} in {ledger.rounds_trained} rounds)"
            )
            metrics = _round_metrics(config, site, ledger, budget, num_examples=len(train), declined=True)
            return state_dict, metrics, reason
    model = build_model(config, train, state_dict)
    result = train_locally(
        model,
        train,
        training=config.training,
        privacy=config.privacy,
        robustness=config.robustness,
        box_weight=config.model.box_weight,
        noise_multiplier=sigma,
        seed=training_seed(config, site.index, server_round),
        proximal_mu=mu,
        lr_scale=round_lr_scale(config.training, server_round, config.federation.rounds),
    )
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    # an attacker sends something else instead: post-processing of its release, the ledger is unchanged
    state = poison_update(attack, state_dict, state, boost=config.federation.attack_boost,
                          seed=training_seed(config, site.index, server_round))
    stats = {"train-loss": result.loss, "train-seconds": result.seconds, "steps": result.steps,
             "sigma": result.noise_multiplier, "sample-rate": result.sample_rate}
    if config.privacy.local:
        ledger.record(round=server_round, noise_multiplier=sigma, sample_rate=result.sample_rate, steps=result.steps)
        # after the ledger entry: a kept update is always a release the ledger holds
        keep(site, REPLY, {"round": server_round, "sent": fingerprint(state_dict, config, mu), "state": state,
                           "stats": json.dumps(stats)})
    metrics = _round_metrics(config, site, ledger, budget, num_examples=result.num_examples, declined=False)
    metrics.update({**stats, "rounds-trained": ledger.rounds_trained if config.privacy.local else server_round})
    return state, metrics, ""


REPLY = "last_reply.pt"
TRAINING_KEYS = ("data.", "model.", "training.", "privacy.", "robustness.train-", "personalize.")


def plan_once(config: Config, site: Site, ledger: Ledger, num_examples: int) -> Plan:
    """The site's plan: calibrated once, before its first release, for all planned rounds and the fine-tuning."""
    if ledger.plan is None:
        ledger.set_plan(
            make_plan(
                num_examples=num_examples,
                batch_size=config.training.batch_size,
                local_epochs=config.training.local_epochs,
                rounds=config.federation.rounds,
                privacy=config.privacy,
                budget=site.budget(config),
                finetune_epochs=config.personalize.epochs,
            )
        )
    return ledger.plan


def fingerprint(state_dict: dict, config: Config, proximal_mu: float = 0.0) -> str:
    """Of the global model a round starts from and of every setting that shapes local training.

    FedProx's mu is the one the server sent with the round, which is what trains.
    """
    shaping = {k: v for k, v in config.to_flat().items() if k.startswith(TRAINING_KEYS)}
    shaping["proximal-mu"] = proximal_mu
    digest = hashlib.sha256(json.dumps(shaping, sort_keys=True).encode())
    for key in sorted(state_dict):
        digest.update(key.encode())
        digest.update(state_dict[key].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def keep(site: Site, name: str, reply: dict) -> None:
    """Keep a reply beside the ledger (atomically), to resend if the server asks for the same release again."""
    if site.state_dir is None:
        return
    with atomic_file(site.state_dir / name) as f:
        torch.save(reply, f)


def resend(site: Site, ledger: Ledger, name: str, *, server_round: int, kind: str, sent: str) -> dict | None:
    """The reply `keep` kept under `name` for this very release, to send again; None when there is none.

    A server restarted from its checkpoint asks again for what it lost.
    Training again would spend the budget twice; sending the same reply again
    is post-processing of a release already in the ledger, and costs nothing
    more. So the reply counts only if the ledger's last release is this one
    (`server_round` and `kind`) and it was made from this very model and
    settings (`sent`, their fingerprint).
    """
    last = ledger.entries[-1] if ledger.entries else None
    path = None if site.state_dir is None else site.state_dir / name
    if last is None or (last.round, last.kind) != (server_round, kind) or path is None or not path.exists():
        return None
    try:
        reply = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # unreadable: train again, which the ledger charges, so nothing goes unaccounted
        return None
    return reply if reply["round"] == server_round and reply["sent"] == sent else None


def _round_metrics(config: Config, site: Site, ledger: Ledger, budget: float, *, num_examples: int,
                   declined: bool) -> dict:
    """The metrics every train reply carries (Flower's FedAvg needs the same keys in every reply)."""
    local = config.privacy.local
    return {
        "num-examples": num_examples,
        "site-weight": 1.0,  # FedAvg weight under central DP, where every site counts once
        "site": site.index,
        "declined": int(declined),
        "train-loss": 0.0,
        "train-seconds": 0.0,
        "steps": 0,
        "sigma": ledger.plan.noise_multiplier if local and ledger.plan else 0.0,
        "sample-rate": ledger.plan.sample_rate if local and ledger.plan else 0.0,
        "epsilon": ledger.epsilon(),
        "budget": budget if local else 0.0,
        "delta": config.privacy.delta if local else 0.0,
        "rounds-trained": ledger.rounds_trained,
    }


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
