"""Flower's strategies by name, their hyperparameters from the config, and what a server optimizer keeps.

    strategy = flower_strategy(config.federation, fraction_train=1.0, ...)   # e.g. FedAdam(eta=..., tau=...)
    state = optimizer_state(strategy)              # tensors, for the checkpoint
    load_optimizer_state(strategy, state)          # a resumed server goes on where it stopped

`federation.strategy` names one of Flower's own classes (flwr.serverapp.strategy);
nothing here redoes their maths. FedAvgM and the FedOpt family (FedAdam,
FedYogi, FedAdagrad) are server optimizers: they step the global model from
the round's mean update and keep state across rounds (a momentum vector; the
moments m_t and v_t), which a resumed run must get back or its next step differs.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import (Bulyan, FedAdagrad, FedAdam, FedAvg, FedAvgM, FedMedian, FedProx, FedTrimmedAvg,
                                    FedYogi, Krum, MultiKrum, Strategy)

from fedclinic.config import FederationConfig

# Flower's FedOpt family (FedOpt itself is not exported): they keep the moments m_t and v_t
FEDOPT = (FedAdam, FedYogi, FedAdagrad)
_ADAPTIVE = {"eta": "server_learning_rate", "beta_1": "beta_1", "beta_2": "beta_2", "tau": "tau"}
# federation.strategy -> (Flower's class, {its keyword: the FederationConfig field that sets it}).
# FedOpt's eta_l (the sites' learning rate) stays at Flower's default: Flower 1.42 only stores and
# logs it (flwr/serverapp/strategy/fedopt.py:123 and :133-138), it never reaches the sites, which train at
# training.learning-rate.
STRATEGIES: dict[str, tuple[type[FedAvg], dict[str, str]]] = {
    "fedavg": (FedAvg, {}),
    "fedavgm": (FedAvgM, {"server_learning_rate": "server_learning_rate", "server_momentum": "server_momentum"}),
    "fedadam": (FedAdam, _ADAPTIVE),
    "fedyogi": (FedYogi, _ADAPTIVE),
    "fedadagrad": (FedAdagrad, {"eta": "server_learning_rate", "tau": "tau"}),  # its betas are fixed at 0
    "fedprox": (FedProx, {"proximal_mu": "proximal_mu"}),
    # the robust aggregators: a coordinate-wise median or trimmed mean, or the replies nearest the others
    "fedmedian": (FedMedian, {}),
    "fedtrimmedavg": (FedTrimmedAvg, {"beta": "trim_beta"}),
    "krum": (Krum, {"num_malicious_nodes": "num_malicious"}),
    "multikrum": (MultiKrum, {"num_malicious_nodes": "num_malicious", "num_nodes_to_select": "krum_select"}),
    "bulyan": (Bulyan, {"num_malicious_nodes": "num_malicious"}),
}


def flower_strategy(fed: FederationConfig, **common) -> FedAvg:
    """Flower's class for federation.strategy with its hyperparameters; `common`: the arguments FedAvg takes."""
    cls, keywords = STRATEGIES[fed.strategy]
    hyper = {kw: getattr(fed, field) for kw, field in keywords.items()
             if not (field == "server_learning_rate" and fed.server_learning_rate == 0)}  # 0: Flower's own default
    return cls(**common, **hyper)


def is_server_optimizer(name: str) -> bool:
    """Whether Flower's class for `name` steps the global model from the mean update, with state of its own."""
    return issubclass(STRATEGIES[name][0], (FedAvgM, *FEDOPT))


def step_from_mean(optimizer: FedAvg, server_round: int, mean: ArrayRecord) -> ArrayRecord | None:
    """The server optimizer's step from a mean already made (under central DP: the private release).

    Flower's FedAvgM and FedOpt average the replies they are given, then step
    from that average; handed one reply of weight 1 that holds `mean`, they
    step from `mean` itself (an average of one is the value, bit for bit).
    """
    reply = Message(RecordDict({"arrays": mean, "metrics": MetricRecord({optimizer.weighted_by_key: 1})}),
                    dst_node_id=0, message_type=MessageType.TRAIN)
    stepped, _ = optimizer.aggregate_train(server_round, [reply])
    return stepped


def _tensors(arrays):
    if arrays is None:
        return None
    if isinstance(arrays, dict):
        return {k: torch.tensor(v) for k, v in arrays.items()}
    return [torch.tensor(v) for v in arrays]


def _ndarrays(tensors):
    if tensors is None:
        return None
    if isinstance(tensors, dict):
        return {k: np.asarray(v.numpy()) for k, v in tensors.items()}
    return [np.asarray(v.numpy()) for v in tensors]


def optimizer_state(strategy: Strategy) -> dict:
    """What FedAvgM or a FedOpt strategy keeps between rounds, as tensors; {} for a strategy that keeps nothing."""
    if isinstance(strategy, FedAvgM):
        # FedAvgM records the model it steps from once, then moves it along itself
        arrays = strategy.current_arrays
        return {"momentum_vector": _tensors(strategy.momentum_vector),
                "current_arrays": None if arrays is None else dict(arrays.to_torch_state_dict())}
    if isinstance(strategy, FEDOPT):
        # its current_arrays needs no keeping: configure_train records it from the global model every round
        return {"m_t": _tensors(strategy.m_t), "v_t": _tensors(strategy.v_t)}
    return {}


def load_optimizer_state(strategy: Strategy, state: dict) -> None:
    """Give `strategy` back what `optimizer_state` took from it (nothing to do for an empty state)."""
    if not state:
        return
    if isinstance(strategy, FedAvgM):
        strategy.momentum_vector = _ndarrays(state["momentum_vector"])
        arrays = state["current_arrays"]
        strategy.current_arrays = None if arrays is None else ArrayRecord(arrays)
    elif isinstance(strategy, FEDOPT):
        strategy.m_t, strategy.v_t = _ndarrays(state["m_t"]), _ndarrays(state["v_t"])
