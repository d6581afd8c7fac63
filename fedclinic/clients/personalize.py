"""After the federation: a site fine-tunes the global model on its own data ("FL + fine-tuning").

    metrics, declined = personalize_site(config, site, state_dict, server_round=rounds + 1)

Flower-free; the handler in clients/app.py serves the server's one
"evaluate.personalize" message after the last round. The site scores the
global model on its own validation split, fine-tunes a copy of it on its own
training split for personalize.epochs epochs with the local training of a
round (train_locally: the seed of the round after the last one, the last
round's learning-rate share), and scores the personalised copy on the same
split. As in FLamby's and FL4Health's "FL + fine-tuning".

Privacy. Under record-level DP the fine-tuning is DP-SGD at the site's
planned sigma and sample rate, charged to its ledger as one more release
(kind "fine-tuning"). The plan calibrated sigma for it before round 1
(plan_once), so the rounds and the fine-tuning together meet the budget. A
site whose budget the fine-tuning would exceed declines it and spends
nothing, as it would a round. The personalised model never leaves the site:
the reply holds the validation scores only, aggregate statistics of the site's
validation records that DP-SGD does not cover.
"""

from __future__ import annotations

import dataclasses
import math

from torch import nn

from fedclinic.clients.site import Site, fingerprint, keep, plan_once, resend, training_seed
from fedclinic.clients.training import round_lr_scale, train_locally
from fedclinic.config import Config, check_site_size
from fedclinic.data import ImageSet
from fedclinic.device import resolve_device
from fedclinic.evaluation import SCORES, evaluate
from fedclinic.model import build_model
from fedclinic.privacy.accounting import steps_per_epoch
from fedclinic.privacy.ledger import FINETUNING, Ledger

# the metrics of the last fine-tuning, kept beside the ledger: a resumed server that asks again is sent them
PERSONALIZED = "last_personalization.pt"


def personalize_site(config: Config, site: Site, state_dict: dict, *, server_round: int) -> tuple[dict, str]:
    """Score the global model `state_dict`, fine-tune a copy, score it: (metrics for the server, reason if declined).

    `server_round` numbers the fine-tuning: the round after the last one the
    federation trained. The metrics: site, num-examples (the validation split's),
    global-* and personalized-* (accuracy, f1, iou; personalized-* NaN when the
    site declined), epsilon (spent, the fine-tuning included) and declined.
    """
    with Ledger.locked(site.state_dir, site=site.index) as ledger:
        return _personalize(config, site, ledger, state_dict, server_round)


def _scores(config: Config, model: nn.Module, data: ImageSet) -> dict:
    return evaluate(model, data, box_weight=config.model.box_weight, device=resolve_device(config.training.device))


def _metrics(site: Site, ledger: Ledger, before: dict, after: dict | None) -> dict:
    metrics = {"site": site.index, "num-examples": before["n"], "epsilon": ledger.epsilon(),
               "declined": int(after is None)}
    for key in SCORES:
        metrics[f"global-{key}"] = before[key]
        metrics[f"personalized-{key}"] = math.nan if after is None else after[key]
    return metrics


def _personalize(config: Config, site: Site, ledger: Ledger, state_dict: dict, server_round: int):
    train, val = site.data(config)
    if site.data_path is not None:  # a deployed site: only it knows its size, so it checks itself
        check_site_size(config, len(train), site=site.index)
    model = build_model(config, train, state_dict).to(resolve_device(config.training.device))
    before = _scores(config, model, val)
    epochs = config.personalize.epochs
    if epochs == 0:
        return _metrics(site, ledger, before, None), f"site {site.index} does not fine-tune: personalize.epochs is 0"
    sigma, sent = 0.0, fingerprint(state_dict, config)
    if config.privacy.local:
        plan = plan_once(config, site, ledger, len(train))
        repeat = resend(site, ledger, PERSONALIZED, server_round=server_round, kind=FINETUNING, sent=sent)
        if repeat is not None:  # asked again by a server resumed after the fine-tuning: the same scores again
            return repeat["metrics"], ""
        budget = min(site.budget(config), plan.target_epsilon)
        after = ledger.epsilon_after(epochs * steps_per_epoch(num_examples=len(train),
                                                              batch_size=config.training.batch_size))
        if after > budget:
            reason = (f"site {site.index} declines the fine-tuning: its epsilon would reach {after:.3f}, past its "
                      f"budget of {budget:g} (spent so far {ledger.epsilon():.3f} in {ledger.rounds_trained} rounds)")
            return _metrics(site, ledger, before, None), reason
        sigma = plan.noise_multiplier
    result = train_locally(
        model,
        train,
        training=dataclasses.replace(config.training, local_epochs=epochs),
        privacy=config.privacy,
        robustness=config.robustness,
        box_weight=config.model.box_weight,
        noise_multiplier=sigma,
        seed=training_seed(config, site.index, server_round),
        # the last round's share (the first round's when the run trained none)
        lr_scale=round_lr_scale(config.training, max(server_round - 1, 1), config.federation.rounds),
    )
    if config.privacy.local:
        ledger.record(round=server_round, noise_multiplier=sigma, sample_rate=result.sample_rate, steps=result.steps,
                      kind=FINETUNING)
    metrics = _metrics(site, ledger, before, _scores(config, model, val))
    if config.privacy.local:
        keep(site, PERSONALIZED, {"round": server_round, "sent": sent, "metrics": metrics})
    return metrics, ""
