"""The site-aware FedAvg: a hand-computed weighted mean, sites that decline, an early end."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping

from fedclinic.config import load_config
from fedclinic.strategies.fedavg import FederationStopped, build_strategy

LOCAL = load_config(None, ["federation.min-sites=2"])


def reply(arrays: dict, *, n: int, site: int, loss: float, eps: float, declined: bool = False) -> Message:
    metrics = {"num-examples": n, "site-weight": 1.0, "site": site, "declined": int(declined), "train-loss": loss,
               "train-seconds": 0.1, "steps": 3, "sigma": 1.0, "sample-rate": 0.1, "epsilon": eps, "budget": 8.0,
               "delta": 1e-5, "rounds-trained": 1}
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                          "metrics": MetricRecord(metrics)})
    if declined:
        content["status"] = ConfigRecord({"declined": f"site {site} declines"})
    return Message(content=content, dst_node_id=0, message_type="train")


def random_sites(seed: int, sizes) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"w": rng.normal(size=(3, 2)).astype(np.float32), "b": rng.normal(size=4).astype(np.float32)} for _ in sizes]


def test_weights_are_the_sample_weighted_mean_and_site_metrics_are_kept(flower_task):
    # Prepare: three sites of different sizes with known weights
    sizes, losses, eps = (100, 300, 600), (1.0, 0.5, 0.2), (2.0, 3.5, 1.0)
    arrays = random_sites(0, sizes)
    replies = [reply(a, n=n, site=i, loss=lo, eps=e) for i, (a, n, lo, e) in enumerate(zip(arrays, sizes, losses, eps))]
    strategy = build_strategy(LOCAL, sites=3, rounds=4)
    # Execute
    aggregate, metrics = strategy.aggregate_train(1, replies)
    # Assert: by hand, sum(n_k * w_k) / sum(n_k)
    total = sum(sizes)
    for key in ("w", "b"):
        expected = sum(a[key] * n for a, n in zip(arrays, sizes)) / total
        np.testing.assert_allclose(aggregate[key].numpy(), expected, rtol=1e-6)
    assert metrics["train-loss"] == pytest.approx((100 * 1.0 + 300 * 0.5 + 600 * 0.2) / total)
    assert metrics["max-epsilon"] == 3.5
    assert metrics["mean-epsilon"] == pytest.approx((2.0 + 3.5 + 1.0) / 3)
    assert metrics["sites"] == 3 and metrics["num-examples"] == total
    assert [(m["round"], m["site"], m["epsilon"]) for m in strategy.site_metrics] == [(1, 0, 2.0), (1, 1, 3.5), (1, 2, 1.0)]
    assert strategy.stop_reason == ""


def test_the_aggregate_does_not_depend_on_which_site_replied_first(flower_task):
    rng = np.random.default_rng(1)
    sites = [({"w": rng.normal(size=1000).astype(np.float32)}, int(n)) for n in rng.integers(50, 500, size=6)]
    forward = [reply(a, n=n, site=i, loss=0.1, eps=1.0) for i, (a, n) in enumerate(sites)]
    backward = [reply(a, n=n, site=i, loss=0.1, eps=1.0) for i, (a, n) in reversed(list(enumerate(sites)))]
    first, _ = build_strategy(LOCAL, sites=6, rounds=4).aggregate_train(1, forward)
    second, _ = build_strategy(LOCAL, sites=6, rounds=4).aggregate_train(1, backward)
    assert np.array_equal(first["w"].numpy(), second["w"].numpy())  # bit for bit: reruns reproduce


def test_a_site_that_declined_is_left_out_of_the_mean_but_its_spending_is_kept(flower_task):
    sizes = (100, 300, 600)
    arrays = random_sites(2, sizes)
    replies = [reply(arrays[0], n=100, site=0, loss=1.0, eps=2.0),
               reply(arrays[1], n=300, site=1, loss=0.5, eps=7.9, declined=True),
               reply(arrays[2], n=600, site=2, loss=0.2, eps=1.0)]
    strategy = build_strategy(LOCAL, sites=3, rounds=4)
    aggregate, metrics = strategy.aggregate_train(2, replies)
    expected = (arrays[0]["w"] * 100 + arrays[2]["w"] * 600) / 700
    np.testing.assert_allclose(aggregate["w"].numpy(), expected, rtol=1e-6, atol=1e-7)
    assert metrics["sites"] == 2 and metrics["num-examples"] == 700
    assert [(m["site"], m["declined"], m["epsilon"]) for m in strategy.site_metrics] == [(0, 0, 2.0), (1, 1, 7.9),
                                                                                          (2, 0, 1.0)]
    assert strategy.declines == ["site 1 declines"]
    assert strategy.stop_reason == ""  # two sites still train: federation.min-sites=2


def test_too_few_sites_left_ends_the_run_with_the_last_global_model(flower_task):
    arrays = random_sites(3, (100, 300))
    strategy = build_strategy(LOCAL, sites=2, rounds=4)
    replies = [reply(arrays[0], n=100, site=0, loss=1.0, eps=2.0),
               reply(arrays[1], n=300, site=1, loss=0.5, eps=7.9, declined=True)]
    aggregate, _ = strategy.aggregate_train(3, replies)
    np.testing.assert_allclose(aggregate["w"].numpy(), arrays[0]["w"])  # the one site that trained
    assert strategy.stop_reason.startswith("the run ended early, after round 3 of 4: only 1 site(s) trained")
    with pytest.raises(FederationStopped) as stopped:
        strategy.configure_train(4, aggregate, ConfigRecord(), grid=None)  # no message is sent
    assert stopped.value.last_round == 3 and stopped.value.arrays is aggregate


def test_the_last_round_with_few_sites_is_not_an_early_end(flower_task):
    arrays = random_sites(4, (100, 300))
    strategy = build_strategy(LOCAL, sites=2, rounds=4)
    strategy.aggregate_train(4, [reply(arrays[0], n=100, site=0, loss=1.0, eps=2.0),
                                 reply(arrays[1], n=300, site=1, loss=0.5, eps=7.9, declined=True)])
    assert strategy.stop_reason == ""


def test_central_dp_wraps_fedavg_in_flowers_accounted_fixed_clipping(flower_task):
    central = load_config(None, ["privacy.mode=both", "privacy.central-noise-multiplier=1.5",
                                 "privacy.central-clipping-norm=0.5", "federation.fraction-train=0.5"])
    strategy = build_strategy(central, sites=6, rounds=4)
    dp = strategy.strategy
    assert isinstance(dp, DifferentialPrivacyServerSideFixedClipping)
    assert (dp.noise_multiplier, dp.clipping_norm, dp.num_sampled_clients) == (1.5, 0.5, 3)
    assert dp.strategy.weighted_by_key == "site-weight"  # every site weighs the same under central DP
    assert strategy.central_epsilon() == 0.0  # nothing released yet
    assert build_strategy(LOCAL, sites=6, rounds=4).central_epsilon() is None


def test_a_failed_sites_reason_reads_as_one_line():
    from fedclinic.strategies.fedavg import failure

    assert failure("<class 'fedclinic.data.files.DataError'>:<'/x/site.npz: is not an .npz archive'>") == \
        "DataError: /x/site.npz: is not an .npz archive"
    assert failure("Error: Node Unavailable — no heartbeat\n") == "Error: Node Unavailable — no heartbeat"
