"""Compression of the final global model for deployment: prune, export to ONNX, quantize to int8.

    from fedclinic.analysis.compression import compress, compare, OnnxModel
    files = compress(model, calibration, run_dir)   # run_dir/global_model.onnx and global_model.int8.onnx
    compare(model, files["int8_path"], test_set)    # size, CPU latency, accuracy, IoU: before vs after
    evaluate(OnnxModel(files["int8_path"]), test_set, box_weight=1.0)   # scored like the torch model

The int8 file is the deployable artifact; it needs onnxruntime and numpy, not torch or fedclinic:

    session = onnxruntime.InferenceSession("global_model.int8.onnx")
    logits, boxes = session.run(None, {"images": x})   # x: float32 N x C x H x W, pixels in [0, 1]
    json.loads(session.get_modelmeta().custom_metadata_map["class_names"])

Three steps, each measured by bench/compression.py:
1. Magnitude pruning (optional, off by default): the smallest weights become zeros. A dense
   ONNX file stores zeros like any other number and ONNX Runtime's dense kernels multiply
   them all the same, so pruning buys no bytes and no speed here (only a smaller zip); on
   a DP-trained global model (epsilon 8) pruning 30% already cost 1.3 points of accuracy.
2. Export with torch.onnx's torch.export-based ("dynamo") exporter: a float reference
   file, batch size dynamic.
3. ONNX Runtime post-training static quantization: int8 per-channel weights and uint8
   activations for the convolutions and linear layers, ranges calibrated on the server's
   images. This is where the bytes go (about 4x fewer for the weights).
"""

from __future__ import annotations

import copy
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
from torch import Tensor, nn
from torch.nn.utils import prune

from fedclinic.data.imageset import ImageSet
from fedclinic.evaluation.metrics import batches, evaluate, evaluating
from fedclinic.model import save_model

INPUT_NAME = "images"
OUTPUT_NAMES = ("logits", "boxes")
BOX_FORMAT = "cx, cy, w, h: box centre and size as fractions of the image width and height, in [0, 1]"
INPUT_FORMAT = "images: float32 N x C x H x W, pixels scaled to [0, 1]"

# QOperator writes fused operators (QLinearConv, com.microsoft QGemm): a 10% smaller file
# than QDQ, and as fast on the CPU here (bench/compression.py). QDQ keeps standard ONNX
# operators around float ones, which any ONNX runtime can load.
QUANT_FORMATS = {"qdq": QuantFormat.QDQ, "qoperator": QuantFormat.QOperator}

# Only the layers that hold the weights: GroupNorm, pooling and the sigmoid stay float
# (quantizing them too made the QDQ file 12% bigger and predicted no better).
QUANTIZED_OPS = ["Conv", "Gemm"]

# Batch sizes timed by compare(): one image (a clinic's single scan), and a batch.
LATENCY_BATCHES = (1, 64)


def prune_weights(model: nn.Module, *, amount: float) -> nn.Module:
    """A CPU copy of `model` in which the share `amount` of convolution and linear weights is zero.

    Global L1 unstructured pruning: one magnitude threshold across all layers,
    so layers with many small weights give up more. Made permanent
    (prune.remove): the copy is a plain module with zeros in its weights.
    Biases and GroupNorm parameters are kept. `model` itself is not changed.
    """
    if not 0 <= amount < 1:
        raise ValueError(f"prune_amount must be in [0, 1), got {amount}")
    pruned = copy.deepcopy(model).cpu().eval()
    weights = [(module, "weight") for module in pruned.modules() if isinstance(module, (nn.Conv2d, nn.Linear))]
    if amount > 0:
        prune.global_unstructured(weights, pruning_method=prune.L1Unstructured, amount=amount)
        for module, name in weights:
            prune.remove(module, name)
    return pruned


def zero_share(model: nn.Module) -> float:
    """The share of convolution and linear weights that are exactly zero."""
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def export_onnx(model: nn.Module, path: str | Path, *, example: Tensor, class_names: tuple[str, ...]) -> Path:
    """Write `model` (on the CPU) as one float .onnx file, batch size dynamic, H and W those of `example`."""
    program = torch.onnx.export(
        model.eval(),
        (example,),
        dynamo=True,
        verbose=False,
        input_names=[INPUT_NAME],
        output_names=list(OUTPUT_NAMES),
        dynamic_shapes=({0: torch.export.Dim("batch")},),
    )
    proto = program.model_proto
    # The exporter annotates every node with its Python stack trace: a third of the
    # file, and the source paths of the machine that exported it. A deployment needs neither.
    for node in proto.graph.node:
        del node.metadata_props[:]
    # the shapes of intermediate values: ONNX Runtime infers them again; for a small model they are
    # a third of the file
    del proto.graph.value_info[:]
    # what a deployment needs to read the outputs, in the file itself
    onnx.helper.set_model_props(
        proto, {"class_names": json.dumps(list(class_names)), "box_format": BOX_FORMAT, "input": INPUT_FORMAT}
    )
    path = Path(path)
    onnx.save(proto, path)  # weights inside: one file to ship (protobuf's 2 GB limit is far away)
    return path


class CalibrationImages(CalibrationDataReader):
    """ImageSet batches, scaled to [0, 1], as ONNX Runtime's calibrator asks for them."""

    def __init__(self, data: ImageSet, *, batch_size: int = 64) -> None:
        self._batches = batches(data, batch_size=batch_size, device="cpu")

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: batch[0].numpy()}


def _fixed_filters(model_path: Path) -> list[str]:
    """The convolutions whose weights were not trained (the scattering transform's wavelets): they stay float.

    Quantized, their one-channel filters ran three times slower in ONNX Runtime
    than the float model in torch, and cost accuracy; they are a few kilobytes.
    Trained weights are the initializers named after a module's `weight`.
    """
    graph = onnx.load(str(model_path)).graph
    return [node.name for node in graph.node
            if node.op_type == "Conv" and not node.input[1].endswith("weight")]


def quantize_int8(
    float_path: str | Path, int8_path: str | Path, calibration: ImageSet, *, quant_format: str = "qoperator"
) -> Path:
    """Static int8 quantization of the float .onnx file, activation ranges from `calibration`'s images."""
    if quant_format not in QUANT_FORMATS:
        raise ValueError(f"quant_format must be one of {', '.join(QUANT_FORMATS)}, got {quant_format!r}")
    int8_path = Path(int8_path)
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # shape inference and graph clean-up; ONNX Runtime asks for it before quantize_static
        quant_pre_process(str(float_path), str(prepared))
        quantize_static(
            prepared,
            int8_path,
            CalibrationImages(calibration),
            nodes_to_exclude=_fixed_filters(prepared),
            quant_format=QUANT_FORMATS[quant_format],
            op_types_to_quantize=QUANTIZED_OPS,
            per_channel=True,  # one scale per output channel: DP-trained layers vary a lot between channels
            weight_type=QuantType.QInt8,
            # unsigned activations: ONNX Runtime's x86 kernels are u8 x s8
            activation_type=QuantType.QUInt8,
            # 7-bit weights: x86 CPUs without VNNI (older hospital machines) can saturate
            # 16-bit sums of 8-bit products; accuracy here was the same or better with it
            reduce_range=True,
        )
    return int8_path  # the quantizer carries the float file's metadata_props over


def _check_images(model: nn.Module, data: ImageSet, what: str) -> None:
    if len(data) < 2:
        raise ValueError(f"{what} needs at least 2 images (a few hundred give stable int8 ranges), got {len(data)}")
    # a MultiTaskNet says what it takes (its first convolution may follow the scattering transform)
    arch = getattr(model, "arch", None)
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    channels = arch["in_channels"] if arch else conv.in_channels if conv is not None else data.channels
    if channels != data.channels:
        raise ValueError(f"the model takes {channels}-channel images but the {what} images have {data.channels}")


def compress(
    model: nn.Module,
    calibration: ImageSet,
    out_dir: str | Path,
    *,
    prune_amount: float = 0.0,
    quant_format: str = "qoperator",
    name: str = "global_model",
) -> dict:
    """Prune, export and int8-quantize `model`: out_dir/NAME.onnx (float reference) and NAME.int8.onnx.

    `calibration`: a few hundred of the server's images (not the ones it will
    be tested on); their size fixes the input's H and W, their class names go
    into the files. `model` itself is not changed. Returns {"float_path",
    "int8_path", "float_bytes", "int8_bytes", "prune_amount", "zero_share",
    "quant_format", "calibration_images"}.
    """
    _check_images(model, calibration, "calibration")
    if quant_format not in QUANT_FORMATS:
        raise ValueError(f"quant_format must be one of {', '.join(QUANT_FORMATS)}, got {quant_format!r}")
    pruned = prune_weights(model, amount=prune_amount)
    example, _, _ = next(batches(calibration, batch_size=2, device="cpu"))
    with torch.inference_mode():
        num_outputs = pruned(example)[0].shape[1]
    if num_outputs != calibration.num_classes:
        raise ValueError(
            f"the model has {num_outputs} classes but the calibration images have {calibration.num_classes}: "
            f"{calibration.class_names}"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    float_path = export_onnx(pruned, out_dir / f"{name}.onnx", example=example, class_names=calibration.class_names)
    int8_path = quantize_int8(float_path, out_dir / f"{name}.int8.onnx", calibration, quant_format=quant_format)
    return {
        "float_path": str(float_path),
        "int8_path": str(int8_path),
        "float_bytes": float_path.stat().st_size,
        "int8_bytes": int8_path.stat().st_size,
        "prune_amount": prune_amount,
        "zero_share": zero_share(pruned),
        "quant_format": quant_format,
        "calibration_images": len(calibration),
    }


class OnnxModel(nn.Module):
    """An exported .onnx model run by onnxruntime, called like the torch model: images -> (logits, boxes).

    Torch tensors in (float N x C x H x W in [0, 1]), torch tensors out, on
    the images' device, so fedclinic.evaluation scores it as it scores the
    torch model. No parameters; `.class_names`, `.box_format` and
    `.input_shape` (C, H, W) come from the file. `threads`: onnxruntime's
    intra-op threads (None: its default, one per physical core).
    `spin_wait`: its threads spin for a while after a call, waiting for the
    next (onnxruntime's default: a faster next call, a busy core meanwhile).
    """

    def __init__(self, path: str | Path, *, threads: int | None = None, spin_wait: bool = True) -> None:
        super().__init__()
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"compressed model file '{path}' does not exist")
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin_wait else "0")
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own types (InvalidProtobuf, Fail, ...), all plain Exceptions
            raise ValueError(f"'{path}' is not an ONNX model that onnxruntime can load") from err
        metadata = self.session.get_modelmeta().custom_metadata_map
        if "class_names" not in metadata:
            raise ValueError(f"'{path}' is an ONNX model but not a fedclinic one (no class_names in its metadata)")
        self.class_names = tuple(json.loads(metadata["class_names"]))
        self.box_format = metadata.get("box_format", "")
        self.input_shape = tuple(self.session.get_inputs()[0].shape[1:])

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        if images.dim() != 4 or tuple(images.shape[1:]) != self.input_shape:
            expected = " x ".join(str(d) for d in ("N", *self.input_shape))
            raise ValueError(
                f"the compressed model takes images of shape {expected}, got {' x '.join(map(str, images.shape))}"
            )
        x = images.detach().to("cpu", torch.float32).contiguous().numpy()
        logits, boxes = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: x})
        return torch.from_numpy(logits).to(images.device), torch.from_numpy(boxes).to(images.device)


def _saved_bytes(model: nn.Module, class_names: tuple[str, ...]) -> int:
    """The size of `model` as fedclinic saves it (global_model.pt)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.pt"
        save_model(model, path, class_names=class_names)
        return path.stat().st_size


def _ms_per_image(models: tuple[nn.Module, ...], test: ImageSet, *, repeats: int, rounds: int = 5) -> list[dict]:
    """{"ms_per_image_b1": ..., "ms_per_image_b64": ...} of each model: medians of `repeats` timed calls.

    The calls come in `rounds` blocks per model, the models' blocks taking
    turns: a busy moment on the machine hits every model alike, yet calls of
    two models never alternate one by one (interleaved, their thread pools
    slowed each other by 15-40% on a 2-core CPU).
    """
    seconds = [{b: [] for b in LATENCY_BATCHES} for _ in models]
    with torch.inference_mode():
        for b in LATENCY_BATCHES:
            x, _, _ = next(batches(test, batch_size=b, device="cpu"))
            for model in models:  # warm-up: first calls allocate memory and pick kernels
                for _ in range(3):
                    model(x)
            for _ in range(rounds):
                for model, kept in zip(models, seconds):
                    model(x)  # untimed: wakes the thread pool that the other model's block left idle
                    for _ in range(math.ceil(repeats / rounds)):
                        start = time.perf_counter()
                        model(x)
                        kept[b].append(time.perf_counter() - start)
    return [{f"ms_per_image_b{b}": 1000 * statistics.median(kept[b]) / b for b in LATENCY_BATCHES} for kept in seconds]


def _predicted_labels(model: nn.Module, data: ImageSet) -> np.ndarray:
    with evaluating(model):
        return torch.cat([model(x)[0].argmax(dim=1) for x, _, _ in batches(data, batch_size=256, device="cpu")]).numpy()


def compare(
    model: nn.Module,
    compressed_path: str | Path,
    test: ImageSet,
    *,
    box_weight: float = 1.0,
    threads: int | None = None,
    repeats: int = 20,
    adversarial: ImageSet | None = None,
) -> dict:
    """Before (the torch model, float, eager, CPU) against after (the .onnx file in onnxruntime).

    Returns {"before": {...}, "after": {...}, ratios and changes}: each side
    has "bytes" (before: global_model.pt as fedclinic saves it),
    "ms_per_image_b1" and "ms_per_image_b64" (medians of `repeats` timed
    calls after a warm-up, both on `threads` CPU threads, default torch's),
    "accuracy", "f1", "iou" on `test`, and "robust_accuracy" on
    `adversarial`: images crafted against the torch model, with the clean
    labels (fedclinic.analysis.adversarial), so "after" is a transfer
    attack on the compressed model; NaN on both sides when not given.
    "agreement" is the share of test images both predict the same class for.
    """
    if len(test) < max(LATENCY_BATCHES):
        raise ValueError(f"compare needs at least {max(LATENCY_BATCHES)} test images to time batches, got {len(test)}")
    threads = threads or torch.get_num_threads()
    before_model = copy.deepcopy(model).cpu().eval()
    # Without spin-waiting: spinning onnxruntime threads kept the cores from torch's, whose
    # calls then took 100 ms instead of 0.3 ms on a 2-core machine. Costs onnxruntime a little.
    after_model = OnnxModel(compressed_path, threads=threads, spin_wait=False)
    if after_model.class_names != test.class_names:
        raise ValueError(f"'{compressed_path}' predicts {after_model.class_names} but the test set has {test.class_names}")
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        latencies = _ms_per_image((before_model, after_model), test, repeats=repeats)
    finally:
        torch.set_num_threads(saved_threads)
    sides = {}
    for side, net, size, latency in zip(
        ("before", "after"),
        (before_model, after_model),
        (_saved_bytes(before_model, test.class_names), Path(compressed_path).stat().st_size),
        latencies,
    ):
        clean = evaluate(net, test, box_weight=box_weight)
        robust = math.nan if adversarial is None else evaluate(net, adversarial, box_weight=box_weight)["accuracy"]
        sides[side] = {"bytes": size, **latency, "accuracy": clean["accuracy"], "f1": clean["f1"],
                       "iou": clean["iou"], "robust_accuracy": robust}
    before, after = sides["before"], sides["after"]
    agreement = float(np.mean(_predicted_labels(before_model, test) == _predicted_labels(after_model, test)))
    return {
        "before": before,
        "after": after,
        "size_ratio": before["bytes"] / after["bytes"],  # times smaller
        **{f"speedup_b{b}": before[f"ms_per_image_b{b}"] / after[f"ms_per_image_b{b}"] for b in LATENCY_BATCHES},
        "accuracy_change": after["accuracy"] - before["accuracy"],
        "iou_change": after["iou"] - before["iou"],
        "robust_accuracy_change": after["robust_accuracy"] - before["robust_accuracy"],
        "agreement": agreement,
        "threads": threads,
        "n": len(test),
    }
