"""Explanations: Integrated Gradients and Grad-CAM maps, and how much of them falls on the lesion."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedclinic.clients.site import build_model
from fedclinic.clients.training import train_locally
from fedclinic.config import load_config
from fedclinic.data import ImageSet, server_test_set, site_data
from fedclinic.analysis.explain import (
    attribution_maps,
    box_hits,
    box_masks,
    explain,
    pointing_scores,
    sample_indices,
)
from fedclinic.model import MultiTaskNet

# a 10 x 12 image whose region rows 2..4, columns 3..6 is the box (cx, cy, w, h) below
H, W = 10, 12
REGION = (slice(2, 5), slice(3, 7))
REGION_BOX = [5 / W, 3.5 / H, 4 / W, 3 / H]


class RegionModel(nn.Module):
    """Class 1's logit is the sum of the squared pixels inside REGION; class 0's is constant."""

    def __init__(self) -> None:
        super().__init__()
        mask = torch.zeros(1, 1, H, W)
        mask[(..., *REGION)] = 1.0
        self.register_buffer("mask", mask)

    def forward(self, x):
        inside = ((x * self.mask) ** 2).sum(dim=(1, 2, 3))
        logits = torch.stack([torch.ones_like(inside), inside], dim=1)
        return logits, torch.full((len(x), 4), 0.5)


def region_images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 1, H, W), dtype=np.uint8)


def test_integrated_gradients_match_the_closed_form_and_stay_in_the_region():
    # Prepare: for f(x) = sum over the region of x^2 and a black baseline, IG_i = x_i^2 inside, 0 outside
    model = RegionModel()
    x = torch.from_numpy(region_images(4)).float() / 255
    # Execute
    maps = attribution_maps(model, x, torch.ones(4, dtype=torch.long), method="integrated_gradients")
    # Assert: the exact answer, and completeness: the map sums to f(x) - f(black)
    torch.testing.assert_close(maps, (x * model.mask)[:, 0] ** 2, atol=1e-5, rtol=1e-4)
    f = model(x)[0][:, 1] - model(torch.zeros_like(x))[0][:, 1]
    torch.testing.assert_close(maps.sum(dim=(1, 2)), f, atol=1e-4, rtol=1e-4)
    hits = box_hits(maps, torch.tensor([REGION_BOX] * 4))
    assert hits["mass_in_box"].tolist() == pytest.approx([1.0] * 4)
    assert hits["pointing_hit"].tolist() == [1.0] * 4


def test_grad_cam_matches_a_hand_derivation_on_the_last_conv_block():
    # Prepare: Grad-CAM by hand: the last conv block's activations A, alpha = spatial mean of
    # d logit / d A, ReLU of sum_k alpha_k A_k, bilinear upsampling to the image size
    torch.manual_seed(0)
    model = MultiTaskNet(in_channels=1, num_classes=3, width=8).eval()
    x, target = torch.rand(5, 1, 24, 24), torch.tensor([0, 1, 2, 1, 0])
    activations = {}
    handle = model.encoder[3].register_forward_hook(lambda _m, _i, out: activations.update(A=out))
    logits, _ = model(x)
    handle.remove()
    grads = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), activations["A"])[0]
    alpha = grads.mean(dim=(2, 3), keepdim=True)
    coarse = F.relu((alpha * activations["A"]).sum(dim=1, keepdim=True))
    expected = F.interpolate(coarse, size=(24, 24), mode="bilinear")[:, 0]
    # Execute
    maps = attribution_maps(model, x, target, method="grad_cam")
    # Assert
    torch.testing.assert_close(maps, expected.detach(), atol=1e-6, rtol=1e-5)
    assert (maps > 0).any()


def test_box_masks_convert_cx_cy_w_h_to_pixels_exactly_also_at_the_borders():
    # Prepare: a 4 x 6 image; columns j cover [j, j + 1), rows likewise
    boxes = torch.tensor([
        [0.5, 0.5, 2 / 6, 2 / 4],  # columns 2-3, rows 1-2
        [0.0, 0.0, 2 / 6, 2 / 4],  # centred on the top-left corner: only pixel (0, 0)
        [1.0, 1.0, 4 / 6, 1.0],  # past the bottom-right corner: columns 4-5, rows 2-3
        [0.25, 0.5, 1 / 6, 0.5],  # edges x in [1, 2], y in [1, 3]: column 1, rows 1-2
    ])
    expected = torch.zeros(4, 4, 6, dtype=torch.bool)
    expected[0, 1:3, 2:4] = True
    expected[1, 0, 0] = True
    expected[2, 2:4, 4:6] = True
    expected[3, 1:3, 1] = True
    # Execute / Assert
    assert torch.equal(box_masks(boxes, 4, 6), expected)


def test_mass_in_box_and_pointing_on_hand_made_maps():
    # Prepare: four 4 x 6 maps against the box of columns 2-3, rows 1-2 (4 of 24 pixels)
    maps = torch.zeros(4, 4, 6)
    maps[0, 1, 2], maps[0, 0, 5], maps[0, 2, 3] = 1.0, 3.0, -5.0  # negative evidence does not count
    maps[1, 2, 3], maps[1, 3, 0] = 3.0, 1.0  # the peak is in the box
    maps[2] = -1.0  # no positive evidence: points nowhere
    maps[3, 0, 0], maps[3, 1, 2] = 2.0, 2.0  # a tie: the first maximum (row-major) decides
    boxes = torch.tensor([[0.5, 0.5, 2 / 6, 2 / 4]] * 4)
    # Execute
    hits = box_hits(maps, boxes)
    # Assert
    assert hits["mass_in_box"].tolist() == pytest.approx([0.25, 0.75, 0.0, 0.5])
    assert hits["pointing_hit"].tolist() == [0.0, 1.0, 0.0, 0.0]
    assert hits["chance_mass"].tolist() == pytest.approx([4 / 24] * 4)


def test_images_without_a_lesion_box_are_left_out_of_the_score():
    # Prepare: 3 lesion images (the box is the region) and 2 healthy ones whose logit lies
    # entirely outside any box they could have
    images = region_images(5)
    boxes = np.array([REGION_BOX, [np.nan] * 4, REGION_BOX, [np.nan] * 4, REGION_BOX], dtype=np.float32)
    data = ImageSet(images, np.array([1, 0, 1, 0, 1]), boxes, ("healthy", "lesion"))
    lesions_only = data.subset(np.array([0, 2, 4]))
    # Execute
    scores = pointing_scores(RegionModel(), data, method="integrated_gradients")
    # Assert: the healthy images change nothing; chance is the box's 12 of 120 pixels
    assert scores == pointing_scores(RegionModel(), lesions_only, method="integrated_gradients")
    assert scores["images"] == 3
    assert scores["mass_in_box"] == pytest.approx(1.0) and scores["pointing_hit_rate"] == 1.0
    assert scores["chance_mass"] == pytest.approx(12 / 120)
    no_boxes = pointing_scores(RegionModel(), ImageSet(images, data.labels, None, data.class_names),
                               method="integrated_gradients")
    assert no_boxes["images"] == 0 and math.isnan(no_boxes["mass_in_box"])


def test_samples_come_from_every_class_and_unknown_methods_are_refused():
    data = ImageSet(region_images(7), np.array([0, 1, 1, 0, 1, 1, 1]), None, ("healthy", "lesion"))
    rows = sample_indices(data, per_class=3, seed=1)
    assert [len(r) for r in rows] == [2, 3]
    assert all((data.labels[r] == k).all() for k, r in enumerate(rows))
    with pytest.raises(ValueError, match="'saliency'"):
        attribution_maps(RegionModel(), torch.zeros(1, 1, H, W), torch.ones(1, dtype=torch.long), method="saliency")


@pytest.fixture(scope="module")
def trained():
    config = load_config(None, ["data.site-size=300", "data.test-size=45", "privacy.mode=off",
                                "training.local-epochs=3", "training.batch-size=32", "training.optimizer=adam",
                                "training.baseline-learning-rate=0.003", "training.device=cpu"])
    train, _ = site_data(config.data, 0, 1)
    torch.manual_seed(0)
    model = build_model(config, train)
    train_locally(model, train, training=config.training, privacy=config.privacy, box_weight=1.0,
                  noise_multiplier=0.0, seed=0)
    return model.train(), server_test_set(config.data)


def test_explain_writes_the_figure_and_scores_a_trained_model(trained, tmp_path):
    # Prepare
    model, test_set = trained
    # Execute
    steps = []
    scores = explain(model, test_set, tmp_path / "run", per_class=2, device="cpu", seed=0,
                     on_step=lambda *step: steps.append(step))
    # Assert: a PNG; numbers in [0, 1] over the 30 lesion images; the model's mode unchanged
    assert (tmp_path / "run" / "explanations.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lesions = int(np.isfinite(test_set.boxes).all(axis=1).sum())
    assert set(scores) == {"integrated_gradients", "grad_cam"}
    for method, s in scores.items():
        assert s["images"] == lesions == 30
        assert all(0.0 <= s[key] <= 1.0 for key in ("mass_in_box", "pointing_hit_rate", "chance_mass")), method
    assert model.training
    # even a few seconds of training put more IG evidence on the lesion than its share of the image
    ig = scores["integrated_gradients"]
    assert ig["mass_in_box"] > ig["chance_mass"]
    # the progress bar's steps: the figure, then each method with its score
    assert [(done, total) for _, done, total in steps] == [(1, 3), (2, 3), (3, 3)]
    assert steps[1][0] == f"Integrated Gradients: {ig['mass_in_box']:.2f} of the mass in the lesion box " \
                          f"(chance {ig['chance_mass']:.2f})"
