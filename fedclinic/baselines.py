"""Pooled and single-site (silo) baselines: what the federation's model is measured against.

    fedclinic baselines runs/NAME              (or: fedclinic simulate --baselines)

    from fedclinic.baselines import run_baselines
    found = run_baselines(config, say=print)  # {"pooled": {...}, "silo": {...}, "initial": {...}, ...}

Flower-free, in one process. Every baseline is the federation's model
(build_model), starts from the ServerApp's initial global model (initial_model:
torch seeded with data.seed), trains as a site trains in the federation,
round by round without the averaging: train_locally under the run's training,
privacy and robustness settings, each round with that round's seed and
learning-rate share, federation.rounds × training.local-epochs passes over
its data in all; and is scored with `evaluate` on the server's test set
(server_test_set):

- pooled, non-private: the union of every site's training split, privacy off.
- pooled, DP-SGD (record-level DP only, privacy.mode local or both): one
  DP-SGD run over the union, sigma calibrated by the sites' own planner
  (make_plan) to the run's target (epsilon, delta) for the union's size,
  batch size and epochs, also when the run fixes privacy.noise-multiplier.
- silo: each site alone on its own training split at its own budget
  (privacy.budget), with the sigma its federated ledger plan has for the
  rounds alone (a site alone has no global model to fine-tune, so, like the
  pooled model, it spends its whole budget on its rounds) and its hard stop
  (a fixed sigma trains only the rounds the budget allows), scored on the
  server's test set and on the site's own validation split, where the
  federation's sites score their global and personalised models too.

Under privacy.mode=central there is no record-level epsilon: pooled and silo
train without DP, and `note` says so. Seeds: site k trains round r with the seed of
its own federated round r (training_seed(config, k, r)), pooled with site 0's;
the same configuration gives the same numbers (on the CPU). Like a simulated
site, which Ray gives OMP_NUM_THREADS = federation.client-cpus, the baselines
train with that many torch threads.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Callable

import numpy as np
import torch
from torch import nn

from fedclinic.clients.site import training_seed
from fedclinic.clients.training import round_lr_scale, train_locally
from fedclinic.config import Config, PrivacyConfig
from fedclinic.data import ImageSet, server_test_set, site_data, union
from fedclinic.device import resolve_device
from fedclinic.evaluation import evaluate, summarize
from fedclinic.model import build_model, initial_model
from fedclinic.privacy.accounting import epsilon, plan_sites
from fedclinic.privacy.ledger import make_plan
from fedclinic.report.text import format_metric


def privacy_note(config: Config) -> str:
    """How the baselines of this configuration are private, in one sentence (results' `note`)."""
    p = config.privacy
    if p.local:
        return (f"record-level DP-SGD: pooled at the run's target epsilon {p.target_epsilon:g} (delta {p.delta:g}), "
                "each silo site at its own budget; the non-private pooled model without DP")
    if p.central:
        return ("privacy.mode=central has no record-level epsilon, and site-level DP has no counterpart for a "
                "model trained in one place: pooled and silo are trained without DP")
    return "privacy.mode=off: pooled and silo are trained without DP, like the federation"


def train_copy(config: Config, data: ImageSet, start: dict, *, privacy: PrivacyConfig, sigma: float, rounds: int,
               site: int) -> tuple[nn.Module, dict]:
    """The initial model trained on `data` as `site` trains in the federation, round by round, without the averaging.

    Each round is train_locally for training.local-epochs with that round's seed
    (training_seed) and learning-rate share (round_lr_scale); returns the model
    and what it spent.
    """
    model = build_model(config, data, start).to(resolve_device(config.training.device))
    history, seconds = [], 0.0
    # rounds is 0 for a site whose fixed sigma leaves no round within its budget: it trains nothing, as in the federation
    for r in range(1, rounds + 1):
        result = train_locally(model, data, training=config.training, privacy=privacy, robustness=config.robustness,
                               box_weight=config.model.box_weight, noise_multiplier=sigma,
                               seed=training_seed(config, site, r),
                               lr_scale=round_lr_scale(config.training, r, config.federation.rounds))
        history.append((sigma, result.sample_rate, result.steps))
        seconds += result.seconds
    private = privacy.local
    spent = {
        "n": len(data),
        "epochs": rounds * config.training.local_epochs,
        "seed": training_seed(config, site, 1),
        "steps": sum(steps for _, _, steps in history),
        "sigma": sigma if private else None,
        "sample_rate": history[0][1] if private and history else None,
        # from what was trained, by the project's accountant
        "epsilon": epsilon(history, delta=privacy.delta, accountant=privacy.accountant) if private else None,
        "delta": privacy.delta if private else None,
        "seconds": seconds,
    }
    return model, spent


def score(config: Config, model: nn.Module, data: ImageSet) -> dict:
    """evaluate(): loss, accuracy, f1, iou and n of `model` on `data`."""
    return evaluate(model, data, box_weight=config.model.box_weight, device=resolve_device(config.training.device))


def describe(name: str, entry: dict) -> str:
    """A progress line: what was trained, on how much, what it spent and how it scored on the server's test set."""
    eps = "" if entry["epsilon"] is None else f", sigma {entry['sigma']:.3f}, eps {entry['epsilon']:.2f} spent"
    test = entry["test"]
    return (f"  baseline {name}: {entry['n']} images, {entry['epochs']} epoch(s){eps}: test accuracy "
            f"{format_metric(test['accuracy'])}, IoU {format_metric(test['iou'])} [{entry['seconds']:.0f} s]")


def pooled(config: Config, parts: list[ImageSet], test_set: ImageSet, start: dict,
           say: Callable[[str], None], *, non_private: bool = True) -> dict:
    """Every site's training split in one place: non-private (unless `non_private` is False), and with DP-SGD."""
    t, p, rounds = config.training, config.privacy, config.federation.rounds
    data = union(parts)
    found = {"sites": len(parts), "note": privacy_note(config), "non_private": None, "private": None}
    if non_private:
        model, spent = train_copy(config, data, start, privacy=dataclasses.replace(p, mode="off"), sigma=0.0,
                                  rounds=rounds, site=0)
        found["non_private"] = {**spent, "test": score(config, model, test_set)}
        say(describe("pooled, non-private", found["non_private"]))
    if p.local:
        plan = make_plan(num_examples=len(data), batch_size=t.batch_size, local_epochs=t.local_epochs, rounds=rounds,
                         privacy=dataclasses.replace(p, noise_multiplier=0.0), budget=p.target_epsilon)
        model, spent = train_copy(config, data, start, privacy=p, sigma=plan.noise_multiplier, rounds=rounds, site=0)
        found["private"] = {**spent, "target_epsilon": p.target_epsilon, "test": score(config, model, test_set)}
        say(describe("pooled, DP-SGD", found["private"]))
    return found


def silo(config: Config, splits: list[tuple[ImageSet, ImageSet]], test_set: ImageSet, start: dict,
         say: Callable[[str], None]) -> dict:
    """Each site alone on its own training split, at its own budget; scored on the test set and its own val split."""
    t, p, rounds = config.training, config.privacy, config.federation.rounds
    # the sites' ledger plans: sigma for each one's budget, and how many rounds that budget allows; a site alone
    # has no global model to fine-tune, so its whole budget goes to its rounds, as the pooled model's does
    plans = plan_sites([len(train) for train, _ in splits], batch_size=t.batch_size, local_epochs=t.local_epochs,
                       rounds=rounds, target_epsilon=p.target_epsilon, delta=p.delta, accountant=p.accountant,
                       noise_multiplier=p.noise_multiplier, budgets=p.budgets(), finetune_epochs=0) if p.local else None
    privacy = p if p.local else dataclasses.replace(p, mode="off")
    sites = []
    for k, (train, val) in enumerate(splits):
        plan = plans[k] if plans else {"noise_multiplier": 0.0, "rounds_within_budget": rounds, "budget": None}
        model, spent = train_copy(config, train, start, privacy=privacy, sigma=plan["noise_multiplier"],
                                  rounds=plan["rounds_within_budget"], site=k)
        row = {"site": k, "budget": plan["budget"], **spent, "test": score(config, model, test_set),
               "val": score(config, model, val)}
        sites.append(row)
        say(describe(f"silo site {k}", row)
            + f"; own validation accuracy {format_metric(row['val']['accuracy'])} (n={row['val']['n']})")
    return {"private": p.local, "note": privacy_note(config), "sites": sites,
            "max_epsilon": max(s["epsilon"] for s in sites) if p.local else None,  # the most any site spent
            "test": summarize([s["test"] for s in sites]), "val": summarize([s["val"] for s in sites])}


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to `n` inside the block and restored after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_baselines(config: Config, say: Callable[[str], None] = lambda message: None, *,
                  non_private: bool = True, on_step: Callable[[str, int, int], None] | None = None) -> dict:
    """The pooled and silo baselines of `config` (see the module's docstring), with the initial model's scores.

    `non_private=False` leaves out the non-private pooled model (the sweep trains it once, at its baseline point).
    `say` gets one line per model trained, and `on_step("baselines", done, total)` is told of each.
    """
    started = time.perf_counter()
    fed = config.federation
    total, done = int(non_private) + int(config.privacy.local) + fed.sites, itertools.count(1)
    if on_step is not None:
        line = say

        def say(message: str) -> None:  # each line is one model trained
            line(message)
            on_step("baselines", next(done), total)

    test_set = server_test_set(config.data)
    first = initial_model(config, test_set)
    start = {k: v.detach().clone() for k, v in first.state_dict().items()}
    splits = [site_data(config.data, k, fed.sites) for k in range(fed.sites)]
    # a site's threads: on a machine the other sites (or other jobs) share, more threads only contend
    with torch_threads(fed.client_cpus):
        found = {
            "initial": score(config, first.to(resolve_device(config.training.device)), test_set),
            "pooled": pooled(config, [train for train, _ in splits], test_set, start, say, non_private=non_private),
            "silo": silo(config, splits, test_set, start, say),
        }
    found["threads"] = fed.client_cpus
    found["seconds"] = time.perf_counter() - started
    return found
