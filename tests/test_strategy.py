"""The DP-aware FedAvg: weights and metrics aggregated as a hand-computed weighted mean."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from fedclinic.strategies.fedavg import SiteFedAvg


def reply(arrays: dict, *, n: int, site: int, loss: float, eps: float) -> Message:
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
            "metrics": MetricRecord({"num-examples": n, "site": site, "train-loss": loss, "epsilon": eps,
                                     "sigma": 1.0, "delta": 1e-5, "rounds-trained": 1, "train-seconds": 0.1}),
        }
    )
    return Message(content=content, dst_node_id=0, message_type="train")


def test_weights_are_the_sample_weighted_mean_and_site_metrics_are_kept(flower_task):
    # Prepare: three sites of different sizes with known weights
    rng = np.random.default_rng(0)
    sites = [
        ({"w": rng.normal(size=(3, 2)).astype(np.float32), "b": rng.normal(size=4).astype(np.float32)}, n, loss, eps)
        for n, loss, eps in ((100, 1.0, 2.0), (300, 0.5, 3.5), (600, 0.2, 1.0))
    ]
    replies = [reply(a, n=n, site=i, loss=loss, eps=eps) for i, (a, n, loss, eps) in enumerate(sites)]
    strategy = SiteFedAvg(min_available_nodes=1)
    # Execute
    arrays, metrics = strategy.aggregate_train(1, replies)
    # Assert: by hand, sum(n_k * w_k) / sum(n_k)
    total = sum(n for _, n, _, _ in sites)
    for key in ("w", "b"):
        expected = sum(a[key] * n for a, n, _, _ in sites) / total
        np.testing.assert_allclose(arrays[key].numpy(), expected, rtol=1e-6)
    assert metrics["train-loss"] == pytest.approx((100 * 1.0 + 300 * 0.5 + 600 * 0.2) / total)
    assert metrics["max-epsilon"] == 3.5
    assert metrics["mean-epsilon"] == pytest.approx((2.0 + 3.5 + 1.0) / 3)
    assert metrics["sites"] == 3 and metrics["num-examples"] == total
    assert [(m["round"], m["site"], m["epsilon"]) for m in strategy.site_metrics] == [(1, 0, 2.0), (1, 1, 3.5), (1, 2, 1.0)]


def test_the_aggregate_does_not_depend_on_which_site_replied_first(flower_task):
    rng = np.random.default_rng(1)
    sites = [({"w": rng.normal(size=1000).astype(np.float32)}, int(n)) for n in rng.integers(50, 500, size=6)]
    forward = [reply(a, n=n, site=i, loss=0.1, eps=1.0) for i, (a, n) in enumerate(sites)]
    backward = [reply(a, n=n, site=i, loss=0.1, eps=1.0) for i, (a, n) in reversed(list(enumerate(sites)))]
    first, _ = SiteFedAvg(min_available_nodes=1).aggregate_train(1, forward)
    second, _ = SiteFedAvg(min_available_nodes=1).aggregate_train(1, backward)
    assert np.array_equal(first["w"].numpy(), second["w"].numpy())  # bit for bit: reruns reproduce
