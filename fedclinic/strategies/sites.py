"""The site bookkeeping around Flower's strategy: each site's metrics, its budget, the early end, the resume.

    strategy = build_strategy(config, sites=5, rounds=4)      # strategies/build.py
    result = strategy.start(...)      # raises FederationStopped when too few sites are left

`SiteRounds` wraps the Flower strategy of the run (FedAvg, FedProx, a server
optimizer, or Flower's central-DP wrapper around one): it keeps each site's
reply metrics, aggregates replies in site order, leaves out sites that
declined a round because their record-level budget would be exceeded, ends
the run when fewer than `min_sites` sites still train, and gives a resumed
server the state it had, the server optimizer's included.
"""

from __future__ import annotations

import re
import time
from logging import INFO, WARNING
from typing import Iterable

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg, Strategy

from fedclinic.poisoning.validation import clip_update, norm_outliers, reply_problem, update_norm
from fedclinic.strategies.server_optimizers import load_optimizer_state, optimizer_state, step_from_mean


class FederationStopped(Exception):
    """Too few sites are left to train; carries the last global model."""

    def __init__(self, reason: str, arrays: ArrayRecord, last_round: int) -> None:
        super().__init__(reason)
        self.reason, self.arrays, self.last_round = reason, arrays, last_round


def wait_for_sites(grid: Grid, expected: int, *, timeout: float) -> int:
    """Wait until `expected` SuperNodes are connected (or `timeout` s); returns how many are."""
    deadline = time.monotonic() + timeout
    while True:
        count = len(list(grid.get_node_ids()))
        if count >= expected or time.monotonic() > deadline:
            return count
        time.sleep(0.2)


def failure(reason: str) -> str:
    """Flower's error reason as one line: "<class 'pkg.DataError'>:<'text'>" becomes "DataError: text"."""
    found = re.fullmatch(r"<class '(?:[\w.]*\.)?(\w+)'>:<'(.*)'>", reason.strip(), re.S)
    if found:
        return f"{found[1]}: {found[2]}"
    return (reason.strip().splitlines() or ["no reason given"])[-1]


def _metrics(record: RecordDict) -> MetricRecord:
    return next(iter(record.metric_records.values()))


def aggregate_site_metrics(records: list[RecordDict], weighting_key: str) -> MetricRecord:
    """Mean training loss weighted by examples over sites that trained; max and mean epsilon over all."""
    metrics = [_metrics(r) for r in records]
    trained = [m for m in metrics if not m["declined"]] or metrics
    total = sum(float(m["num-examples"]) for m in trained)
    eps = [float(m["epsilon"]) for m in metrics]
    return MetricRecord(
        {
            "train-loss": sum(float(m["num-examples"]) * float(m["train-loss"]) for m in trained) / total,
            "max-epsilon": max(eps),
            "mean-epsilon": sum(eps) / len(eps),
            "sites": len(trained),
            "num-examples": int(total),
        }
    )


def _site_of(msg: Message) -> tuple[int, int]:
    if msg.has_error():
        return (1, msg.metadata.src_node_id)
    return (0, int(_metrics(msg.content)["site"]))


def _arrays_of(msg: Message) -> dict:
    """A reply's model as numpy arrays, by name."""
    return {k: a.numpy() for k, a in next(iter(msg.content.array_records.values())).items()}


def refusals(sent: ArrayRecord, replies: list[Message], *, norm_ratio: float) -> tuple[dict[int, str], dict[int, float]]:
    """({site: why its reply cannot be aggregated}, {site: its update's norm}) for the replies of sites that trained,
    against the model `sent`: arrays that are not the model's, NaN or inf, an update norm (per square root of the
    site's local steps) far outside the others' (poisoning/validation.py). A reply whose arrays are unusable has no
    norm."""
    model = {k: a.numpy() for k, a in sent.items()}
    refused, norms, steps = {}, {}, {}
    for msg in replies:
        metrics = _metrics(msg.content)
        site, arrays = int(metrics["site"]), _arrays_of(msg)
        problem = reply_problem(model, arrays)
        if problem is None:
            norms[site], steps[site] = update_norm(model, arrays), int(metrics.get("steps", 1))
        else:
            refused[site] = problem
    return {**refused, **norm_outliers(norms, ratio=norm_ratio, steps=steps)}, norms


def clipped(sent: ArrayRecord, msg: Message, *, max_norm: float) -> None:
    """Scale the update of reply `msg` down to `max_norm` in place, when its norm is larger (clip_update)."""
    model = {k: a.numpy() for k, a in sent.items()}
    name, record = next(iter(msg.content.array_records.items()))
    arrays = clip_update(model, _arrays_of(msg), max_norm=max_norm)
    msg.content[name] = ArrayRecord({k: Array(arrays[k]) for k in record.keys()})


def _dtypes(replies: list[Message]) -> dict:
    """The dtype of each array of the sites' models (read before aggregating: FedMedian empties the replies)."""
    arrays = next((_arrays_of(m) for m in replies if not m.has_error()), {})
    return {k: a.dtype for k, a in arrays.items()}


def _in_dtypes(arrays: ArrayRecord, dtypes: dict) -> ArrayRecord:
    """`arrays` in the dtypes of the sites' models.

    FedAdam's bias-corrected step size is a numpy float64, which promotes
    float32 weights to float64; the sites, the server's model and the
    checkpoint hold float32, so a resumed run would start from other numbers
    than the uninterrupted one goes on with.
    """
    if all(arrays[k].dtype == dtypes[k] for k in arrays):
        return arrays
    return ArrayRecord({k: Array(a.numpy().astype(dtypes[k])) for k, a in arrays.items()})


class SiteRounds(Strategy):
    """Wraps the run's Flower strategy with what fedclinic needs to know about each site.

    `strategy` sends each round and averages the replies: FedAvg, FedProx or a
    server optimizer, or Flower's central-DP wrapper around FedAvg or FedProx.
    `server_optimizer` (FedAvgM or a FedOpt strategy, under central DP only)
    then steps the global model from that wrapper's private mean.
    """

    def __init__(self, strategy: Strategy, *, min_sites: int, rounds: int, sites: int = 0,
                 rejoin_wait: float = 0.0, fraction_train: float = 1.0,
                 server_optimizer: FedAvg | None = None, reply_norm_ratio: float = 0.0,
                 update_clip_norm: float = 0.0) -> None:
        self.strategy = strategy
        self.reply_norm_ratio, self.update_clip_norm = reply_norm_ratio, update_clip_norm
        self.sent: ArrayRecord | None = None  # the global model of the round, which the replies are checked against
        self.server_optimizer = server_optimizer
        self.rounds = rounds
        self.min_sites = min_sites
        self.sites, self.rejoin_wait, self.fraction_train = sites, rejoin_wait, fraction_train
        # one dict per (round, site) that replied, declined ones too; "refused": why the server left its reply out
        self.site_metrics: list[dict] = []
        self.declines: list[str] = []  # each site's reason, the first round it declined
        self.stop_reason = ""
        self.offset = 0  # rounds finished before a resume: Flower's round r is the federation's round r + offset

    def state_dict(self) -> dict:
        """What a resumed server needs to go on as if it had never stopped (JSON, and tensors for the optimizer)."""
        dp = self._central()
        return {
            "site_metrics": self.site_metrics,
            "declines": self.declines,
            "stop_reason": self.stop_reason,
            "accountant": None if dp is None else dp.accountant.state_dict(),
            "server_optimizer": optimizer_state(self._stepping()),
        }

    def load_state_dict(self, state: dict, *, finished_rounds: int) -> None:
        self.site_metrics = list(state["site_metrics"])
        self.declines = list(state["declines"])
        self.stop_reason = state["stop_reason"]
        self.offset = finished_rounds
        dp = self._central()
        if dp is not None and state["accountant"] is not None:
            dp.accountant.load_state_dict(state["accountant"])
        load_optimizer_state(self._stepping(), state.get("server_optimizer", {}))

    def _central(self) -> DifferentialPrivacyServerSideFixedClipping | None:
        return self.strategy if isinstance(self.strategy, DifferentialPrivacyServerSideFixedClipping) else None

    def _stepping(self) -> Strategy:
        """The Flower strategy whose aggregate is the new global model, and so holds any server-optimizer state."""
        if self.server_optimizer is not None:
            return self.server_optimizer
        dp = self._central()
        return self.strategy if dp is None else dp.strategy

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        server_round += self.offset
        if self.stop_reason:
            raise FederationStopped(self.stop_reason, arrays, server_round - 1)
        present = len(list(grid.get_node_ids()))
        if server_round > 1 and self.rejoin_wait and present < self.sites:  # a crashed site may come back
            present = wait_for_sites(grid, self.sites, timeout=self.rejoin_wait)
        if present < self.min_sites:  # Flower's FedAvg would wait for them for ever
            self.stop_reason = (
                f"the run ended early, before round {server_round} of {self.rounds}: only {present} site(s) are "
                f"connected, fewer than federation.min-sites={self.min_sites}"
            )
            log(WARNING, "fedclinic: %s", self.stop_reason)
            raise FederationStopped(self.stop_reason, arrays, server_round - 1)
        if present < self.sites:
            log(WARNING, "fedclinic: round %d starts with %d of %d sites connected", server_round, present, self.sites)
        dp = self._central()
        if dp is not None:  # Flower's accountant checks its event against the sites FedAvg samples now
            dp.num_sampled_clients = min(present, max(int(present * self.fraction_train), self.min_sites))
        self.sent = arrays
        messages = self.strategy.configure_train(server_round, arrays, config, grid)
        if self.server_optimizer is not None:  # it records the model it will step from; what it would send is not sent
            self.server_optimizer.configure_train(server_round, arrays, ConfigRecord(), grid)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.offset
        # in site order, not arrival order: float sums then do not depend on which site
        # finished first, and a rerun with the same seed aggregates the same way
        replies = sorted(replies, key=_site_of)
        answered = [msg for msg in replies if not msg.has_error()]
        for msg in replies:
            if msg.has_error():  # e.g. a site whose data file is unusable, or a SuperNode that went away
                log(WARNING, "fedclinic: round %d: node %d failed and is left out: %s", server_round,
                    msg.metadata.src_node_id, failure(msg.error.reason))
        trained = [msg for msg in answered if not _metrics(msg.content)["declined"]]
        # before any strategy sees them (central DP and the robust aggregators too)
        refused, norms = ({}, {}) if self.sent is None else refusals(self.sent, trained,
                                                                     norm_ratio=self.reply_norm_ratio)
        for msg in answered:
            site = int(_metrics(msg.content)["site"])
            # update-norm: before any clipping (None for a declined site, or arrays that are not the model's)
            self.site_metrics.append({"round": server_round, **dict(_metrics(msg.content)),
                                      "refused": refused.get(site, ""), "update-norm": norms.get(site)})
            self._note_decline(msg, server_round)
            if site in refused:
                log(WARNING, "fedclinic: round %d: site %d's reply is refused and left out: %s", server_round, site,
                    refused[site])
        trained = [msg for msg in trained if int(_metrics(msg.content)["site"]) not in refused]
        if self.update_clip_norm and self.sent is not None:  # norm bounding, before any strategy too
            for msg in trained:
                clipped(self.sent, msg, max_norm=self.update_clip_norm)
        if len(trained) < self.min_sites and server_round < self.rounds:
            self.stop_reason = (
                f"the run ended early, after round {server_round} of {self.rounds}: only {len(trained)} site(s) "
                f"trained in it, fewer than federation.min-sites={self.min_sites}"
            )
            log(WARNING, "fedclinic: %s", self.stop_reason)
        kept = {id(msg) for msg in trained}
        replies = [msg for msg in replies if msg.has_error() or id(msg) in kept]
        dtypes = _dtypes(replies)
        dp = self._central()
        if dp is not None:  # Flower's DP path refuses a whole round that holds a failed reply
            replies = [msg for msg in replies if not msg.has_error()]
        if dp is None or not replies:
            arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        else:
            # Central DP over the sites that trained: the noise on their sum stays sigma * C,
            # and the mean divides by how many they are. (A declined site's zero update cannot
            # stay in: Flower's clipping divides by the update's norm.)
            configured, dp.num_sampled_clients = dp.num_sampled_clients, len(replies)
            try:
                arrays, metrics = dp.aggregate_train(server_round, replies)
            finally:
                dp.num_sampled_clients = configured
        if arrays is None:  # nobody trained: the model, and any optimizer's moments, stay where they were
            return None, metrics
        if self.server_optimizer is not None:  # a step from the private mean: post-processing, no privacy spent
            arrays = step_from_mean(self.server_optimizer, server_round, arrays)
        return _in_dtypes(arrays, dtypes), metrics

    def _note_decline(self, msg: Message, server_round: int) -> None:
        if "status" in msg.content.config_records:
            site = int(_metrics(msg.content)["site"])
            if not any(m["site"] == site and m["declined"] for m in self.site_metrics[:-1]):
                reason = str(msg.content.config_records["status"]["declined"])
                self.declines.append(reason)
                log(WARNING, "fedclinic: %s", reason)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round + self.offset, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round + self.offset, replies)

    def summary(self) -> None:
        self.strategy.summary()
        if self.server_optimizer is not None:
            log(INFO, "\t└──> then %s steps from the central-DP mean:", type(self.server_optimizer).__name__)
            self.server_optimizer.summary()

    def central_epsilon(self) -> float | None:
        """Site-level epsilon spent so far under central DP (None without it)."""
        spent = getattr(self.strategy, "privacy_spent", lambda: None)()
        return None if spent is None else float(spent.epsilon) if spent.num_releases else 0.0
