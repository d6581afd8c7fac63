"""Adversarial evaluation: FGSM and PGD (L-inf, L2) on the class and box heads, checked against torchattacks,
and the `fedclinic evaluate` command."""

import argparse
import json
import math

import numpy as np
import pytest
import torch
import torchattacks
from torch import nn

from fedclinic.cli.evaluate import evaluate, evaluate_parser
from fedclinic.config import ConfigError, DataConfig
from fedclinic.data import CLASS_NAMES, DataError, server_test_set
from fedclinic.evaluation import evaluate as clean_evaluate
from fedclinic.analysis.adversarial import fgsm_check, perturb, robust_evaluate
from fedclinic.model import save_model
from trained import quick_model

# 16 x 16 scans and the default width: a few seconds of training on two CPU cores
DATA = DataConfig(image_size=16, site_size=600, quantity_skew=0, label_alpha=100, test_size=120)
EPS = [0.0, 1 / 255, 2 / 255, 4 / 255]
# float rounding in x + delta - x: a change may exceed eps by this much
TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def model():
    return quick_model(DATA, width=16)


@pytest.fixture(scope="module")
def test_set():
    return server_test_set(DATA)


@pytest.fixture(scope="module")
def batch(test_set):
    images = torch.from_numpy(test_set.images).float() / 255
    return images, torch.from_numpy(test_set.labels), torch.from_numpy(test_set.boxes)


@pytest.fixture(scope="module")
def sweeps(model, test_set):
    """robust_evaluate of the trained model with FGSM and with PGD, at every budget in EPS."""
    return {attack: robust_evaluate(model, test_set, eps=EPS, attack=attack, steps=5, seed=1)
            for attack in ("fgsm", "pgd")}


class ClassHead(nn.Module):
    """The model as torchattacks sees a classifier: images in, logits out."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)[0]


# --- the attacks ------------------------------------------------------------------------------------


@pytest.mark.parametrize("attack", ["fgsm", "pgd"])
@pytest.mark.parametrize("target", ["class", "box"])
@pytest.mark.parametrize("norm, eps", [("linf", 8 / 255), ("l2", 0.5)])
def test_every_adversarial_image_is_in_its_eps_ball_and_in_the_unit_range(model, batch, attack, target, norm, eps):
    # Prepare
    images, labels, boxes = batch
    generator = torch.Generator().manual_seed(0)
    # Execute
    x_adv = perturb(model, images, labels, boxes, attack=attack, norm=norm, eps=eps, steps=3, target=target,
                    generator=generator)
    # Assert
    change = (x_adv - images).flatten(1)
    size = change.abs().max(dim=1).values if norm == "linf" else change.norm(dim=1)
    assert (size <= eps + TOLERANCE).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    attacked = torch.isfinite(boxes).all(dim=1) if target == "box" else torch.ones(len(labels), dtype=torch.bool)
    assert (size[attacked] > eps / 2).all()  # the attack used its budget...
    assert (size[~attacked] == 0).all()  # ...and left images without a lesion alone under the box attack
    assert ((images == 0) | (images == 1)).any()  # the [0, 1] clamp had pixels to act on


def test_an_attack_inside_a_training_step_leaves_the_model_and_its_gradients_alone(model, batch):
    # Prepare: the model in train mode, as a site's adversarial training would hold it
    images, labels, boxes = batch
    model.zero_grad(set_to_none=True)
    model.train()
    try:
        # Execute
        perturb(model, images, labels, boxes, attack="pgd", norm="linf", eps=4 / 255, steps=2)
        # Assert
        assert model.training
        assert all(p.grad is None for p in model.parameters())
    finally:
        model.eval()


def test_bad_attack_settings_are_refused_with_the_bad_value(model, batch):
    images, labels, boxes = batch
    for settings, words in [({"eps": -0.1}, "eps must be >= 0"), ({"eps": 0.1, "norm": "l1"}, "'l1'"),
                            ({"eps": 0.1, "target": "mask"}, "'mask'"), ({"eps": 0.1, "steps": 0}, "got 0")]:
        with pytest.raises(ValueError, match=words):
            perturb(model, images, labels, boxes, **settings)
    with pytest.raises(ValueError, match="images must be in"):
        perturb(model, images * 255, labels, boxes, eps=0.1)


# --- against torchattacks -------------------------------------------------------------------------


def test_fgsm_gives_the_same_images_as_torchattacks(model, batch):
    images, labels, boxes = batch
    eps = 4 / 255

    ours = perturb(model, images, labels, boxes, attack="fgsm", norm="linf", eps=eps)
    reference = torchattacks.FGSM(ClassHead(model), eps=eps)(images, labels)

    assert torch.allclose(ours, reference, atol=TOLERANCE)


@pytest.mark.parametrize("norm, eps", [("linf", 4 / 255), ("l2", 0.5)])
def test_pgd_without_random_start_gives_the_same_images_as_torchattacks(model, batch, norm, eps):
    # Prepare
    images, labels, boxes = batch
    steps, alpha = 10, 2.5 * eps / 10
    attack = torchattacks.PGD if norm == "linf" else torchattacks.PGDL2
    # Execute
    ours = perturb(model, images, labels, boxes, attack="pgd", norm=norm, eps=eps, steps=steps, step_size=alpha,
                   random_start=False)
    reference = attack(ClassHead(model), eps=eps, alpha=alpha, steps=steps, random_start=False)(images, labels)
    # Assert: the same images up to float rounding, hence the same robust accuracy
    assert torch.allclose(ours, reference, atol=1e-5)
    with torch.no_grad():
        assert torch.equal(model(ours)[0].argmax(1), model(reference)[0].argmax(1))


# --- robust_evaluate ------------------------------------------------------------------------------


def test_no_budget_gives_exactly_the_clean_metrics(model, test_set, sweeps):
    clean = clean_evaluate(model, test_set, box_weight=1.0)

    for found in sweeps.values():
        assert found["clean_accuracy"] == clean["accuracy"] and found["clean_iou"] == clean["iou"]
        assert found["attacks"][0]["eps"] == 0.0
        assert found["attacks"][0]["robust_accuracy"] == clean["accuracy"]
        assert found["attacks"][0]["iou_under_attack"] == pytest.approx(clean["iou"], abs=1e-7)
        assert found["attacks"][0]["accuracy_under_box_attack"] == clean["accuracy"]


def test_the_trained_model_is_learnt_and_attacks_hurt_it(sweeps):
    pgd = sweeps["pgd"]
    assert pgd["clean_accuracy"] > 0.5  # three balanced classes: chance is 1/3
    assert pgd["attacks"][-1]["robust_accuracy"] < pgd["clean_accuracy"] - 0.2
    assert pgd["attacks"][-1]["iou_under_attack"] < pgd["clean_iou"] - 0.1


def test_pgd_is_at_least_as_strong_as_fgsm_at_every_budget(sweeps):
    for fgsm, pgd in zip(sweeps["fgsm"]["attacks"], sweeps["pgd"]["attacks"], strict=True):
        assert pgd["robust_accuracy"] <= fgsm["robust_accuracy"]
        assert pgd["iou_under_attack"] <= fgsm["iou_under_attack"] + 1e-7


@pytest.mark.parametrize("attack", ["fgsm", "pgd"])
def test_robust_accuracy_and_iou_do_not_rise_with_the_budget(sweeps, attack):
    rows = sweeps[attack]["attacks"]

    accuracy = [row["robust_accuracy"] for row in rows]
    iou = [row["iou_under_attack"] for row in rows]

    assert accuracy == sorted(accuracy, reverse=True)
    assert iou == sorted(iou, reverse=True)


def test_the_per_round_fgsm_check_agrees_with_the_full_evaluation(model, test_set, sweeps):
    found = fgsm_check(model, test_set, 2 / 255)

    assert found == {"eps": 2 / 255, "clean_accuracy": sweeps["fgsm"]["clean_accuracy"],
                     "robust_accuracy": sweeps["fgsm"]["attacks"][2]["robust_accuracy"]}


# --- fedclinic evaluate ---------------------------------------------------------------------------


def run_evaluate(capsys, *args: str):
    """`fedclinic evaluate ARGS`: (exit code, stdout, stderr)."""
    parser = argparse.ArgumentParser(prog="fedclinic")
    evaluate_parser(parser.add_subparsers(dest="command"))
    code = evaluate(parser.parse_args(["evaluate", *args]))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def files(tmp_path, model):
    """(a saved model, a MedMNIST-style .npz of grey 16 x 16 scans with boxes) in tmp_path."""
    source = server_test_set(DataConfig(image_size=16, test_size=40, seed=5))
    arrays = {}
    for split in ("train", "val", "test"):
        arrays[f"{split}_images"] = source.images[:, 0]  # N x H x W grey
        arrays[f"{split}_labels"] = source.labels[:, None]  # N x 1
        arrays[f"{split}_boxes"] = source.boxes
    np.savez(tmp_path / "scans.npz", **arrays, class_names=np.array(CLASS_NAMES))
    save_model(model, tmp_path / "model.pt", class_names=CLASS_NAMES)
    return tmp_path / "model.pt", tmp_path / "scans.npz"


def test_evaluate_prints_one_json_object_with_clean_and_attacked_metrics(capsys, files):
    model_file, data_file = files

    code, out, _ = run_evaluate(capsys, "--model", str(model_file), "--data", str(data_file),
                                "--eps", "0", "2/255", "--steps", "3", "--json")

    assert code == 0
    found = json.loads(out)
    assert found["n"] == 40 and found["attack"] == "pgd" and found["norm"] == "linf"
    assert 0 <= found["clean_accuracy"] <= 1 and 0 <= found["clean_iou"] <= 1
    assert [row["eps"] for row in found["attacks"]] == [0.0, 2 / 255]
    assert found["attacks"][0]["robust_accuracy"] == found["clean_accuracy"]
    assert found["attacks"][1]["robust_accuracy"] <= found["clean_accuracy"]
    assert set(found["attacks"][1]) >= {"eps", "robust_accuracy", "iou_under_attack"}


def test_evaluate_without_data_uses_the_synthetic_server_test_set_and_prints_a_table(capsys, files):
    model_file, _ = files

    code, out, err = run_evaluate(capsys, "--model", str(model_file), "--attack", "fgsm", "--norm", "l2",
                                  "--eps", "0.25")

    assert code == 0
    assert "on 1000 test images of the synthetic server test set, FGSM L2" in out
    assert out.splitlines()[2].split()[0] == "clean" and out.splitlines()[3].split()[0] == "0.25"
    assert "fgsm l2 eps 0.25: robust accuracy" in err  # progress, on stderr


def test_a_file_without_boxes_gives_no_iou_but_still_a_robust_accuracy(capsys, files, tmp_path):
    model_file, data_file = files
    with np.load(data_file) as archive:
        np.savez(tmp_path / "noboxes.npz", **{k: archive[k] for k in archive.files if not k.endswith("_boxes")})

    code, out, _ = run_evaluate(capsys, "--model", str(model_file), "--data", str(tmp_path / "noboxes.npz"),
                                "--eps", "4/255", "--steps", "2", "--json", "--quiet")

    found = json.loads(out)
    assert code == 0 and found["clean_iou"] is None and found["attacks"][0]["iou_under_attack"] is None
    assert found["attacks"][0]["accuracy_under_box_attack"] == found["clean_accuracy"]  # nothing to attack
    assert not math.isnan(found["attacks"][0]["robust_accuracy"])


def test_evaluate_refuses_bad_input_with_one_sentence(capsys, files, tmp_path):
    # Prepare: a 3-channel file for a grey-scale model
    model_file, data_file = files
    rgb = {f"{s}_{k}": v for s in ("train", "val", "test") for k, v in
           (("images", np.zeros((4, 16, 16, 3), np.uint8)), ("labels", np.zeros(4, np.int64)))}
    np.savez(tmp_path / "rgb.npz", **rgb)
    cases = [
        ((ConfigError, "missing.pt: no such file"), ["--model", str(tmp_path / "missing.pt")]),
        ((ConfigError, "is not a fedclinic model file"), ["--model", str(data_file)]),
        ((DataError, "missing.npz: no such file"),
         ["--model", str(model_file), "--data", str(tmp_path / "missing.npz")]),
        ((DataError, "3 channel"), ["--model", str(model_file), "--data", str(tmp_path / "rgb.npz")]),
        ((ConfigError, "eps must be >= 0"), ["--model", str(model_file), "--eps", "-0.01"]),
        ((ConfigError, "steps must be at least 1"), ["--model", str(model_file), "--steps", "0"]),
    ]
    for (error, words), args in cases:
        with pytest.raises(error, match=words) as caught:
            run_evaluate(capsys, *args)
        assert isinstance(caught.value, ValueError) and "\n" not in str(caught.value)
