"""fedclinic: hospital sites learn one imaging model together, with DP-SGD, on Flower.

    fedclinic simulate
"""

__version__ = "0.1.0"


def load_model(path):
    """Load a saved fedclinic model: an nn.Module in eval mode, forward(x in [0, 1]) -> (logits, boxes)."""
    from fedclinic.model import load_model as _load

    return _load(path)
