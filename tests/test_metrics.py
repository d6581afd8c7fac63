"""Clean metrics: box IoU, macro F1, and evaluate() on a model whose outputs we choose."""

import math

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from fedclinic.data.imageset import ImageSet
from fedclinic.evaluation import balanced_accuracy, box_iou, confusion_matrix, evaluate, macro_f1
from fedclinic.model import multitask_loss

CLASS_NAMES = ("healthy", "benign", "malignant")


def test_iou_of_identical_disjoint_and_overlapping_boxes():
    true = [[0.5, 0.5, 0.4, 0.4]] * 4
    pred = [
        [0.5, 0.5, 0.4, 0.4],  # identical
        [0.1, 0.1, 0.1, 0.1],  # disjoint
        [0.7, 0.5, 0.4, 0.4],  # shifted by half its width: overlap 0.08, union 0.24
        [0.5, 0.5, 0.2, 0.2],  # inside, a quarter of the area
    ]

    iou = box_iou(np.array(pred), np.array(true))

    assert iou.tolist() == pytest.approx([1.0, 0.0, 1 / 3, 0.25])


def test_iou_matches_torchvision_pairwise_iou_on_its_diagonal():
    torch.manual_seed(0)
    pred = torch.rand(50, 4) * 0.5 + 0.25
    true = torch.rand(50, 4) * 0.5 + 0.25
    to_xyxy = lambda b: torchvision.ops.box_convert(b, "cxcywh", "xyxy")  # noqa: E731

    expected = torchvision.ops.box_iou(to_xyxy(pred), to_xyxy(true)).diagonal()

    assert torch.allclose(box_iou(pred, true), expected, atol=1e-6)


def test_iou_of_a_row_without_a_true_box_is_nan():
    iou = box_iou(torch.tensor([[0.5, 0.5, 0.2, 0.2]]), torch.tensor([[math.nan] * 4]))

    assert math.isnan(iou.item())


def test_macro_f1_and_balanced_accuracy_match_a_hand_computed_example():
    labels = [0, 1, 2, 1, 0]
    pred = [0, 1, 1, 1, 2]
    # class 0: TP 1, FP 0, FN 1 -> F1 2/3;  class 1: TP 2, FP 1, FN 0 -> 4/5;  class 2: TP 0 -> 0
    # recalls: 1/2, 2/2, 0/1

    f1 = macro_f1(pred, labels, 3)
    balanced = balanced_accuracy(pred, labels, 3)

    assert f1 == pytest.approx((2 / 3 + 4 / 5 + 0) / 3)
    assert balanced == pytest.approx((1 / 2 + 1 + 0) / 3)
    assert confusion_matrix(pred, labels, 3).tolist() == [[1, 0, 1], [0, 2, 0], [0, 1, 0]]


def test_macro_f1_skips_classes_that_nobody_saw():
    # class 3 of 4 appears neither in the labels nor in the predictions
    f1 = macro_f1(np.array([0, 1, 2]), np.array([0, 1, 2]), 4)

    assert f1 == 1.0


def test_labels_outside_the_classes_are_refused():
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
        macro_f1([0, 1], [0, 5], 3)


class LookupModel(nn.Module):
    """A stand-in model: image i, filled with pixel value i, gets the i-th row of fixed outputs."""

    def __init__(self, logits: torch.Tensor, boxes: torch.Tensor) -> None:
        super().__init__()
        self.logits, self.boxes = logits, boxes
        self.modes_seen = []

    def forward(self, x):
        self.modes_seen.append(self.training)
        index = torch.round(x[:, 0, 0, 0] * 255).long()
        return self.logits[index], self.boxes[index]


def lookup_case(with_boxes: bool = True):
    n = 5
    labels = np.array([0, 1, 2, 1, 0])
    pred = [0, 1, 1, 1, 2]  # accuracy 3/5, macro F1 22/45 (see the hand-computed test above)
    logits = torch.nn.functional.one_hot(torch.tensor(pred), 3).float() * 4.0
    true_boxes = np.array(
        [[math.nan] * 4, [0.5, 0.5, 0.4, 0.4], [0.5, 0.5, 0.4, 0.4], [math.nan] * 4, [0.5, 0.5, 0.4, 0.4]],
        dtype=np.float32,
    )
    # IoUs on the three lesion rows: 1, 1/3, 0.25; the no-lesion rows predict anything
    pred_boxes = torch.tensor(
        [[0.1, 0.1, 0.1, 0.1], [0.5, 0.5, 0.4, 0.4], [0.7, 0.5, 0.4, 0.4], [0.9, 0.9, 0.1, 0.1], [0.5, 0.5, 0.2, 0.2]]
    )
    images = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None], (n, 1, 16, 16)).copy()
    data = ImageSet(images, labels, true_boxes if with_boxes else None, CLASS_NAMES)
    return LookupModel(logits, pred_boxes), data


def test_evaluate_gives_the_hand_computed_accuracy_f1_and_iou_across_batches():
    # Prepare: a model in train mode, batches of 2 so that the last one is short
    model, data = lookup_case()
    model.train()

    # Execute
    metrics = evaluate(model, data, box_weight=2.0, batch_size=2)

    # Assert
    assert metrics["n"] == 5
    assert metrics["accuracy"] == pytest.approx(3 / 5)
    assert metrics["f1"] == pytest.approx(22 / 45)
    assert metrics["iou"] == pytest.approx((1 + 1 / 3 + 0.25) / 3)
    whole, _ = multitask_loss(
        model.logits, model.boxes, torch.from_numpy(data.labels), torch.from_numpy(data.boxes), box_weight=2.0
    )
    assert metrics["loss"] == pytest.approx(whole.item())
    assert model.modes_seen == [False, False, False]  # evaluated in eval mode...
    assert model.training  # ...and handed back in train mode


def test_evaluate_reports_iou_as_not_applicable_without_boxes():
    model, data = lookup_case(with_boxes=False)

    metrics = evaluate(model, data, box_weight=1.0)

    assert math.isnan(metrics["iou"])
    assert metrics["accuracy"] == pytest.approx(3 / 5)


def test_evaluate_reports_iou_as_not_applicable_without_lesions():
    model, data = lookup_case()
    no_lesions = ImageSet(data.images, data.labels, np.full((5, 4), np.nan, dtype=np.float32), CLASS_NAMES)

    metrics = evaluate(model, no_lesions, box_weight=1.0)

    assert math.isnan(metrics["iou"])
    assert math.isfinite(metrics["loss"])
