"""Compression: pruning, the ONNX export, int8 quantization with ONNX Runtime, and the before/after comparison."""

import json
import math
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from fedclinic.analysis.compression import OnnxModel, compare, compress, prune_weights, zero_share
from fedclinic.config import DataConfig
from fedclinic.data import CLASS_NAMES, ImageSet, server_test_set
from fedclinic.evaluation import evaluate
from trained import quick_model

# 16 x 16 scans train in seconds on two CPU cores; the model keeps its default width,
# so file sizes are those of the real global model
DATA = DataConfig(image_size=16, site_size=600, quantity_skew=0, label_alpha=100, test_size=300)
CALIBRATION = 128  # the first server images calibrate, the others test


@pytest.fixture(scope="module")
def model():
    return quick_model(DATA, width=16)


@pytest.fixture(scope="module")
def server():
    data = server_test_set(DATA)
    return data.subset(np.arange(CALIBRATION)), data.subset(np.arange(CALIBRATION, len(data)))


@pytest.fixture(scope="module")
def files(model, server, tmp_path_factory):
    calibration, _ = server
    return compress(model, calibration, tmp_path_factory.mktemp("compressed"))


def weight_zero_share(onnx_path) -> float:
    """Share of zeros in the convolution and linear weights stored in an ONNX file."""
    weights = [onnx.numpy_helper.to_array(t) for t in onnx.load(onnx_path).graph.initializer
               if t.name.endswith("weight") and len(t.dims) >= 2]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.size for w in weights)


# Imports made to fail: the deployed file must need neither.
STANDALONE = """
import sys
sys.modules["torch"] = None
sys.modules["fedclinic"] = None
import json
import numpy as np
import onnxruntime

session = onnxruntime.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
metadata = session.get_modelmeta().custom_metadata_map
shape = session.get_inputs()[0].shape
out = {"class_names": json.loads(metadata["class_names"]), "box_format": metadata["box_format"],
       "inputs": [i.name for i in session.get_inputs()], "outputs": [o.name for o in session.get_outputs()]}
for n in (1, 5):
    x = np.random.default_rng(0).random((n, *shape[1:]), dtype=np.float32)
    logits, boxes = session.run(["logits", "boxes"], {"images": x})
    out[f"batch {n}"] = [list(logits.shape), list(boxes.shape), float(boxes.min()), float(boxes.max())]
print(json.dumps(out))
"""


def test_the_int8_file_runs_with_onnxruntime_and_numpy_alone(files):
    run = subprocess.run([sys.executable, "-c", STANDALONE, files["int8_path"]],
                         capture_output=True, text=True, timeout=60)

    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["class_names"] == list(CLASS_NAMES)
    assert "cx, cy, w, h" in out["box_format"]
    assert out["inputs"] == ["images"] and out["outputs"] == ["logits", "boxes"]
    for n in (1, 5):
        logits_shape, boxes_shape, low, high = out[f"batch {n}"]
        assert logits_shape == [n, len(CLASS_NAMES)] and boxes_shape == [n, 4]
        assert 0 <= low <= high <= 1


def test_the_float_export_computes_what_the_torch_model_computes(model, server, files):
    _, test = server
    images = torch.from_numpy(test.images).float() / 255

    with torch.inference_mode():
        expected_logits, expected_boxes = model(images)
    logits, boxes = OnnxModel(files["float_path"])(images)

    assert torch.allclose(logits, expected_logits, atol=1e-4)
    assert torch.allclose(boxes, expected_boxes, atol=1e-5)


def weight_bytes(onnx_path) -> int:
    """Bytes of the convolution and linear weights stored in an ONNX file (float or int8)."""
    return sum(len(t.raw_data) for t in onnx.load(onnx_path).graph.initializer
               if t.name.removesuffix("_quantized").endswith("weight") and len(t.dims) >= 2)


def test_int8_predicts_like_the_float_model_and_stores_its_weights_in_a_quarter_of_the_space(model, server, files):
    _, test = server
    images = torch.from_numpy(test.images).float() / 255

    int8_model, float_model = OnnxModel(files["int8_path"]), OnnxModel(files["float_path"])
    int8, reference = evaluate(int8_model, test, box_weight=1.0), evaluate(float_model, test, box_weight=1.0)
    agreement = (int8_model(images)[0].argmax(1) == float_model(images)[0].argmax(1)).float().mean().item()

    assert reference["accuracy"] > 0.5  # trained: chance is 1/3
    assert agreement >= 0.9
    assert abs(int8["accuracy"] - reference["accuracy"]) <= 0.03
    assert abs(int8["iou"] - reference["iou"]) <= 0.03
    # the trained weights in a quarter of the bytes; the scattering's fixed filters stay float32, and for this
    # 6.8k-parameter model they and the graph around the weights (names, scales) are most of either file
    assert weight_bytes(files["int8_path"]) == pytest.approx(weight_bytes(files["float_path"]) / 4, rel=0.01)
    assert files["int8_bytes"] < files["float_bytes"]


def test_compare_reports_before_and_after_as_ratios(model, server, files):
    _, test = server
    adversarial = test.subset(np.arange(64))  # stand-in images: the hook, not the attack, is under test

    plain = compare(model, files["int8_path"], test, threads=1, repeats=2)
    attacked = compare(model, files["int8_path"], test, threads=1, repeats=2, adversarial=adversarial)

    before, after = plain["before"], plain["after"]
    assert plain["size_ratio"] == pytest.approx(before["bytes"] / files["int8_bytes"])
    assert plain["speedup_b1"] == pytest.approx(before["ms_per_image_b1"] / after["ms_per_image_b1"])
    assert all(side[f"ms_per_image_b{b}"] > 0 for side in (before, after) for b in (1, 64))
    assert before["accuracy"] == evaluate(model, test, box_weight=1.0)["accuracy"]
    assert after["accuracy"] == evaluate(OnnxModel(files["int8_path"]), test, box_weight=1.0)["accuracy"]
    assert plain["accuracy_change"] == pytest.approx(after["accuracy"] - before["accuracy"])
    assert 0.9 <= plain["agreement"] <= 1 and plain["threads"] == 1
    assert math.isnan(before["robust_accuracy"]) and math.isnan(plain["robust_accuracy_change"])
    assert attacked["before"]["robust_accuracy"] == evaluate(model, adversarial, box_weight=1.0)["accuracy"]
    assert not math.isnan(attacked["robust_accuracy_change"])


def test_pruning_zeroes_the_requested_share_of_weights_and_the_files_keep_them(model, server, files, tmp_path):
    calibration, _ = server
    count = sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))

    pruned = prune_weights(model, amount=0.5)
    pruned_files = compress(model, calibration, tmp_path, prune_amount=0.5)

    assert zero_share(pruned) == pytest.approx(0.5, abs=1 / count)
    assert zero_share(model) == 0  # the model handed in is not changed
    assert not any(name.endswith(("_orig", "_mask")) for name, _ in pruned.named_parameters())  # permanent
    assert pruned_files["zero_share"] == pytest.approx(0.5, abs=1 / count)
    assert weight_zero_share(pruned_files["float_path"]) == pytest.approx(0.5, abs=1 / count)
    # zeros are numbers like any other in a dense file
    assert pruned_files["int8_bytes"] == pytest.approx(files["int8_bytes"], rel=0.01)


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_bad_input_gets_one_clear_sentence(model, server, files, tmp_path):
    calibration, _ = server
    not_onnx = tmp_path / "notes.onnx"
    not_onnx.write_text("not a model")
    three_channels = ImageSet(np.repeat(calibration.images, 3, axis=1), calibration.labels, calibration.boxes,
                              calibration.class_names)

    with pytest.raises(FileNotFoundError) as missing:
        OnnxModel(tmp_path / "missing.onnx")
    with pytest.raises(ValueError) as garbage:
        OnnxModel(not_onnx)
    with pytest.raises(ValueError) as wrong_shape:
        OnnxModel(files["int8_path"])(torch.rand(2, 3, 16, 16))
    with pytest.raises(ValueError) as wrong_calibration:
        compress(model, three_channels, tmp_path)
    with pytest.raises(ValueError) as wrong_amount:
        prune_weights(model, amount=1.0)
    with pytest.raises(ValueError) as wrong_format:
        compress(model, calibration, tmp_path, quant_format="int4")

    assert "missing.onnx' does not exist" in one_line(missing)
    assert "notes.onnx' is not an ONNX model" in one_line(garbage)
    assert "N x 1 x 16 x 16, got 2 x 3 x 16 x 16" in one_line(wrong_shape)
    assert "1-channel images but the calibration images have 3" in one_line(wrong_calibration)
    assert "[0, 1), got 1.0" in one_line(wrong_amount)
    assert "qdq, qoperator, got 'int4'" in one_line(wrong_format)


def test_fedclinic_evaluate_scores_the_int8_file_clean_and_through_a_transfer_attack(model, server, files, tmp_path,
                                                                                    capsys):
    from fedclinic.cli import main
    from fedclinic.model import save_model

    # Prepare: the held-out server images as a user's .npz file, the float model saved beside the int8 one
    _, test = server
    images = test.images[:, 0]  # N x H x W grey
    np.savez(tmp_path / "test.npz", train_images=images, train_labels=test.labels[:, None], val_images=images,
             val_labels=test.labels[:, None], test_images=images, test_labels=test.labels[:, None],
             test_boxes=test.boxes)
    save_model(model, tmp_path / "global_model.pt", class_names=CLASS_NAMES)
    # Execute
    command = ["evaluate", "--model", files["int8_path"], "--data", str(tmp_path / "test.npz"), "--attack", "fgsm",
               "--eps", "0", "8/255", "--transfer-from", str(tmp_path / "global_model.pt"), "--json", "--quiet"]
    assert main(command) == 0
    found = json.loads(capsys.readouterr().out)
    # Assert: clean accuracy is the int8 model's own; eps 0 changes nothing; the attack hurts
    assert found["clean_accuracy"] == pytest.approx(evaluate(OnnxModel(files["int8_path"]), test,
                                                             box_weight=1.0)["accuracy"])
    assert [a["eps"] for a in found["attacks"]] == [0, pytest.approx(8 / 255)]
    assert found["attacks"][0]["robust_accuracy"] == pytest.approx(found["clean_accuracy"])
    assert found["attacks"][1]["robust_accuracy"] < found["clean_accuracy"] - 0.05


def test_the_report_says_larger_or_slower_when_the_int8_model_is():
    from fedclinic.report.text import format_ratio

    # the 6.8k-weight default model's int8 file carries more graph and scales than weights
    assert format_ratio(31825 / 50309, "smaller", "larger") == "1.58× larger"
    assert format_ratio(3.1, "smaller", "larger") == "3.10× smaller"
    assert format_ratio(0.5, "faster", "slower", "x") == "2.00x slower"
