"""FedAvg that knows about sites: their metrics, their budgets, and central DP.

    strategy = build_strategy(config, sites=5)
    result = strategy.start(...)      # raises FederationStopped when too few sites are left

`build_strategy` composes Flower's own pieces: FedAvg, optionally wrapped in
Flower's DifferentialPrivacyServerSideFixedClipping with its RDP accountant
(site-level DP), all inside `SiteRounds`, which keeps each site's reply
metrics, aggregates replies in site order, leaves out sites that declined a
round because their record-level budget would be exceeded, and ends the run
when fewer than `min_sites` sites still train.
"""

from __future__ import annotations

import re
import time
from logging import WARNING
from typing import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid, NeighboringRelation, PrivacyConfig, RdpAccountant, SamplingMethod
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg, Strategy

from fedclinic.config import Config


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


class SiteRounds(Strategy):
    """Wraps FedAvg (or Flower's central-DP wrapper around it) with what fedclinic needs to know about each site."""

    def __init__(self, strategy: Strategy, *, min_sites: int, rounds: int, sites: int = 0,
                 rejoin_wait: float = 0.0, fraction_train: float = 1.0) -> None:
        self.strategy = strategy
        self.rounds = rounds
        self.min_sites = min_sites
        self.sites, self.rejoin_wait, self.fraction_train = sites, rejoin_wait, fraction_train
        self.site_metrics: list[dict] = []  # one dict per (round, site) that replied, declined ones too
        self.declines: list[str] = []  # each site's reason, the first round it declined
        self.stop_reason = ""
        self.offset = 0  # rounds finished before a resume: Flower's round r is the federation's round r + offset

    def state_dict(self) -> dict:
        """What a resumed server needs to go on as if it had never stopped (JSON)."""
        dp = self._central()
        return {
            "site_metrics": self.site_metrics,
            "declines": self.declines,
            "stop_reason": self.stop_reason,
            "accountant": None if dp is None else dp.accountant.state_dict(),
        }

    def load_state_dict(self, state: dict, *, finished_rounds: int) -> None:
        self.site_metrics = list(state["site_metrics"])
        self.declines = list(state["declines"])
        self.stop_reason = state["stop_reason"]
        self.offset = finished_rounds
        dp = self._central()
        if dp is not None and state["accountant"] is not None:
            dp.accountant.load_state_dict(state["accountant"])

    def _central(self) -> DifferentialPrivacyServerSideFixedClipping | None:
        return self.strategy if isinstance(self.strategy, DifferentialPrivacyServerSideFixedClipping) else None

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
        return self.strategy.configure_train(server_round, arrays, config, grid)

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
        for msg in answered:
            self.site_metrics.append({"round": server_round, **dict(_metrics(msg.content))})
            self._note_decline(msg, server_round)
        trained = [msg for msg in answered if not _metrics(msg.content)["declined"]]
        if len(trained) < self.min_sites and server_round < self.rounds:
            self.stop_reason = (
                f"the run ended early, after round {server_round} of {self.rounds}: only {len(trained)} site(s) "
                f"trained in it, fewer than federation.min-sites={self.min_sites}"
            )
            log(WARNING, "fedclinic: %s", self.stop_reason)
        replies = [msg for msg in replies if msg.has_error() or not _metrics(msg.content)["declined"]]
        dp = self._central()
        if dp is not None:  # Flower's DP path refuses a whole round that holds a failed reply
            replies = [msg for msg in replies if not msg.has_error()]
        if dp is None or not replies:
            return self.strategy.aggregate_train(server_round, replies)
        # Central DP over the sites that trained: the noise on their sum stays sigma * C,
        # and the mean divides by how many they are. (A declined site's zero update cannot
        # stay in: Flower's clipping divides by the update's norm.)
        configured, dp.num_sampled_clients = dp.num_sampled_clients, len(replies)
        try:
            return dp.aggregate_train(server_round, replies)
        finally:
            dp.num_sampled_clients = configured

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

    def central_epsilon(self) -> float | None:
        """Site-level epsilon spent so far under central DP (None without it)."""
        spent = getattr(self.strategy, "privacy_spent", lambda: None)()
        return None if spent is None else float(spent.epsilon) if spent.num_releases else 0.0


def sites_per_round(config: Config, sites: int) -> int:
    """How many sites FedAvg samples per round (its own rule: a share, at least min-sites)."""
    fed = config.federation
    return min(sites, max(int(sites * fed.fraction_train), min(fed.min_sites, sites)))


def build_strategy(config: Config, *, sites: int, rounds: int) -> SiteRounds:
    """FedAvg for the configured privacy mode, wrapped in SiteRounds."""
    fed, privacy = config.federation, config.privacy
    min_sites = min(fed.min_sites, sites)
    strategy: Strategy = FedAvg(
        fraction_train=fed.fraction_train,
        fraction_evaluate=fed.fraction_evaluate,
        min_train_nodes=min_sites,
        min_evaluate_nodes=min_sites if fed.fraction_evaluate > 0 else 0,
        min_available_nodes=min_sites,
        # central DP needs every site to weigh the same; otherwise weigh by examples
        weighted_by_key="site-weight" if privacy.central else "num-examples",
        train_metrics_aggr_fn=aggregate_site_metrics,
    )
    if privacy.central:
        accountant = RdpAccountant(
            PrivacyConfig(
                target_delta=privacy.central_delta,
                population_size=sites,
                neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                # no amplification is claimed from sampling sites: the sample is not Poisson
                sampling_method=SamplingMethod.NO_AMPLIFICATION,
            )
        )
        strategy = DifferentialPrivacyServerSideFixedClipping(
            strategy,
            noise_multiplier=privacy.central_noise_multiplier,
            clipping_norm=privacy.central_clipping_norm,
            num_sampled_clients=sites_per_round(config, sites),
            accountant=accountant,
        )
    return SiteRounds(strategy, min_sites=min_sites, rounds=rounds, sites=sites, rejoin_wait=fed.rejoin_wait,
                      fraction_train=fed.fraction_train)
