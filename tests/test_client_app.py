"""The ClientApp's Flower handlers, called the way the runtime calls them."""

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedclinic.clients.app import app
from fedclinic.config import load_config
from fedclinic.model import MultiTaskNet
from fedclinic.privacy.ledger import Ledger


def context(config, partition: int) -> Context:
    return Context(run_id=1, node_id=partition + 1, node_config={"partition-id": partition, "num-partitions": 2},
                   state=RecordDict(), run_config=config.to_flat())


def message(kind: str, model, run_dir) -> Message:
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                          "config": ConfigRecord({"server-round": 1, "run-dir": str(run_dir)})})
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


def test_a_site_with_a_data_path_trains_on_its_own_file_only(flower_task, tmp_path):
    # Prepare: a site file of 3-channel 20x20 images without boxes
    import numpy as np

    rng = np.random.default_rng(0)
    n = 96
    np.savez(tmp_path / "site.npz", train_images=rng.integers(0, 256, (n, 20, 20, 3), dtype=np.uint8),
             train_labels=rng.integers(0, 4, (n, 1)), val_images=rng.integers(0, 256, (20, 20, 20, 3), dtype=np.uint8),
             val_labels=rng.integers(0, 4, (20, 1)))
    config = load_config(None, ["training.batch-size=32", "training.local-epochs=1"])
    model = MultiTaskNet(in_channels=3, num_classes=4, width=config.model.width)
    ctx = Context(run_id=1, node_id=7, node_config={"data-path": str(tmp_path / "site.npz"),
                                                    "state-dir": str(tmp_path / "state")},
                  state=RecordDict(), run_config=config.to_flat())
    # Execute
    reply = app(message("train", model, tmp_path / "unused"), ctx)
    # Assert: trained on the file's 96 images, ledger in the node's own state-dir
    assert not reply.has_error(), reply.error
    assert reply.content["metrics"]["num-examples"] == n
    assert Ledger.open(tmp_path / "state", site=0).rounds_trained == 1
    assert not (tmp_path / "unused").exists()
