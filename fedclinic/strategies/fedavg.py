"""Sample-weighted FedAvg that also aggregates the sites' privacy and loss metrics.

Flower's FedAvg averages the weights by `num-examples`; this subclass keeps
each site's own metrics (epsilon, sigma, loss) per round, and reduces them to
what a privacy officer asks first: the largest epsilon any site has spent.
"""

from __future__ import annotations

from typing import Iterable

from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg


def aggregate_site_metrics(records: list[RecordDict], weighting_key: str) -> MetricRecord:
    """Mean training loss weighted by examples; max and mean epsilon over sites."""
    metrics = [next(iter(r.metric_records.values())) for r in records]
    weights = [float(m[weighting_key]) for m in metrics]
    total = sum(weights)
    eps = [float(m["epsilon"]) for m in metrics]
    return MetricRecord(
        {
            "train-loss": sum(w * float(m["train-loss"]) for w, m in zip(weights, metrics)) / total,
            "max-epsilon": max(eps),
            "mean-epsilon": sum(eps) / len(eps),
            "sites": len(metrics),
            "num-examples": int(total),
        }
    )


def _site_of(msg: Message) -> tuple[int, int]:
    if msg.has_error():
        return (1, msg.metadata.src_node_id)
    return (0, int(next(iter(msg.content.metric_records.values()))["site"]))


class SiteFedAvg(FedAvg):
    """FedAvg that remembers every site's reply metrics, round by round."""

    def __init__(self, **kwargs) -> None:
        kwargs.setdefault("train_metrics_aggr_fn", aggregate_site_metrics)
        super().__init__(**kwargs)
        self.site_metrics: list[dict] = []  # one dict per (round, site) that trained

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        # in site order, not arrival order: float sums then do not depend on which site
        # finished first, and a rerun with the same seed aggregates the same way
        replies = sorted(replies, key=_site_of)
        for msg in replies:
            if not msg.has_error():
                metrics = next(iter(msg.content.metric_records.values()))
                self.site_metrics.append({"round": server_round, **dict(metrics)})
        return super().aggregate_train(server_round, replies)
