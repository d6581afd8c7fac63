"""Where tensors go: training.device ("auto", "cpu", "cuda", "cuda:1", ...) as a torch.device."""

from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    """auto picks a GPU when one is present."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)
