"""The server's checkpoint: the global model, the last finished round and the strategy's state.

    model = initial_model(config, test_set)   # round 0: the global model before any site trained
    save_checkpoint(run_dir, server_round, state_dict, state)
    found = load_checkpoint(run_dir)     # {"round", "arrays", "state"}; CheckpointError if absent/broken

Flower-free. Written after every round's central evaluation, atomically (a
temporary file, fsync, os.replace), so a server killed at any moment leaves
either the previous checkpoint or the new one, never half of one. `state` is
JSON (site metrics, declines, the central-DP accountant, the recorded rounds),
so the file loads with torch.load(weights_only=True).
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import torch

from fedclinic.config import Config
from fedclinic.data import ImageSet
from fedclinic.model import MultiTaskNet

FILE = "checkpoint.pt"


class CheckpointError(ValueError):
    """A run cannot be resumed; the message says why."""


def initial_model(config: Config, data: ImageSet) -> MultiTaskNet:
    """The global model of round 0, for images and classes like `data`: torch seeded with data.seed, so every
    run of a configuration (and its baselines, fedclinic.baselines) starts from the same weights."""
    torch.manual_seed(config.data.seed)
    return MultiTaskNet(in_channels=data.channels, num_classes=data.num_classes, width=config.model.width)


def save_checkpoint(run_dir: Path, server_round: int, state_dict: dict[str, torch.Tensor], state: dict) -> Path:
    path = Path(run_dir) / FILE
    tmp = path.with_suffix(".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save({"round": server_round, "arrays": state_dict, "state": json.dumps(state)}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_checkpoint(run_dir: Path) -> dict:
    path = Path(run_dir) / FILE
    if not path.exists():
        raise CheckpointError(f"{run_dir} has no {FILE}: there is no finished round to resume from")
    try:
        found = torch.load(path, map_location="cpu", weights_only=True)
        return {"round": int(found["round"]), "arrays": found["arrays"], "state": json.loads(found["state"])}
    except (OSError, EOFError, RuntimeError, KeyError, TypeError, ValueError, pickle.UnpicklingError) as err:
        raise CheckpointError(f"{path} cannot be read ({err}); it is not a fedclinic checkpoint") from None
