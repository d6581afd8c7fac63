"""fedclinic: hospital sites learn one imaging model together, with DP-SGD, on Flower.

    fedclinic simulate                            # the command
    results = fedclinic.run(fedclinic.load_config(None, ["federation.sites=3"]))   # the library call
"""

__version__ = "0.1.0"


def load_model(path):
    """Load a saved fedclinic model: an nn.Module in eval mode, forward(x in [0, 1]) -> (logits, boxes)."""
    from fedclinic.model import load_model as _load

    return _load(path)


def load_config(path=None, overrides=()):
    """A Config: the defaults, then the TOML file at `path` (if any), then `overrides` ("key=value" strings)."""
    from fedclinic.config import load_config as _load

    return _load(path, list(overrides))


def run(config, *, baselines=False, say=None, on_progress=None, on_step=None):
    """Simulate the federation of `config` through Flower's simulation runtime; returns its typed Results
    (fedclinic/report/schema.py). See fedclinic/api.py."""
    from fedclinic.api import run as _run

    return _run(config, baselines=baselines, say=say, on_progress=on_progress, on_step=on_step)
