"""Static int8 quantisation of the ONNX export, calibrated on a model's stored calibration cells:
what the onnx-int8 engine runs, and whether it is a model's default engine.

The int8 graph is built from the fp32 export and the calibration cells on first use, anywhere,
and cached per weights hash like the fp32 export. Choosing the calibration cells and the
agreement check live in core.evaluation.int8_check.
"""

from __future__ import annotations

import hashlib
import io
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.data.images import decode_image
from core.schema.contract import WeightsError
from core.schema.files import atomic_path

CALIBRATION_FILE = "calibration.zip"


CARD_KEY = "int8"


# Written into the int8 graph's metadata and the card; quantize_onnx does exactly this.
METHOD = (
    "ONNX Runtime quantize_static: QDQ format, int8 weights per output channel (depthwise "
    "convolutions included) in 7 bits (reduce_range), uint8 activations, MinMax calibration "
    "over the calibration cells; ReLU6 (exported as Clip) folded into the preceding "
    "convolution's output range; the input normalisation folded into the first convolution, "
    "which reads the uint8 pixels as they are (scale 1, zero point 0; its padding is the mean "
    "colour, as the float graph's zero padding after normalising); the softmax and the stages "
    "listed in float_blocks kept in float"
)


@dataclass(frozen=True)
class CalibrationSet:
    """The cells an int8 graph is calibrated on, as recorded in the card."""

    file: str
    sha256: str
    cells: int
    cases: tuple[str, ...]
    part: str  # which part of the model's patient split they come from: never "test"
    seed: int
    # Stages left in float. MobileNetV2's first inverted-residual block (features.1: a
    # depthwise 3x3 and a linear 1x1 projection at half resolution) loses the most to 8 bits:
    # on the validation patients keeping it float cut the mean |logit change| from 0.22 to
    # 0.15 and the changed calls from 27 to 13 of 2,072.
    float_blocks: tuple[str, ...] = ("features.1",)

    def cache_key(self) -> str:
        """What the int8 graph depends on besides the fp32 graph."""
        return f"{self.sha256}:{','.join(self.float_blocks)}"


def calibration_set(card: dict) -> CalibrationSet | None:
    """The card's calibration record, or None if the model was never calibrated."""
    rec = card.get(CARD_KEY, {}).get("calibration")
    if not rec:
        return None
    return CalibrationSet(
        rec["file"],
        rec["sha256"],
        int(rec["cells"]),
        tuple(rec["cases"]),
        rec["part"],
        int(rec["seed"]),
        tuple(rec.get("float_blocks", ())),
    )


def required_calibration(folder: Path | str, card: dict) -> CalibrationSet:
    """The card's calibration record; raises WeightsError saying how to make one if absent."""
    rec = calibration_set(card)
    if rec is None:
        raise WeightsError(
            f"{folder} has no int8 calibration set: run `malaria calibrate int8 "
            f"{folder} --data DEVELOPMENT_DATA`, or use --engine onnx"
        )
    return rec


def default_engine(card: dict) -> str:
    """``onnx-int8`` when the card records that int8 passed the agreement rule on the test
    patients, or the training cells of a model with none (``malaria check int8``),
    else ``onnx`` (fp32)."""
    passed = card.get(CARD_KEY, {}).get("check", {}).get("passed")
    return "onnx-int8" if passed is True and calibration_set(card) else "onnx"


def calibration_images(folder: Path | str, card: dict, *, size: int) -> tuple[np.ndarray, str]:
    """The calibration cells of a model folder as uint8 (N, size, size, 3), and the file's
    sha256. Raises WeightsError if the model has no calibration set, or if the file is missing,
    differs from the card's sha256 or holds an unreadable image."""
    rec = required_calibration(folder, card)
    path = Path(folder) / rec.file
    if Path(rec.file).name != rec.file or not path.is_file():
        raise WeightsError(f"the calibration file {path} is missing")
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != rec.sha256:
        raise WeightsError(
            f"{path} does not match its card (sha256 {digest[:12]}... vs "
            f"{rec.sha256[:12]}...); refusing to calibrate on it"
        )
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        names = sorted(n for n in zf.namelist() if not n.endswith("/"))
        try:
            images = np.stack([decode_image(zf.read(n), size=size) for n in names])
        except ValueError as exc:
            raise WeightsError(f"{path}: {exc}") from None
    return images, digest


def quantize_onnx(
    fp32: bytes,
    calibration: np.ndarray,
    out: Path,
    *,
    description: str,
    float_blocks: Sequence[str] = (),
    batch_size: int = 32,
) -> Path:
    """Write the int8 (QDQ) version of the fp32 graph ``fp32`` to ``out``.

    ``calibration``: uint8 (N, S, S, 3) cells the graph's input takes. ``float_blocks``: model
    stages (``features.1``) whose nodes stay float. ``description`` (which cells, from which
    patients) goes into the graph's metadata with METHOD. Deterministic: the same graph and
    cells give the same bytes.
    """
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(range(0, len(calibration), batch_size))

        def get_next(self) -> dict | None:
            i = next(self.batches, None)
            return None if i is None else {"images": calibration[i : i + batch_size]}

    graph = onnx.load_from_string(fp32)
    pixels = fold_normalisation(graph)
    # the uint8 prologue (layout, padding) and the softmax epilogue stay as they are
    keep_float = [
        n.name
        for n in graph.graph.node
        if n.op_type in ("Cast", "Transpose", "Pad", "Max", "Softmax", "Gather")
        or any(f"/{block}/" in n.name for block in float_blocks)
    ]
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        onnx.save(graph, str(tmp / "fp32.onnx"))
        # shape inference and graph clean-up first, as ONNX Runtime advises before quantising
        quant_pre_process(str(tmp / "fp32.onnx"), str(tmp / "pre.onnx"), skip_symbolic_shape=True)
        quantize_static(
            str(tmp / "pre.onnx"),
            str(tmp / "int8.onnx"),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            # 7-bit weights: without VNNI (AVX2, AVX-512F) ONNX Runtime multiplies uint8 by
            # int8 in pairs summed into 16 bits, which saturate with full-range weights. On the
            # holdout model's validation patients, on such a CPU, 7 bits cut the mean |logit
            # change| from fp32 from 0.19 to 0.13 and the changed calls from 21 to 11 of
            # 2,072, at the same speed.
            reduce_range=True,
            nodes_to_exclude=keep_float,
            # the pixels as they are: 8 bits already, nothing to round
            extra_options={
                "TensorQuantOverrides": {
                    pixels: [
                        {"scale": np.array(1, np.float32), "zero_point": np.array(0, np.uint8)}
                    ]
                }
            },
        )
        model = onnx.load(str(tmp / "int8.onnx"))
    _feed_pixels(model, pixels)
    clips = [n.name for n in model.graph.node if n.op_type == "Clip" and n.name not in keep_float]
    if clips:  # ReLU6 left as a float Clip between QDQ pairs: slow and a sign of a bad graph
        raise RuntimeError(f"quantisation left {len(clips)} Clip (ReLU6) nodes unfused")
    onnx.helper.set_model_props(model, {"quantization": METHOD, "calibration": description})
    with atomic_path(out) as tmp:
        onnx.save(model, str(tmp))
    return out


def _producers(graph: Any) -> dict[str, Any]:
    return {out: n for n in graph.node for out in n.output}


def _constant(graph: Any, name: str) -> np.ndarray:
    from onnx import numpy_helper

    for t in graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    node = _producers(graph).get(name)
    if node is not None and node.op_type == "Identity":  # the exporter's shared tensors
        return _constant(graph, node.input[0])
    if node is None or node.op_type != "Constant":
        raise ValueError(f"{name} is not a constant")
    return numpy_helper.to_array(node.attribute[0].t)


def fold_normalisation(model: Any) -> str:
    """Fold the export's input normalisation into its first convolution, in place; returns the
    name of the convolution's new input: the uint8 pixels, cast to float.

    The export turns uint8 pixels into ``(x / 255 - mean) / std`` with three float operations
    over the whole input (in the int8 graph, where ONNX Runtime lays them out channels-last,
    they took a fifth of the time). They are affine per channel, so the first convolution can
    take the pixels as they are: its weights are scaled by ``1 / (255 std)`` per input channel
    and its bias takes ``mean / std``. Its zero padding of the normalised image, which is the
    mean colour in pixels, becomes an explicit padding with the mean colour rounded to 8 bits
    (Pad, then Max with that border): the only change, at most half a pixel level on the
    border. Raises ValueError if the graph does not start as
    core.inference.onnx_cache.export_onnx writes it.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    consumers: dict[str, list] = {}
    for n in graph.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)

    def only_consumer(name: str, op: str) -> Any:
        found = consumers.get(name, [])
        if len(found) != 1 or found[0].op_type != op:
            raise ValueError(f"unexpected graph: {name} should feed one {op}")
        return found[0]

    transpose = only_consumer(graph.input[0].name, "Transpose")
    cast = only_consumer(transpose.output[0], "Cast")
    scale = only_consumer(cast.output[0], "Div")
    centre = only_consumer(scale.output[0], "Sub")
    spread = only_consumer(centre.output[0], "Div")
    conv = only_consumer(spread.output[0], "Conv")
    a = 1 / (float(_constant(graph, scale.input[1])) * _constant(graph, spread.input[1]).ravel())
    b = _constant(graph, centre.input[1]).ravel() / _constant(graph, spread.input[1]).ravel()
    w = _constant(graph, conv.input[1]).astype(np.float64)
    bias = _constant(graph, conv.input[2]) if len(conv.input) > 2 else np.zeros(len(w))
    folded_bias = bias.astype(np.float64) - (w * b[None, :, None, None]).sum((1, 2, 3))
    graph.initializer.extend(
        [
            numpy_helper.from_array((w * a[None, :, None, None]).astype(np.float32), "pixel_w"),
            numpy_helper.from_array(folded_bias.astype(np.float32), "pixel_b"),
        ]
    )
    replaced, conv.input[1:] = set(conv.input[1:]), ["pixel_w", "pixel_b"]
    used = {name for n in graph.node for name in n.input}
    kept = [t for t in graph.initializer if t.name not in replaced - used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    # the padding moves out of the convolution: the mean colour around the pixels
    attrs = {att.name: helper.get_attribute_value(att) for att in conv.attribute}
    top, left, bottom, right = attrs.get("pads", [0, 0, 0, 0])
    del conv.attribute[:]
    conv.attribute.extend(helper.make_attribute(k, v) for k, v in attrs.items() if k != "pads")
    size = [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim][1:3]
    border = np.zeros((1, len(b), size[0] + top + bottom, size[1] + left + right), np.uint8)
    mean_colour = np.clip(np.rint(b / a), 0, 255).astype(np.uint8)[None, :, None, None]
    border[...] = mean_colour
    border[:, :, top : top + size[0], left : left + size[1]] = 0  # Max(pixel, 0): the pixel
    pads = np.array([0, 0, top, left, 0, 0, bottom, right], np.int64)
    graph.initializer.extend(
        [numpy_helper.from_array(pads, "pixel_pads"), numpy_helper.from_array(border, "border")]
    )
    pad = helper.make_node("Pad", [transpose.output[0], "pixel_pads"], ["padded"], name="/Pad")
    framed = helper.make_node("Max", ["padded", "border"], ["framed"], name="/Max")
    cast.input[0] = "framed"
    conv.input[0] = cast.output[0]
    dropped = {id(scale), id(centre), id(spread)}
    constants = {scale.input[1], centre.input[1], spread.input[1]}
    nodes = [
        n
        for n in graph.node
        if id(n) not in dropped and not (n.op_type == "Constant" and n.output[0] in constants)
    ]
    at = nodes.index(cast)
    nodes[at:at] = [pad, framed]
    del graph.node[:]
    graph.node.extend(nodes)
    return cast.output[0]


def _feed_pixels(model: Any, pixels: str) -> None:
    """Drop the Cast and QuantizeLinear (scale 1, zero point 0) in front of the first
    convolution's DequantizeLinear, in place: it takes the uint8 pixels they came from."""
    graph = model.graph
    cast = _producers(graph)[pixels]
    quant = [n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] == pixels]
    if cast.op_type != "Cast" or len(quant) != 1:
        raise RuntimeError("quantisation did not quantise the pixels where expected")
    for n in graph.node:
        n.input[:] = [cast.input[0] if name == quant[0].output[0] else name for name in n.input]
    kept = [n for n in graph.node if n is not cast and n is not quant[0]]
    del graph.node[:]
    graph.node.extend(kept)
