"""A minimal Flower 1.42 + Opacus app: FedAvg over DP-SGD sites, central evaluation each round.

It borrows fedclinic's Flower-free data and model (the same synthetic sites,
the same scattering network and loss), so its compute is fedclinic's and the
difference in wall time is the harness: see bench/simulate_runs.py.
"""

from logging import INFO

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from opacus import PrivacyEngine
from torch.utils.data import DataLoader, TensorDataset

from fedclinic.config import load_config
from fedclinic.data import server_test_set, site_data
from fedclinic.evaluation import evaluate
from fedclinic.model import build_model, initial_model, multitask_loss


def fedclinic_config(context: Context):
    """The same data as `fedclinic simulate --set data.site-size=N data.quantity-skew=0`."""
    size = int(context.run_config["site-size"])
    return load_config(overrides=[f"data.site-size={size}", "data.quantity-skew=0"])


def as_tensors(data) -> TensorDataset:
    boxes = torch.from_numpy(data.boxes)
    return TensorDataset(torch.from_numpy(data.images), torch.from_numpy(data.labels), boxes)


client = ClientApp()


@client.train()
def train(msg: Message, context: Context) -> Message:
    config, run = fedclinic_config(context), context.run_config
    site, sites = int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    data, _ = site_data(config.data, site, sites)
    model = build_model(config, data, msg.content["arrays"].to_torch_state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=float(run["learning-rate"]), momentum=0.9)
    loader = DataLoader(as_tensors(data), batch_size=int(run["batch-size"]))
    model, optimizer, loader = PrivacyEngine().make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=float(run["noise-multiplier"]),
        max_grad_norm=float(run["max-grad-norm"]), grad_sample_mode="ew", poisson_sampling=True)
    model.train()
    for images, labels, boxes in loader:
        if len(labels) == 0:
            continue
        optimizer.zero_grad()
        logits, pred_boxes = model(images.float() / 255.0)
        loss, _ = multitask_loss(logits, pred_boxes, labels, boxes, box_weight=config.model.box_weight)
        loss.backward()
        optimizer.step()
    state = {key.removeprefix("_module."): value for key, value in model.state_dict().items()}
    content = RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord({"num-examples": len(data)})})
    return Message(content=content, reply_to=msg)


server = ServerApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    config = fedclinic_config(context)
    test_set = server_test_set(config.data)
    model = initial_model(config, test_set)

    def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        metrics = evaluate(model, test_set, box_weight=config.model.box_weight)
        log(INFO, "minimal app: round %d accuracy %.4f", server_round, metrics["accuracy"])
        return MetricRecord({"accuracy": metrics["accuracy"]})

    strategy = FedAvg(fraction_evaluate=0.0)
    strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()),
                   num_rounds=int(context.run_config["num-server-rounds"]), evaluate_fn=central_evaluate)
