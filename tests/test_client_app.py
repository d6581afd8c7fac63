"""The ClientApp's Flower handlers, called the way the runtime calls them."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedclinic.clients.app import app
from fedclinic.config import ConfigError, load_config
from fedclinic.model import MultiTaskNet
from fedclinic.privacy.accounting import plan_sites, rounds_within
from fedclinic.privacy.ledger import Ledger


def context(config, partition: int) -> Context:
    return Context(run_id=1, node_id=partition + 1, node_config={"partition-id": partition, "num-partitions": 2},
                   state=RecordDict(), run_config=config.to_flat())


def message(kind: str, model, run_dir, server_round: int = 1) -> Message:
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                          "config": ConfigRecord({"server-round": server_round, "run-dir": str(run_dir)})})
    return Message(content=content, dst_node_id=1, message_type=kind)


def test_train_reply_carries_weights_and_privacy_metrics_and_writes_the_site_ledger(flower_task, tmp_path):
    config = load_config(None, ["data.site-size=200", "training.batch-size=32", "training.local-epochs=1"])
    torch.manual_seed(0)
    model = MultiTaskNet(in_channels=1, num_classes=3, width=config.model.width)
    reply = app(message("train", model, tmp_path), context(config, 1))
    assert not reply.has_error(), reply.error
    arrays = reply.content["arrays"].to_torch_state_dict()
    assert arrays.keys() == model.state_dict().keys()
    metrics = reply.content["metrics"]
    assert metrics["site"] == 1 and metrics["num-examples"] > 0
    assert 0 < metrics["epsilon"] < config.privacy.target_epsilon and metrics["sigma"] > 0
    ledger = Ledger.open(tmp_path / "sites" / "site-1", site=1)
    assert ledger.rounds_trained == 1 and ledger.epsilon() == metrics["epsilon"]


def test_evaluate_reply_scores_the_global_model_on_the_site_validation_split(flower_task, tmp_path):
    config = load_config(None, ["data.site-size=200", "training.batch-size=32"])
    model = MultiTaskNet(in_channels=1, num_classes=3, width=config.model.width)
    reply = app(message("evaluate", model, tmp_path), context(config, 0))
    assert not reply.has_error(), reply.error
    metrics = reply.content["metrics"]
    assert metrics["num-examples"] > 0 and 0 <= metrics["accuracy"] <= 1
    assert "arrays" not in reply.content  # evaluation sends nothing but metrics back


def site_file(path, n: int = 96):
    """A site file of n 3-channel 20x20 images without boxes, 4 classes."""
    rng = np.random.default_rng(0)
    np.savez(path, train_images=rng.integers(0, 256, (n, 20, 20, 3), dtype=np.uint8),
             train_labels=rng.integers(0, 4, (n, 1)), val_images=rng.integers(0, 256, (20, 20, 20, 3), dtype=np.uint8),
             val_labels=rng.integers(0, 4, (20, 1)))


def deployed(config, tmp_path, *, site: int, max_epsilon: float | None = None) -> Context:
    """A deployed SuperNode's context: its site id, its own file tmp_path/site.npz, its state dir tmp_path/state."""
    node = {"site-id": site, "data-path": str(tmp_path / "site.npz"), "state-dir": str(tmp_path / "state")}
    if max_epsilon is not None:
        node["max-epsilon"] = max_epsilon
    return Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config=config.to_flat())


def test_a_site_with_a_data_path_trains_on_its_own_file_only(flower_task, tmp_path):
    # Prepare: a site file of 3-channel 20x20 images without boxes
    n = 96
    site_file(tmp_path / "site.npz", n)
    config = load_config(None, ["training.batch-size=32", "training.local-epochs=1"])
    model = MultiTaskNet(in_channels=3, num_classes=4, width=config.model.width)
    ctx = deployed(config, tmp_path, site=0)
    # Execute
    reply = app(message("train", model, tmp_path / "unused"), ctx)
    # Assert: trained on the file's 96 images, ledger in the node's own state-dir
    assert not reply.has_error(), reply.error
    assert reply.content["metrics"]["num-examples"] == n
    assert Ledger.open(tmp_path / "state", site=0).rounds_trained == 1
    assert not (tmp_path / "unused").exists()


def test_a_site_declines_the_round_that_would_exceed_its_budget_and_spends_nothing(flower_task, tmp_path):
    # Prepare: a deployed site with a fixed sigma and its own budget, set between the epsilon
    # the calculator predicts after round 2 and after round 3
    site_file(tmp_path / "site.npz", 96)
    config = load_config(None, ["training.batch-size=32", "training.local-epochs=1", "privacy.noise-multiplier=1.0"])
    (plan,) = plan_sites([96], batch_size=32, local_epochs=1, rounds=4, target_epsilon=8.0, delta=1e-5,
                         noise_multiplier=1.0)
    budget = (plan["epsilon_by_round"][1] + plan["epsilon_by_round"][2]) / 2
    assert rounds_within(plan["epsilon_by_round"], budget) == 2
    ctx = deployed(config, tmp_path, site=0, max_epsilon=budget)
    model = MultiTaskNet(in_channels=3, num_classes=4, width=config.model.width)
    # Execute: rounds 1 and 2 train, round 3 would exceed the budget
    replies = [app(message("train", model, tmp_path, server_round=r), ctx) for r in (1, 2, 3)]
    # Assert
    trained, declined = replies[1].content["metrics"], replies[2].content["metrics"]
    assert (trained["declined"], declined["declined"]) == (0, 1)
    assert trained["epsilon"] == pytest.approx(plan["epsilon_by_round"][1], rel=1e-9)
    assert declined["epsilon"] == trained["epsilon"] <= budget  # nothing spent in round 3
    assert declined["budget"] == budget and declined["rounds-trained"] == 2
    sent = model.state_dict()
    back = replies[2].content["arrays"].to_torch_state_dict()
    assert all(torch.equal(sent[k], back[k]) for k in sent)  # a zero update
    assert "would reach" in replies[2].content["status"]["declined"]
    ledger = Ledger.open(tmp_path / "state", site=0)
    assert [e.round for e in ledger.entries] == [1, 2] and ledger.epsilon() <= budget


def test_a_deployed_site_sends_back_only_model_arrays_and_scalar_metrics(flower_task, tmp_path):
    # Prepare: a deployed SuperNode's node config: its site id, its own file and state directory
    site_file(tmp_path / "site.npz", 96)
    config = load_config(None, ["training.batch-size=32", "training.local-epochs=1"])
    model = MultiTaskNet(in_channels=3, num_classes=4, width=config.model.width)
    ctx = deployed(config, tmp_path, site=2)
    # Execute
    reply = app(message("train", model, tmp_path / "unused"), ctx)
    # Assert: one ArrayRecord shaped exactly like the model it was sent, one MetricRecord of
    # scalars, nothing else: no images, labels, boxes, per-example losses or file paths
    assert not reply.has_error(), reply.error
    assert set(reply.content.keys()) == {"arrays", "metrics"}
    sent, back = model.state_dict(), reply.content["arrays"].to_torch_state_dict()
    assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in sent.items()}
    metrics = dict(reply.content["metrics"])
    assert all(isinstance(v, (int, float)) for v in metrics.values())
    assert set(metrics) == {"num-examples", "site-weight", "site", "declined", "train-loss", "train-seconds", "steps",
                            "sigma", "sample-rate", "epsilon", "budget", "delta", "rounds-trained"}
    assert metrics["site"] == 2 and metrics["num-examples"] == 96
    assert Ledger.open(tmp_path / "state", site=2).rounds_trained == 1


def test_a_deployed_site_too_small_for_the_delta_says_so_in_its_reply(flower_task, tmp_path):
    site_file(tmp_path / "site.npz", 40)
    config = load_config(None, ["privacy.delta=0.05"])
    model = MultiTaskNet(in_channels=3, num_classes=4, width=config.model.width)
    ctx = deployed(config, tmp_path, site=1)
    # the runtime turns the exception into the error reply the server logs
    with pytest.raises(ConfigError, match=r"privacy.delta=0.05 must be below 1/40 \(site 1 has 40 training images"):
        app(message("train", model, tmp_path / "unused"), ctx)
    assert not (tmp_path / "state" / "ledger.json").exists()  # nothing spent


def test_a_round_asked_again_from_the_same_model_resends_its_update_and_spends_nothing(flower_task, tmp_path):
    # Prepare: a deployed site that trained rounds 1 and 2 (a server restarted from its round-1
    # checkpoint asks for round 2 again, from the same global model)
    site_file(tmp_path / "site.npz", 96)
    config = load_config(None, ["training.batch-size=32", "training.local-epochs=1"])
    ctx = deployed(config, tmp_path, site=0)
    torch.manual_seed(0)
    model = MultiTaskNet(in_channels=3, num_classes=4, width=config.model.width)
    app(message("train", model, tmp_path, server_round=1), ctx)
    first = app(message("train", model, tmp_path, server_round=2), ctx)
    # Execute
    again = app(message("train", model, tmp_path, server_round=2), ctx)
    # Assert: the same update, the same epsilon, one ledger entry per round
    a, b = first.content["arrays"].to_torch_state_dict(), again.content["arrays"].to_torch_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert again.content["metrics"]["epsilon"] == first.content["metrics"]["epsilon"]
    assert again.content["metrics"]["declined"] == 0
    assert [e.round for e in Ledger.open(tmp_path / "state", site=0).entries] == [1, 2]
    # a different global model for round 2 is a new release: trained and recorded
    other = MultiTaskNet(in_channels=3, num_classes=4, width=config.model.width)
    app(message("train", other, tmp_path, server_round=2), ctx)
    assert [e.round for e in Ledger.open(tmp_path / "state", site=0).entries] == [1, 2, 2]


def test_a_deployed_site_without_a_site_id_or_state_dir_is_refused(flower_task, tmp_path):
    site_file(tmp_path / "site.npz", 96)
    config = load_config(None, ["training.batch-size=32"])
    model = MultiTaskNet(in_channels=3, num_classes=4, width=config.model.width)
    ctx = Context(run_id=1, node_id=7, node_config={"data-path": str(tmp_path / "site.npz")},
                  state=RecordDict(), run_config=config.to_flat())
    with pytest.raises(ConfigError, match="has data-path but no site-id and no state-dir"):
        app(message("train", model, tmp_path / "unused"), ctx)


def test_fedprox_mu_in_the_train_message_pulls_the_sites_update_toward_the_global_model_at_the_same_privacy_cost(
        flower_task, tmp_path):
    # Prepare: one simulated site asked for the same round twice, with two ledgers: as FedAvg sends it, and as
    # Flower's FedProx sends it (the same message with "proximal-mu" in its config)
    config = load_config(None, ["data.site-size=200", "training.batch-size=32", "training.local-epochs=1"])
    torch.manual_seed(0)
    model = MultiTaskNet(in_channels=1, num_classes=3, width=config.model.width)
    fedavg = message("train", model, tmp_path / "fedavg")
    fedprox = message("train", model, tmp_path / "fedprox")
    fedprox.content["config"]["proximal-mu"] = 1.0
    # Execute
    plain, pulled = (app(msg, context(config, 1)) for msg in (fedavg, fedprox))
    # Assert: a different update, nearer the global model; the same DP-SGD releases in the ledger
    assert not plain.has_error() and not pulled.has_error()
    start = model.state_dict()

    def distance(reply) -> float:
        trained = reply.content["arrays"].to_torch_state_dict()
        return sum(float(((trained[k] - start[k]) ** 2).sum()) for k in start) ** 0.5

    assert 0 < distance(pulled) < distance(plain)
    ledgers = [Ledger.open(tmp_path / run / "sites" / "site-1", site=1) for run in ("fedavg", "fedprox")]
    releases = [[(e.round, e.noise_multiplier, e.sample_rate, e.steps) for e in ledger.entries] for ledger in ledgers]
    assert releases[0] == releases[1] and len(releases[0]) == 1
    assert ledgers[0].epsilon() == ledgers[1].epsilon() == pulled.content["metrics"]["epsilon"]
    assert pulled.content["metrics"]["steps"] == plain.content["metrics"]["steps"]


def test_a_round_asked_again_with_another_proximal_mu_is_trained_anew_not_resent(flower_task, tmp_path):
    # Prepare: a deployed site that trained round 1 as FedAvg asks
    site_file(tmp_path / "site.npz", 96)
    config = load_config(None, ["training.batch-size=32", "training.local-epochs=1"])
    ctx = deployed(config, tmp_path, site=0)
    model = MultiTaskNet(in_channels=3, num_classes=4, width=config.model.width)
    first = app(message("train", model, tmp_path), ctx)
    # Execute: the same round from the same model, but with FedProx's mu
    again = message("train", model, tmp_path)
    again.content["config"]["proximal-mu"] = 1.0
    second = app(again, ctx)
    # Assert: a new update and a new release in the ledger, not the kept update trained without the pull
    a, b = first.content["arrays"].to_torch_state_dict(), second.content["arrays"].to_torch_state_dict()
    assert not all(torch.equal(a[k], b[k]) for k in a)
    assert [e.round for e in Ledger.open(tmp_path / "state", site=0).entries] == [1, 1]
