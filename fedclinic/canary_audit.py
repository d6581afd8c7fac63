"""The one-run privacy audit: train the federation once more with canaries, guess which ones each site trained
on, and turn the right guesses into a lower bound on epsilon.

    fedclinic simulate --set privacy.audit-canaries=1000     (or: fedclinic audit runs/NAME --canaries 1000)

    from fedclinic.canary_audit import canary_audit
    audit = canary_audit(config, canaries=1000, work_dir=run_dir / "canary-audit")
    audit.summary["epsilon_lower_bound"], audit.summary["sites"][0]["epsilon_lower_bound"]

Steinke, Nasr & Jagielski 2023 ("Privacy auditing with one (1) training
run"): if every site's training is (eps, delta)-DP for each of its records,
no auditor guesses which of its coin-flipped canaries were trained on much
better than e^eps / (1 + e^eps) allows (fedclinic.privacy.canary_bound).
Flower-free, in this process, after the run:

- **Records.** Each synthetic site trains on fresh scans of its scanner and
  label mix, from a stream of their own
  (generate_reference_scans): the replay's final model has then seen none of
  the run's members or non-members, and is the reference model of the
  calibrated membership attack (analysis/audit.py). A site of a user's file
  trains on its own training split (no reference model then). With the
  canaries that came up, a site holds as many records as the run's site:
  the same sample rate, so the run's own sigma (`plans`), and the audit
  measures the run's mechanism itself.
- **Canaries.** `canaries` in all, shared out over the sites in proportion to
  their records (analysis/canaries.py). Each is put into its site's records
  by a fair coin from the auditor's own random source (the operating system's,
  unless a test passes `seed`). The coins never leave this function: a site
  gets only the union of its records and the canaries whose coin came up.
- **Training.** Every site trains every round with the ClientApp's own code
  (clients/site.py train_round: its ledger, its sigma calibrated for its
  records, its hard stop), its ledger in `work_dir`; the server averages the
  replies by their sizes (FedAvg). Any other server rule is post-processing
  of what the sites released, which is what the audit measures. The run's
  attackers, if any, stay honest here.
- **Kept out.** The run itself trains without canaries, so the run's model,
  its scores, its personalisation and the baselines never see one; the
  replay's model serves the audit only.
- **Bounds.** White-box (the server's view: every site's update in every
  round; analysis.canaries.round_evidence) per site over its canaries,
  against its ledger's epsilon after the rounds (what it released: the
  fine-tuning is local and never released), and for the federation over all
  canaries, against the largest site epsilon (a canary's coin changes one
  site's releases only). Black-box (the canaries' losses under the final
  model) for the federation, as a second line. A bound above the epsilon it
  is compared with is flagged as a likely privacy bug.
"""

from __future__ import annotations

import dataclasses
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from fedclinic.analysis.canaries import canary_losses, draw_coins, make_canaries, prepare, round_evidence
from fedclinic.clients.site import Site, train_round
from fedclinic.config import Config
from fedclinic.data import ImageSet, server_test_set, site_data, site_sizes, union
from fedclinic.data.synthetic import generate_reference_scans
from fedclinic.model import MultiTaskNet, initial_model
from fedclinic.privacy.accounting import sample_rate, steps_per_epoch
from fedclinic.privacy.canary_bound import epsilon_lower_bound_from_scores
from fedclinic.privacy.ledger import Ledger, Plan

CONFIDENCE = 0.95


@dataclass
class CanaryAudit:
    summary: dict  # what results.json's audit section gets (see docs/outputs.md)
    # the replay's final model when it trained on fresh reference scans: the calibrated attack's reference
    reference: MultiTaskNet | None
    # per canary, revealed after training: site, coin, white-box and black-box scores (canary_audit.json)
    canaries: dict = field(default_factory=dict)
    planted: list[ImageSet] = field(default_factory=list)  # each site's canaries, its coins' order
    coins: list[np.ndarray] = field(default_factory=list)  # the auditor's coins, True: put into the site's data


def share_out(total: int, sizes: list[int]) -> list[int]:
    """`total` split over sites in proportion to `sizes`, largest remainders first: sum(result) == total."""
    exact = np.asarray(sizes, dtype=float) * total / max(sum(sizes), 1)
    counts = np.floor(exact).astype(int)
    for k in np.argsort(-(exact - counts), kind="stable")[: total - counts.sum()]:
        counts[k] += 1
    return counts.tolist()


def site_records(config: Config, site: int, n: int, rng: np.random.Generator) -> tuple[ImageSet, str]:
    """`n` records for the replayed site to train on besides its canaries, and where they come from."""
    if config.data.path:
        train, _ = site_data(config.data, site, config.federation.sites)
        return train.subset(np.sort(rng.permutation(len(train))[:n])), "each site's own training split"
    return generate_reference_scans(config.data, site, n), "fresh scans of each synthetic site"


def seed_plan(config: Config, site: Site, plan: Plan | None) -> None:
    """Give the replayed site the run's own plan (its sigma) when the site has the run's size and settings, for
    which the sites' planner (make_plan) would calibrate the same sigma again; else the site plans itself."""
    t, p = config.training, config.privacy
    n = len(site.records)
    per_epoch = steps_per_epoch(num_examples=n, batch_size=t.batch_size)
    fits = plan is not None and (plan.sample_rate, plan.steps_per_round, plan.rounds, plan.target_epsilon, plan.delta,
                                 plan.accountant, plan.finetune_steps) == (
        sample_rate(num_examples=n, batch_size=t.batch_size), t.local_epochs * per_epoch, config.federation.rounds,
        site.budget(config), p.delta, p.accountant, config.personalize.epochs * per_epoch)
    if fits and p.local:
        Ledger.open(site.state_dir, site=site.index).set_plan(plan)


def honest(config: Config) -> Config:
    """The run's configuration with its simulated attackers honest: the audit measures the sites' DP-SGD."""
    federation = dataclasses.replace(config.federation, attackers="", attack="")
    return dataclasses.replace(config, federation=federation)


def fedavg(replies: list[tuple[dict, int]], sent: dict) -> dict:
    """The size-weighted mean of the replies' floating-point tensors; other tensors as sent."""
    total = sum(n for _, n in replies)
    return {name: (sum(state[name].double() * (n / total) for state, n in replies).to(tensor.dtype)
                   if tensor.is_floating_point() else tensor) for name, tensor in sent.items()}


def canary_audit(config: Config, *, canaries: int, work_dir: Path, seed: int | None = None,
                 plans: Sequence[Plan | None] | None = None,
                 on_round: Callable[[int, int], None] | None = None) -> CanaryAudit:
    """Replay the federation of `config` with `canaries` canaries and bound epsilon from them (module docstring).

    `work_dir` (emptied first) holds the replayed sites' ledgers. `plans`: the run's sites' plans (their
    ledgers'), which a replayed site of the same size takes instead of calibrating its sigma again.
    `on_round(done, total)` is told of each round.
    """
    started = time.perf_counter()
    config, fed = honest(config), config.federation
    rng = np.random.default_rng(secrets.randbits(128) if seed is None else seed)  # the auditor's alone
    shutil.rmtree(work_dir, ignore_errors=True)
    sizes = site_sizes(config.data, fed.sites)
    counts = share_out(canaries, sizes)
    coins = [draw_coins(rng, n) for n in counts]
    # as many records as the run's site holds, the canaries that came up included: the same size, so the same
    # sample rate and sigma as the run's own site
    records, records_from = zip(*(site_records(config, k, max(sizes[k] - int(c.sum()), 0), rng)
                                  for k, c in enumerate(coins)))
    planted = [make_canaries(rng, n, like=r) for n, r in zip(counts, records)]
    sites = [Site(index=k, count=fed.sites, state_dir=work_dir / f"site-{k}",
                  records=union([records[k], planted[k].subset(np.flatnonzero(coins[k]))]))
             for k in range(fed.sites)]
    for site, plan in zip(sites, plans or [None] * fed.sites):
        seed_plan(config, site, plan)
    model = initial_model(config, server_test_set(config.data))
    examples = [(prepare(model, c), prepare(model, r)) for c, r in zip(planted, records)]
    evidence = [{"decoding": np.zeros(n), "alignment": np.zeros(n)} for n in counts]
    state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    spent, training_seconds = [None] * fed.sites, 0.0
    for server_round in range(1, fed.rounds + 1):
        replies = []
        for k, site in enumerate(sites):
            reply, metrics, declined = train_round(config, site, state, server_round=server_round)
            if declined:
                continue
            training_seconds += metrics["train-seconds"]
            spent[k] = metrics["epsilon"]
            found = round_evidence(model, state, reply, *examples[k], box_weight=config.model.box_weight,
                                   clip=config.privacy.max_grad_norm)
            for name, values in found.items():
                evidence[k][name] += values
            replies.append((reply, metrics["num-examples"]))
        if replies:
            state = fedavg(replies, state)
        if on_round is not None:
            on_round(server_round, fed.rounds)
    model.load_state_dict(state)
    black_box = [-canary_losses(model, c, box_weight=config.model.box_weight) for c, _ in examples]
    summary = bounds(config, counts, coins, evidence, black_box, spent)
    summary.update(rounds=fed.rounds, records_from=records_from[0], training_seconds=training_seconds,
                   seconds=time.perf_counter() - started)
    per_canary = {"site": np.repeat(np.arange(fed.sites), counts).tolist(),
                  "included": np.concatenate(coins).tolist(),
                  **{name: np.concatenate([e[name] for e in evidence]).tolist() for name in evidence[0]},
                  "black_box": np.concatenate(black_box).tolist()}
    reference = None if config.data.path else model
    return CanaryAudit(summary, reference, per_canary, list(planted), coins)


def bounds(config: Config, counts: list[int], coins: list[np.ndarray], evidence: list[dict],
           black_box: list[np.ndarray], spent: list[float | None]) -> dict:
    """The bounds per site and for the federation, each beside the epsilon it is compared with."""
    delta = config.privacy.delta
    private = config.privacy.local
    sites = []
    for k, (n, included) in enumerate(zip(counts, coins)):
        found = (epsilon_lower_bound_from_scores(evidence[k], included, delta=delta, confidence=CONFIDENCE)
                 if n else {"epsilon_lower_bound": 0.0, "guesses": 0, "correct": 0, "guesser": None})
        sites.append({"site": k, "canaries": n, "included": int(included.sum()),
                      "epsilon": spent[k] if private else None, "epsilon_lower_bound": found["epsilon_lower_bound"],
                      "guesses": found["guesses"], "correct": found["correct"], "guesser": found["guesser"]})
    included = np.concatenate(coins)
    pooled = {name: np.concatenate([e[name] for e in evidence]) for name in evidence[0]}
    white = epsilon_lower_bound_from_scores(pooled, included, delta=delta, confidence=CONFIDENCE)
    black = epsilon_lower_bound_from_scores(np.concatenate(black_box), included, delta=delta, confidence=CONFIDENCE)
    epsilon = max((s["epsilon"] for s in sites if s["epsilon"] is not None), default=None) if private else None
    exceeded = [s["site"] for s in sites if s["epsilon"] is not None and s["epsilon_lower_bound"] > s["epsilon"]]
    federation_exceeded = epsilon is not None and white["epsilon_lower_bound"] > epsilon
    return {
        "canaries": int(sum(counts)), "confidence": CONFIDENCE, "delta": delta,
        "epsilon_lower_bound": white["epsilon_lower_bound"], "epsilon": epsilon,
        "guesses": white["guesses"], "correct": white["correct"], "guesser": white["guesser"],
        "black_box": {k: black[k] for k in ("epsilon_lower_bound", "guesses", "correct")},
        "likely_privacy_bug": bool(exceeded or federation_exceeded),
        "sites_exceeding": exceeded,
        "sites": sites,
    }
