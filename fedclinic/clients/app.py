"""The Flower ClientApp: one per hospital site. Thin handlers around clients/site.py and clients/personalize.py.

    flwr run .        (or: fedclinic simulate)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedclinic.config import Config, ConfigError, from_run_config, with_keys

if TYPE_CHECKING:
    from fedclinic.clients.site import Site

# Flower's simulation runtime loads this module in its own process, only to check that it loads, and starts Ray
# after that. So the site's modules (torch's training side and Opacus: about 1.6 s) are imported where a message
# is handled: Ray starts while the ServerApp gets ready, and each simulated site imports them at its first message.

app = ClientApp()


def _site(msg: Message, context: Context) -> Site:
    """Who this site is, from its node config.

    Simulation sets partition-id / num-partitions. A deployed SuperNode is
    started with --node-config "site-id=3 data-path='site.npz' state-dir='...' max-epsilon=3"
    and reads only its own file; its ledger lives in its state-dir, and
    max-epsilon (optional) is its own record-level budget.
    """
    from fedclinic.clients.site import Site

    node = context.node_config
    if "data-path" in node:  # deployed: a site that guessed its id or kept its ledger elsewhere would be wrong
        missing = [key for key in ("site-id", "state-dir") if key not in node]
        if missing:
            raise ConfigError(f"this SuperNode's --node-config has data-path but no {' and no '.join(missing)}; "
                              "a deployed site needs site-id=K, data-path=... and state-dir=...")
    index = int(node.get("site-id", node.get("partition-id", 0)))
    count = int(node.get("num-partitions", 1))
    data_path = node.get("data-path")
    state_dir = node.get("state-dir")
    max_epsilon = node.get("max-epsilon")
    run_dir = msg.content["config"].get("run-dir")
    if state_dir is None and run_dir:
        state_dir = Path(str(run_dir)) / "sites" / f"site-{index}"
    return Site(
        index=index,
        count=count,
        state_dir=None if state_dir is None else Path(str(state_dir)),
        data_path=None if data_path is None else Path(str(data_path)),
        max_epsilon=None if max_epsilon is None else float(max_epsilon),
    )


def _config(msg: Message, context: Context) -> Config:
    """The run's configuration; a sweep's later point (one Flower run holds all of a sweep's points) sends the keys
    in which it differs as "point"."""
    config = from_run_config(context.run_config)
    point = str(msg.content["config"].get("point", ""))
    return with_keys(config, json.loads(point)) if point else config


@app.train()
def train(msg: Message, context: Context) -> Message:
    from fedclinic.clients.site import train_round

    config = _config(msg, context)
    state_dict = msg.content["arrays"].to_torch_state_dict()
    server_round = int(msg.content["config"]["server-round"])
    # Flower's FedProx sends its mu with every round; the other strategies send none
    mu = float(msg.content["config"].get("proximal-mu", 0.0))
    new_state, metrics, declined = train_round(config, _site(msg, context), state_dict, server_round=server_round,
                                               proximal_mu=mu)
    return _reply(msg, RecordDict({"arrays": ArrayRecord(new_state), "metrics": MetricRecord(metrics)}), declined)


def _reply(msg: Message, content: RecordDict, declined: str) -> Message:
    """The reply to `msg`; a site that declined says why in a "status" ConfigRecord."""
    if declined:
        content["status"] = ConfigRecord({"declined": declined})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    from fedclinic.clients.site import evaluate_round

    config = _config(msg, context)
    metrics = evaluate_round(config, _site(msg, context), msg.content["arrays"].to_torch_state_dict())
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


@app.evaluate("personalize")
def personalize(msg: Message, context: Context) -> Message:
    """After the last round: fine-tune the global model here; only the validation scores go back, never the model."""
    from fedclinic.clients.personalize import personalize_site

    config = _config(msg, context)
    server_round = int(msg.content["config"]["server-round"])
    metrics, declined = personalize_site(config, _site(msg, context), msg.content["arrays"].to_torch_state_dict(),
                                         server_round=server_round)
    return _reply(msg, RecordDict({"metrics": MetricRecord(metrics)}), declined)
