"""The site-aware strategies: hand-computed aggregates, sites that decline, an early end, central DP, the resume."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg, FedProx

from fedclinic.config import ROBUST, STRATEGIES, load_config
from fedclinic.server.checkpoint import load_checkpoint, save_checkpoint
from fedclinic.strategies.build import build_strategy
from fedclinic.strategies.server_optimizers import STRATEGIES as FLOWER_CLASSES, is_server_optimizer, optimizer_state
from fedclinic.strategies.sites import FederationStopped, failure

LOCAL = load_config(None, ["federation.min-sites=2"])
# the strategies that step from the weighted mean of the replies (the robust aggregators: tests/test_poisoning.py)
MEAN_BASED = [name for name in STRATEGIES if name not in ROBUST]


def reply(arrays: dict, *, n: int, site: int, loss: float, eps: float, declined: bool = False,
          steps: int = 3) -> Message:
    metrics = {"num-examples": n, "site-weight": 1.0, "site": site, "declined": int(declined), "train-loss": loss,
               "train-seconds": 0.1, "steps": steps, "sigma": 1.0, "sample-rate": 0.1, "epsilon": eps, "budget": 8.0,
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
    assert failure("<class 'fedclinic.data.files.DataError'>:<'/x/site.npz: is not an .npz archive'>") == \
        "DataError: /x/site.npz: is not an .npz archive"
    assert failure("Error: Node Unavailable — no heartbeat\n") == "Error: Node Unavailable — no heartbeat"


# ---- every strategy of federation.strategy: Flower's classes, checked against the papers' update rules ----

# hyperparameters away from Flower's defaults, so that a key that did not reach Flower shows
HYPER = {
    "fedavg": [],
    "fedprox": ["federation.proximal-mu=0.1"],
    "fedavgm": ["federation.server-learning-rate=0.7", "federation.server-momentum=0.9"],
    "fedadam": ["federation.server-learning-rate=0.05", "federation.beta-1=0.8", "federation.beta-2=0.95",
                "federation.tau=0.01"],
    "fedyogi": ["federation.server-learning-rate=0.05", "federation.beta-1=0.8", "federation.beta-2=0.95",
                "federation.tau=0.01"],
    "fedadagrad": ["federation.server-learning-rate=0.1", "federation.tau=0.01"],
}


def configured(name: str, *settings: str):
    return load_config(None, ["federation.min-sites=2", f"federation.strategy={name}", *HYPER[name], *settings])


def strategy_and_paper(name: str, *settings: str):
    """The strategy of a 3-site, 4-round federation, and the update rule from its paper."""
    config = configured(name, *settings)
    return build_strategy(config, sites=3, rounds=4), PaperStep(config)


class Connected:
    """What a strategy asks Flower's Grid while it configures a round: which SuperNodes are connected.

    Nothing is sent here: the replies below are built by hand, as the sites would send them.
    """

    def __init__(self, sites: int) -> None:
        self.ids = list(range(1, sites + 1))

    def get_node_ids(self) -> list[int]:
        return list(self.ids)


class PaperStep:
    """The server update of each strategy written out from its paper, in float64 (Flower's code is what is tested).

    FedAvgM: Hsu et al. 2019, v <- beta v + (x - mean), x <- x - lr v.
    FedAdam, FedYogi, FedAdagrad: Reddi et al. 2021, Algorithm 2, with d = mean - x,
    m <- beta1 m + (1 - beta1) d and x <- x + eta m / (sqrt(v) + tau).
    """

    def __init__(self, config) -> None:
        self.fed = config.federation
        self.m: dict | None = None
        self.v: dict | None = None

    def __call__(self, t: int, x: dict, mean: dict) -> dict:
        fed, name = self.fed, self.fed.strategy
        x = {k: v.astype(np.float64) for k, v in x.items()}
        if name in ("fedavg", "fedprox"):
            return mean
        if name == "fedavgm":
            pull = {k: x[k] - mean[k] for k in x}
            self.m = pull if self.m is None else {k: fed.server_momentum * self.m[k] + pull[k] for k in x}
            return {k: x[k] - fed.server_learning_rate * self.m[k] for k in x}
        d = {k: mean[k] - x[k] for k in x}
        b1, b2 = (0.0, 0.0) if name == "fedadagrad" else (fed.beta_1, fed.beta_2)
        m = self.m or {k: 0 * d[k] for k in x}
        v = self.v or {k: 0 * d[k] for k in x}
        self.m = {k: b1 * m[k] + (1 - b1) * d[k] for k in x}
        if name == "fedadam":
            self.v = {k: b2 * v[k] + (1 - b2) * d[k] ** 2 for k in x}
        elif name == "fedyogi":
            self.v = {k: v[k] - (1 - b2) * d[k] ** 2 * np.sign(v[k] - d[k] ** 2) for k in x}
        else:  # fedadagrad
            self.v = {k: v[k] + d[k] ** 2 for k in x}
        eta = fed.server_learning_rate
        if name == "fedadam":  # Flower adds Adam's bias correction (Kingma & Ba), counting round t as step t + 1
            eta *= np.sqrt(1 - b2 ** (t + 1)) / (1 - b1 ** (t + 1))
        return {k: x[k] + eta * self.m[k] / (np.sqrt(self.v[k]) + fed.tau) for k in x}


SIZES = (100, 300, 600)


def global_model(seed: int = 10) -> dict:
    rng = np.random.default_rng(seed)
    return {"w": rng.normal(size=(3, 2)).astype(np.float32), "b": rng.normal(size=4).astype(np.float32)}


def site_updates(x: dict, seed: int) -> list[dict]:
    """What three sites send back after training from `x`: the model moved by a site's own step."""
    rng = np.random.default_rng(seed)
    return [{k: (v + rng.normal(scale=0.1, size=v.shape)).astype(np.float32) for k, v in x.items()} for _ in SIZES]


def replies_to(x: dict, seed: int, declined: tuple[int, ...] = ()) -> tuple[list[Message], list[dict]]:
    """(replies, the updates of the sites that trained); a declined site sends the model back unchanged."""
    updates = site_updates(x, seed)
    replies = [reply(x if i in declined else a, n=n, site=i, loss=0.5, eps=1.0, declined=i in declined)
               for i, (a, n) in enumerate(zip(updates, SIZES))]
    return replies, [(a, n) for i, (a, n) in enumerate(zip(updates, SIZES)) if i not in declined]


def weighted_mean(updates: list[tuple[dict, int]]) -> dict:
    total = sum(n for _, n in updates)
    return {k: sum(a[k].astype(np.float64) * n for a, n in updates) / total for k in updates[0][0]}


def run_round(strategy, t: int, x: dict, replies: list[Message]):
    messages = list(strategy.configure_train(t, ArrayRecord({k: Array(v) for k, v in x.items()}), ConfigRecord(),
                                             Connected(len(SIZES))))
    aggregate, metrics = strategy.aggregate_train(t, replies)
    return messages, aggregate, metrics


def numpy_of(record: ArrayRecord) -> dict:
    return {k: v.numpy() for k, v in record.items()}


def assert_close(got: ArrayRecord, expected: dict) -> None:
    for key, value in expected.items():
        np.testing.assert_allclose(got[key].numpy(), value, rtol=1e-5, atol=1e-6, err_msg=key)


def test_every_strategy_name_is_one_of_flowers_classes():
    assert set(FLOWER_CLASSES) == set(STRATEGIES)


@pytest.mark.parametrize("name", MEAN_BASED)
def test_each_strategy_turns_two_rounds_of_site_replies_into_the_papers_update(flower_task, name):
    # Prepare: the strategy with non-default hyperparameters, and the update rule from its paper
    strategy, paper = strategy_and_paper(name)
    x = global_model()
    for t in (1, 2):
        replies, updates = replies_to(x, seed=t)
        # Execute
        messages, aggregate, metrics = run_round(strategy, t, x, replies)
        # Assert: the weighted mean of what the sites sent, then the server's step from it
        assert_close(aggregate, paper(t, x, weighted_mean(updates)))
        assert all(a.dtype == "float32" for a in aggregate.values())  # the sites' dtype, also after FedAdam's step
        assert metrics["sites"] == 3 and metrics["num-examples"] == sum(SIZES)
        assert len(messages) == 3
        x = numpy_of(aggregate)
    sent = messages[0].content["config"]
    assert sent.get("proximal-mu") == (0.1 if name == "fedprox" else None)  # only FedProx asks sites for a pull
    assert type(strategy.strategy) is FLOWER_CLASSES[name][0]


@pytest.mark.parametrize("name", MEAN_BASED)
def test_declined_sites_stay_out_of_every_strategys_step_and_too_few_end_the_run(flower_task, name):
    strategy, paper = strategy_and_paper(name)
    x0 = global_model()
    # Execute: round 1 site 1 declines; round 2 sites 1 and 2 decline, one site is left to train
    replies, trained = replies_to(x0, seed=1, declined=(1,))
    _, first, metrics = run_round(strategy, 1, x0, replies)
    x1 = numpy_of(first)
    replies, alone = replies_to(x1, seed=2, declined=(1, 2))
    _, second, _ = run_round(strategy, 2, x1, replies)
    # Assert: each step is taken from the mean of the sites that trained only
    assert_close(first, paper(1, x0, weighted_mean(trained)))
    assert metrics["sites"] == 2 and metrics["num-examples"] == 700
    assert_close(second, paper(2, x1, weighted_mean(alone)))
    assert strategy.declines == ["site 1 declines", "site 2 declines"]
    assert strategy.stop_reason.startswith("the run ended early, after round 2 of 4: only 1 site(s) trained")
    with pytest.raises(FederationStopped) as stopped:
        strategy.configure_train(3, second, ConfigRecord(), Connected(3))
    assert stopped.value.last_round == 2 and stopped.value.arrays is second


@pytest.mark.parametrize("name", MEAN_BASED)
def test_a_round_in_which_no_site_trained_moves_neither_the_model_nor_the_optimizer(flower_task, name):
    strategy = build_strategy(configured(name), sites=3, rounds=4)
    x0 = global_model()
    run_round(strategy, 1, x0, replies_to(x0, seed=1)[0])
    before = optimizer_state(strategy.strategy)
    # Execute: every site declines round 2
    _, aggregate, metrics = run_round(strategy, 2, x0, replies_to(x0, seed=2, declined=(0, 1, 2))[0])
    # Assert: no new model (Flower keeps the last one), the server optimizer's state untouched
    assert aggregate is None and metrics is None
    after = optimizer_state(strategy.strategy)
    assert before.keys() == after.keys() and all(_same(before[k], after[k]) for k in before)
    assert "only 0 site(s) trained" in strategy.stop_reason


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(u, v) for u, v in zip(a, b))
    return a == b


CENTRAL = ["privacy.mode=both", "privacy.central-noise-multiplier=0.8", "privacy.central-clipping-norm=0.3"]


@pytest.mark.parametrize("name", MEAN_BASED)
def test_central_dp_releases_the_mean_and_the_server_optimizer_steps_from_that_release(flower_task, name):
    # Prepare: Flower's accounted central-DP FedAvg, the reference for the private mean, and the strategy
    # under test; the same numpy seed gives both the same noise
    x0 = global_model()
    dp_fedavg, _ = strategy_and_paper("fedavg", *CENTRAL)
    np.random.seed(5)
    _, release, _ = run_round(dp_fedavg, 1, x0, replies_to(x0, seed=1)[0])
    strategy, paper = strategy_and_paper(name, *CENTRAL)
    # Execute
    np.random.seed(5)
    messages, aggregate, _ = run_round(strategy, 1, x0, replies_to(x0, seed=1)[0])
    # Assert: the step from the noisy mean (post-processing), with the same site-level epsilon
    assert_close(aggregate, paper(1, x0, numpy_of(release)))
    assert strategy.central_epsilon() == dp_fedavg.central_epsilon() > 0
    dp = strategy.strategy
    assert isinstance(dp, DifferentialPrivacyServerSideFixedClipping)
    if is_server_optimizer(name):  # Flower's wrapper averages with a plain FedAvg; the optimizer steps after it
        assert type(dp.strategy) is FedAvg and type(strategy.server_optimizer) is FLOWER_CLASSES[name][0]
    else:
        assert type(dp.strategy) is FLOWER_CLASSES[name][0] and strategy.server_optimizer is None
    assert messages[0].content["config"].get("proximal-mu") == (0.1 if name == "fedprox" else None)


@pytest.mark.parametrize("name, settings", [(name, []) for name in MEAN_BASED] + [("fedadam", CENTRAL),
                                                                                  ("fedavgm", CENTRAL)])
def test_a_strategy_restored_from_the_checkpoint_after_round_one_aggregates_round_two_as_if_never_stopped(
        flower_task, tmp_path, name, settings):
    # Prepare: one strategy trains round 1 and is checkpointed, as the server does after every round
    config = configured(name, *settings)
    going_on = build_strategy(config, sites=3, rounds=4)
    x0 = global_model()
    np.random.seed(1)
    _, first, _ = run_round(going_on, 1, x0, replies_to(x0, seed=1)[0])
    model = {k: torch.from_numpy(v.numpy()) for k, v in first.items()}
    save_checkpoint(tmp_path, 1, model, {"strategy": going_on.state_dict()})
    # Execute: a new server loads the checkpoint, and both train round 2 on the same replies
    found = load_checkpoint(tmp_path)
    resumed = build_strategy(config, sites=3, rounds=4)
    resumed.load_state_dict(found["state"]["strategy"], finished_rounds=found["round"])
    x1 = {k: v.numpy() for k, v in found["arrays"].items()}
    np.random.seed(2)
    _, expected, _ = run_round(going_on, 2, numpy_of(first), replies_to(x1, seed=2)[0])
    np.random.seed(2)
    _, got, _ = run_round(resumed, 1, x1, replies_to(x1, seed=2)[0])  # Flower counts the resumed run from 1
    # Assert: bit for bit the same model
    assert all(np.array_equal(got[k].numpy(), expected[k].numpy()) for k in expected)
    kept = found["state"]["strategy"]["server_optimizer"]
    if name in ("fedadam", "fedyogi", "fedadagrad"):
        assert all(isinstance(t, torch.Tensor) for t in [*kept["m_t"].values(), *kept["v_t"].values()])
    if name == "fedavgm":
        assert all(isinstance(t, torch.Tensor) for t in kept["momentum_vector"])


@pytest.mark.parametrize("name, keyword", [("fedavgm", "server_learning_rate"), ("fedadam", "eta"),
                                           ("fedyogi", "eta"), ("fedadagrad", "eta")])
def test_server_learning_rate_zero_is_flowers_own_default_for_the_strategy(name, keyword):
    config = load_config(None, [f"federation.strategy={name}", "federation.server-learning-rate=0"])
    strategy = build_strategy(config, sites=3, rounds=2).strategy
    assert getattr(strategy, keyword) == getattr(type(strategy)(), keyword)
    config = load_config(None, [f"federation.strategy={name}", "federation.server-learning-rate=0.3"])
    assert getattr(build_strategy(config, sites=3, rounds=2).strategy, keyword) == 0.3


def test_fedprox_sends_its_mu_through_flowers_central_dp_wrapper(flower_task):
    strategy = build_strategy(configured("fedprox", *CENTRAL), sites=3, rounds=2)
    assert isinstance(strategy.strategy.strategy, FedProx) and strategy.strategy.strategy.proximal_mu == 0.1
