"""A checkpoint's ONNX twin: the same net as an ONNX graph, for inference on onnxruntime without torch.

:func:`save_checkpoint <dicomnode.classification.model.checkpoint.save_checkpoint>` writes
``model.onnx`` beside every ``model.pt``. The graph is built here from the net's layers (each BatchNorm
folded into its convolution, as :func:`inference_copy` does for torch), not by tracing: Conv, Relu,
MaxPool, Flatten, Gemm and a final Softmax, so the twin outputs the probabilities that
:func:`predict_proba <dicomnode.classification.model.checkpoint.predict_proba>` computes (to float
rounding, ~1e-6; ``tests/test_model.py`` compares them on real slices). A layer this builder does not
know raises ``TypeError`` naming it, so a change of :class:`ConvNet` cannot produce a twin that differs.

The twin records the SHA-256 of the checkpoint file it was made from; the node uses a twin only while
that matches (:mod:`.runtime`), so a checkpoint replaced without its twin is read with torch.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from dicomnode.classification.model.files import CHECKPOINT_SHA256_KEY, file_sha256, onnx_twin_path
from dicomnode.classification.model.net import ConvNet, inference_copy

#: ONNX opset of the twin (onnxruntime >= 1.14 runs it).
OPSET = 17
INPUT_NAME = "input"
OUTPUT_NAME = "probabilities"


def onnx_graph(net: ConvNet, version: str = "") -> onnx.ModelProto:
    """``net`` (eval mode, BatchNorm folded) as an ONNX model: input (N, C, S, S) float32, output the
    softmax probabilities (N, classes). ``TypeError`` names a layer with no ONNX mapping here."""
    fused = inference_copy(net)
    cfg = net.config
    nodes: list[onnx.NodeProto] = []
    weights: list[onnx.TensorProto] = []
    current = INPUT_NAME

    def add(op: str, inputs: list[str], **attrs: object) -> None:
        nonlocal current
        out = f"{op.lower()}{len(nodes)}"
        nodes.append(helper.make_node(op, [current, *inputs], [out], **attrs))
        current = out

    def constant(name: str, value: np.ndarray) -> str:
        weights.append(numpy_helper.from_array(np.ascontiguousarray(value, dtype=np.float32), name))
        return name

    layers = [*fused.conv, *fused.hidden, *fused.head]
    for i, layer in enumerate(layers):
        if isinstance(layer, nn.Conv2d):
            (kh, kw), (ph, pw) = layer.kernel_size, layer.padding
            bias = layer.bias.detach().numpy() if layer.bias is not None else np.zeros(layer.out_channels)
            add("Conv", [constant(f"conv{i}.weight", layer.weight.detach().contiguous().numpy()),
                         constant(f"conv{i}.bias", bias)],
                kernel_shape=[kh, kw], pads=[ph, pw, ph, pw], strides=list(layer.stride))
        elif isinstance(layer, nn.ReLU):
            add("Relu", [])
        elif isinstance(layer, nn.MaxPool2d):
            if layer.padding not in (0, (0, 0)) or layer.dilation not in (1, (1, 1)) or layer.ceil_mode:
                raise TypeError(f"layer {i}: MaxPool2d with padding, dilation or ceil_mode has no mapping here")
            k = layer.kernel_size if isinstance(layer.kernel_size, int) else layer.kernel_size[0]
            s = layer.stride if isinstance(layer.stride, int) else layer.stride[0]
            add("MaxPool", [], kernel_shape=[k, k], strides=[s, s])
        elif isinstance(layer, nn.Flatten):
            add("Flatten", [], axis=1)
        elif isinstance(layer, nn.Dropout):
            continue  # identity at inference
        elif isinstance(layer, nn.Linear):
            add("Gemm", [constant(f"fc{i}.weight", layer.weight.detach().numpy()),
                         constant(f"fc{i}.bias", layer.bias.detach().numpy())], transB=1)
        else:
            raise TypeError(f"layer {i}: {type(layer).__name__} has no ONNX mapping in {__name__}")
    nodes.append(helper.make_node("Softmax", [current], [OUTPUT_NAME], axis=1))
    graph = helper.make_graph(
        nodes, "dicomnode_convnet",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT,
                                       ["N", cfg["in_channels"], cfg["input_size"], cfg["input_size"]])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N", cfg["num_classes"]])],
        weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="dicomnode", producer_version=str(version))
    model.ir_version = 8  # readable by onnxruntime releases older than the onnx package used here
    onnx.checker.check_model(model)
    return model


def write_onnx_twin(checkpoint: str | Path, net: ConvNet, version: str = "") -> Path:
    """Write ``net``'s twin beside the checkpoint file ``checkpoint`` (atomically: temp file + rename),
    recording the checkpoint's SHA-256; returns the twin's path."""
    checkpoint = Path(checkpoint)
    model = onnx_graph(net, version)
    helper.set_model_props(model, {CHECKPOINT_SHA256_KEY: file_sha256(checkpoint), "dicomnode.version": str(version)})
    target = onnx_twin_path(checkpoint)
    fd, tmp = tempfile.mkstemp(prefix=".model-", suffix=".onnx.tmp", dir=target.parent)
    os.close(fd)
    try:
        Path(tmp).write_bytes(model.SerializeToString())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target
