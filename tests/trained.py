"""A small non-private model that has learnt the synthetic task, for tests that need a trained model."""

import torch

from fedclinic.clients.training import train_locally
from fedclinic.config import DataConfig, PrivacyConfig, TrainingConfig
from fedclinic.data import CLASS_NAMES, site_data
from fedclinic.model import MultiTaskNet


def quick_model(data: DataConfig, *, width: int, epochs: int = 4) -> MultiTaskNet:
    """Adam on one synthetic site (seconds on two CPU cores), in eval mode; well above chance at 16 x 16."""
    train, _ = site_data(data, 0, 1)
    torch.manual_seed(0)
    net = MultiTaskNet(in_channels=1, num_classes=len(CLASS_NAMES), width=width)
    train_locally(net, train, training=TrainingConfig(local_epochs=epochs, batch_size=64, optimizer="adam",
                                                      baseline_learning_rate=3e-3, device="cpu"),
                  privacy=PrivacyConfig(mode="off"), box_weight=1.0, noise_multiplier=0.0, seed=0)
    return net.eval()
