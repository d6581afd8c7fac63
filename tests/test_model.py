"""The multi-task model: shapes, Opacus compatibility, the masked box loss, save/load."""

import copy
import math

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from opacus.grad_sample import wrap_model
from opacus.validators import ModuleValidator

from fedclinic.model import MultiTaskNet, load_model, multitask_loss, save_model

from opacus_marks import NO_INPUT_GRADIENT

CLASS_NAMES = ("healthy", "benign", "malignant")
NO_BOX = [math.nan] * 4


def make_model(channels: int = 1, encoder: str = "scattering") -> MultiTaskNet:
    torch.manual_seed(0)
    return MultiTaskNet(in_channels=channels, num_classes=len(CLASS_NAMES), width=8, encoder=encoder)


def make_batch(n: int = 4, channels: int = 1, size: int = 16):
    torch.manual_seed(1)
    images = torch.rand(n, channels, size, size)
    labels = torch.arange(n) % len(CLASS_NAMES)
    boxes = torch.tensor([NO_BOX, [0.5, 0.5, 0.2, 0.3], [0.3, 0.6, 0.1, 0.1], NO_BOX][:n])
    return images, labels, boxes


@pytest.mark.parametrize("encoder", ["scattering", "cnn"])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("height,width", [(16, 16), (32, 32), (48, 48), (20, 36)])
def test_any_image_size_gives_logits_and_boxes_in_the_unit_square(encoder, channels, height, width):
    model = make_model(channels, encoder)
    images = torch.rand(5, channels, height, width)

    logits, boxes = model(images)

    assert logits.shape == (5, len(CLASS_NAMES))
    assert boxes.shape == (5, 4)
    assert ((boxes >= 0) & (boxes <= 1)).all()


def test_the_default_model_trains_few_weights_and_sends_no_filters():
    model = MultiTaskNet(in_channels=1, num_classes=3)

    count = sum(p.numel() for p in model.parameters())

    assert 5_000 <= count <= 10_000  # DP noise norm grows with sqrt(parameters)
    assert model.arch == {"in_channels": 1, "num_classes": 3, "width": 16, "encoder": "scattering"}
    # the scattering's fixed filters are rebuilt from the code, never sent to the server or saved
    assert set(model.state_dict()) == {name for name, _ in model.named_parameters()}


def test_the_scattering_transform_agrees_with_kymatios_away_from_the_border():
    # Prepare: kymatio's own (FFT-based) Scattering2D with the same J and L, on real scans
    from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D

    from fedclinic.config import DataConfig
    from fedclinic.data import server_test_set
    from fedclinic.scattering import ORIENTATIONS, SCALES, Scattering

    images = torch.from_numpy(server_test_set(DataConfig(test_size=40)).images).float() / 255
    reference = ScatteringTorch2D(J=SCALES, shape=(32, 32), L=ORIENTATIONS)(images)[:, 0]
    # Execute
    ours = Scattering(in_channels=1)(images)
    # Assert: the same 25 maps in the same order; inside the border (where kymatio's padding
    # differs) within 1.5%, and every map as a whole correlated above 0.98
    assert ours.shape == reference.shape == (40, 25, 8, 8)
    inner = (slice(None), slice(None), slice(1, -1), slice(1, -1))
    for k in range(25):
        a, b = reference[inner][:, k], ours[inner][:, k]
        assert (a - b).norm() / a.norm() < 0.015, k
        whole = torch.corrcoef(torch.stack([reference[:, k].flatten(), ours[:, k].flatten()]))[0, 1]
        assert whole > 0.98, k


@pytest.mark.parametrize("encoder", ["scattering", "cnn"])
@pytest.mark.parametrize("mode", ["hooks", "functorch", "ew"])
@NO_INPUT_GRADIENT
def test_opacus_accepts_the_model_and_its_per_example_gradients_match_single_examples(mode, encoder):
    # Prepare: a mixed batch (with and without lesions) and a reference copy
    model = make_model(encoder=encoder)
    reference = copy.deepcopy(model)
    images, labels, boxes = make_batch()
    assert ModuleValidator.validate(model, strict=True) == []
    private = wrap_model(model, grad_sample_mode=mode)  # loss_reduction="mean"

    # Execute
    loss, _ = multitask_loss(*private(images), labels, boxes, box_weight=2.0)
    loss.backward()

    # Assert: each per-example gradient is the gradient of that example's loss alone,
    # i.e. the batch loss is a mean of per-example losses (what DP-SGD clips)
    for i in range(len(labels)):
        reference.zero_grad()
        one, _ = multitask_loss(*reference(images[i : i + 1]), labels[i : i + 1], boxes[i : i + 1], box_weight=2.0)
        one.backward()
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            assert torch.allclose(p.grad_sample[i], q.grad, atol=1e-5), name


@NO_INPUT_GRADIENT
def test_without_boxes_every_parameter_still_gets_a_per_example_gradient():
    # Opacus' optimizer fails on a parameter without grad_sample, so the box head
    # must stay in the graph even when the data has no boxes.
    model = make_model()
    images, labels, _ = make_batch()
    private = GradSampleModule(model)

    loss, parts = multitask_loss(*private(images), labels, None, box_weight=1.0)
    loss.backward()

    assert parts["box"] == 0.0
    for name, p in model.named_parameters():
        assert p.grad_sample is not None, name
    assert all((p.grad_sample == 0).all() for p in model.box_head.parameters())


def test_the_box_loss_ignores_rows_without_a_lesion():
    logits = torch.zeros(3, 3)
    labels = torch.tensor([0, 1, 2])
    true_boxes = torch.tensor([NO_BOX, [0.5, 0.5, 0.2, 0.2], NO_BOX])
    pred = torch.full((3, 4), 0.5)
    moved_no_lesion, moved_lesion = pred.clone(), pred.clone()
    moved_no_lesion[0] = 0.9
    moved_lesion[1] = 0.9

    base, _ = multitask_loss(logits, pred, labels, true_boxes, box_weight=1.0)
    after_no_lesion, _ = multitask_loss(logits, moved_no_lesion, labels, true_boxes, box_weight=1.0)
    after_lesion, _ = multitask_loss(logits, moved_lesion, labels, true_boxes, box_weight=1.0)

    assert after_no_lesion == base
    assert after_lesion > base


def test_the_box_loss_is_divided_by_the_whole_batch_not_by_the_lesions():
    # one lesion row with a known error, in batches of 1 and of 4
    true_boxes = torch.tensor([[0.5, 0.5, 0.2, 0.2], NO_BOX, NO_BOX, NO_BOX])
    pred = torch.tensor([[0.9, 0.5, 0.2, 0.2]] + [[0.5] * 4] * 3)

    _, alone = multitask_loss(torch.zeros(1, 3), pred[:1], torch.tensor([0]), true_boxes[:1], box_weight=1.0)
    _, in_batch = multitask_loss(torch.zeros(4, 3), pred, torch.zeros(4, dtype=torch.long), true_boxes, box_weight=1.0)

    # smooth L1 (beta 0.05) of an error of 0.4 on one of 4 coordinates: (0.4 - 0.025) / 4
    assert alone["box"] == pytest.approx(0.375 / 4)
    assert in_batch["box"] == pytest.approx(alone["box"] / 4)


def test_a_batch_without_lesions_does_not_train_the_box_head():
    model = make_model()
    images, labels, _ = make_batch()
    no_lesions = torch.full((len(labels), 4), math.nan)

    loss, parts = multitask_loss(*model(images), labels, no_lesions, box_weight=1.0)
    loss.backward()

    assert parts["box"] == 0.0
    assert parts["cls"] > 0
    assert all(p.grad is not None and (p.grad == 0).all() for p in model.box_head.parameters())
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_an_empty_batch_gives_a_zero_loss_without_nan():
    model = make_model()
    images = torch.rand(0, 1, 16, 16)

    loss, parts = multitask_loss(
        *model(images), torch.zeros(0, dtype=torch.long), torch.zeros(0, 4), box_weight=1.0
    )
    loss.backward()

    assert loss.item() == 0.0
    assert parts == {"cls": 0.0, "box": 0.0}
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


def test_a_saved_model_loads_back_in_eval_mode_with_identical_outputs(tmp_path):
    # Prepare: a trained-looking model wrapped by Opacus, as a site would hold it
    model = make_model(channels=3)
    private = GradSampleModule(model)
    images = torch.rand(2, 3, 24, 24)
    path = tmp_path / "global.pt"

    save_model(private, path, class_names=CLASS_NAMES, extra={"epsilon": 3.0, "rounds": [1, 2]})
    loaded = load_model(path)

    assert not loaded.training
    assert loaded.class_names == CLASS_NAMES
    assert loaded.extra == {"epsilon": 3.0, "rounds": [1, 2]}
    with torch.no_grad():
        expected = model.eval()(images)
        actual = loaded(images)
    assert torch.equal(expected[0], actual[0]) and torch.equal(expected[1], actual[1])
    # plain keys, and nothing that needs more than weights_only to read
    checkpoint = torch.load(path, weights_only=True)
    assert not any(key.startswith("_module.") for key in checkpoint["state_dict"])


def test_loading_a_file_that_is_not_a_model_names_the_file(tmp_path):
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not a model")
    tensor_file = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(2)}, tensor_file)

    with pytest.raises(ValueError, match="notes.txt' is not a fedclinic model file"):
        load_model(text_file)
    with pytest.raises(ValueError, match="weights.pt' is not a fedclinic model file"):
        load_model(tensor_file)
    with pytest.raises(FileNotFoundError, match="missing.pt' does not exist"):
        load_model(tmp_path / "missing.pt")


def test_saving_refuses_class_names_that_do_not_match_the_model(tmp_path):
    with pytest.raises(ValueError, match="3 classes but 2 class names"):
        save_model(make_model(), tmp_path / "m.pt", class_names=("healthy", "sick"))


def test_saving_refuses_extra_values_that_would_not_load_back(tmp_path):
    # a NumPy float looks like a float but torch.load(weights_only=True) refuses it
    with pytest.raises(ValueError, match=r"extra\['epsilon'\] is a float64"):
        save_model(make_model(), tmp_path / "m.pt", class_names=CLASS_NAMES, extra={"epsilon": np.float64(3.0)})
