"""The server's checkpoint: the global model, the last finished round and the strategy's state.

    model = initial_model(config, test_set)   # round 0: the global model before any site trained
    save_checkpoint(run_dir, server_round, state_dict, state)
    found = load_checkpoint(run_dir)     # {"round", "arrays", "state"}; CheckpointError if absent/broken

Flower-free. Written after every round's central evaluation, atomically (a
temporary file, fsync, os.replace), so a server killed at any moment leaves
either the previous checkpoint or the new one, never half of one. `state` is
JSON (site metrics, declines, the central-DP accountant, the recorded rounds)
with tensors in it (a server optimizer's momentum or moments): they are kept
as tensors beside the JSON, so the file loads with torch.load(weights_only=True)
and no pickled object.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch

from fedclinic.atomic import atomic_file

FILE = "checkpoint.pt"
TENSOR = "__tensor__"  # {TENSOR: i} in the JSON stands for tensors[i]


class CheckpointError(ValueError):
    """A run cannot be resumed; the message says why."""


def save_checkpoint(run_dir: Path, server_round: int, state_dict: dict[str, torch.Tensor], state: dict) -> Path:
    path = Path(run_dir) / FILE
    tensors: list[torch.Tensor] = []
    text = json.dumps(_without_tensors(state, tensors))
    with atomic_file(path) as f:
        torch.save({"round": server_round, "arrays": state_dict, "state": text, "tensors": tensors}, f)
    return path


def load_checkpoint(run_dir: Path) -> dict:
    path = Path(run_dir) / FILE
    if not path.exists():
        raise CheckpointError(f"{run_dir} has no {FILE}: there is no finished round to resume from")
    try:
        found = torch.load(path, map_location="cpu", weights_only=True)
        state = _with_tensors(json.loads(found["state"]), found.get("tensors", []))
        return {"round": int(found["round"]), "arrays": found["arrays"], "state": state}
    except (OSError, EOFError, RuntimeError, KeyError, TypeError, ValueError, pickle.UnpicklingError) as err:
        raise CheckpointError(f"{path} cannot be read ({err}); it is not a fedclinic checkpoint") from None


def _without_tensors(value, tensors: list[torch.Tensor]):
    """`value` with each tensor moved to `tensors` and replaced by {TENSOR: its index}."""
    if isinstance(value, torch.Tensor):
        tensors.append(value.detach().cpu())
        return {TENSOR: len(tensors) - 1}
    if isinstance(value, dict):
        return {k: _without_tensors(v, tensors) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_without_tensors(v, tensors) for v in value]
    return value


def _with_tensors(value, tensors: list[torch.Tensor]):
    """The inverse of `_without_tensors`."""
    if isinstance(value, dict):
        if value.keys() == {TENSOR}:
            return tensors[value[TENSOR]]
        return {k: _with_tensors(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_with_tensors(v, tensors) for v in value]
    return value
