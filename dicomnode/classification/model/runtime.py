"""The model the node infers with: the checkpoint's ONNX twin on onnxruntime, or the checkpoint on torch.

On the CPU the node runs the twin (:mod:`.onnx_twin`) on onnxruntime: importing onnxruntime takes
~0.3 s where torch takes ~2 s, and its convolutions ran this net 2.5x faster than torch on the 2-core
CPU (652 slices: 1.3 s against 3.3 s, one thread), which is what ``dicomnode classify`` and a worker
spend on a series. Torch is used instead

- on a CUDA device (``worker.device: cuda...``, or ``auto`` when an NVIDIA GPU is visible);
- when the twin is missing, was made from another checkpoint file (its recorded SHA-256 differs), or
  onnxruntime is not installed: the log says which, and the probabilities are the same to ~1e-6.

Everything here imports without torch; :func:`predict_proba` takes either kind of model.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dicomnode.classification.imaging.preprocess import PreprocessParams
from dicomnode.classification.model.classes import check_class_order
from dicomnode.classification.model.files import (
    CHECKPOINT_SHA256_KEY,
    checkpoint_path,
    file_sha256,
    onnx_twin_path,
    read_checkpoint_header,
)

log = logging.getLogger(__name__)

class TwinUnusable(Exception):
    """The checkpoint's ONNX twin cannot be used; the message says why (torch is used instead)."""


@dataclass
class OnnxModel:
    """A checkpoint's twin ready for inference on onnxruntime's CPU provider (the fields that
    :class:`dicomnode.classification.model.checkpoint.LoadedModel` has, but the net)."""

    session: Any
    classes: tuple[str, ...]
    preprocess: PreprocessParams
    version: str
    net_config: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    device: str = "cpu (onnxruntime)"


def nvidia_gpu_visible() -> bool:
    """Whether the NVIDIA driver reports a GPU (``/proc/driver/nvidia/gpus``); asked without torch."""
    gpus = Path("/proc/driver/nvidia/gpus")
    try:
        return gpus.is_dir() and any(gpus.iterdir())
    except OSError:
        return False


def load_onnx_model(path: str | Path | None, threads: int = 0) -> OnnxModel:
    """The twin of the checkpoint at ``path`` (None = the shipped model) on onnxruntime with ``threads``
    intra-op threads (0 = one per core). ``TwinUnusable`` says why it cannot be used (also when the
    checkpoint cannot be read without torch); ``FileNotFoundError`` names a checkpoint that is missing."""
    p = checkpoint_path(path)
    try:
        header = read_checkpoint_header(path)
    except ValueError as exc:  # torch may still read it (load_model then says what is wrong, if anything)
        raise TwinUnusable(str(exc)) from exc
    twin = onnx_twin_path(p)
    if not twin.is_file():
        raise TwinUnusable(f"no ONNX twin {twin.name} beside {p}")
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise TwinUnusable(f"onnxruntime is not installed ({exc})") from exc
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads if threads > 0 else max(1, os.cpu_count() or 1)
    options.inter_op_num_threads = 1
    # idle threads sleep instead of spinning: the reader processes decoding the next slices need the cores
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        session = ort.InferenceSession(str(twin), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # a truncated or foreign file
        raise TwinUnusable(f"{twin}: onnxruntime cannot load it ({exc})") from exc
    recorded = session.get_modelmeta().custom_metadata_map.get(CHECKPOINT_SHA256_KEY)
    if recorded != file_sha256(p):
        raise TwinUnusable(f"{twin} was made from another checkpoint than {p} (SHA-256 differs)")
    preprocess = PreprocessParams.from_dict(header["preprocess"])
    classes = check_class_order(header["classes"], str(p))
    shape = session.get_inputs()[0].shape
    if list(shape[1:]) != [preprocess.channels, preprocess.size, preprocess.size]:
        raise TwinUnusable(f"{twin}: input {shape[1:]} does not match the checkpoint's preprocessing")
    if session.get_outputs()[0].shape[1] != len(classes):
        raise TwinUnusable(f"{twin}: {session.get_outputs()[0].shape[1]} outputs for {len(classes)} classes")
    return OnnxModel(session=session, classes=classes, preprocess=preprocess, version=str(header["version"]),
                     net_config=dict(header["net_config"]), extra=dict(header.get("extra") or {}), path=p)


def load_inference_model(path: str | Path | None = None, device: str = "auto", threads: int = 0) -> Any:
    """The model the node infers with for the checkpoint at ``path`` (None = the shipped model) on
    ``device`` (``worker.device``): an :class:`OnnxModel` on the CPU when its twin is usable, else a
    torch :class:`LoadedModel` (with ``threads`` intra-op threads, 0 = one per core). The log line says
    which, and why torch when the twin was meant to be used."""
    device = str(device or "auto")
    if device == "cpu" or (device == "auto" and not nvidia_gpu_visible()):
        try:
            return load_onnx_model(path, threads)
        except TwinUnusable as exc:
            log.info("model %s: inference runs on torch: %s", checkpoint_path(path), exc)
    from dicomnode.classification.model.checkpoint import load_model

    configure_torch(threads)
    return load_model(path, device)


def configure_torch(threads: int = 0) -> int:
    """Set torch's intra-op threads (0 = one per core); returns the number set."""
    import torch

    n = threads if threads > 0 else max(1, os.cpu_count() or 1)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def predict_proba(model: Any, batch: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Class probabilities (N, n_classes) float32 for preprocessed input (N, C, S, S), from an
    :class:`OnnxModel` or a torch ``LoadedModel``."""
    if not isinstance(model, OnnxModel):
        from dicomnode.classification.model.checkpoint import predict_proba as predict_proba_torch

        return predict_proba_torch(model, batch, batch_size)
    x = np.asarray(batch, dtype=np.float32)
    if x.ndim != 4:
        raise ValueError(f"predict_proba: expected (N, C, S, S), got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        return np.zeros((0, len(model.classes)), dtype=np.float32)
    name = model.session.get_inputs()[0].name
    out = [model.session.run(None, {name: np.ascontiguousarray(x[i:i + batch_size])})[0]
           for i in range(0, x.shape[0], batch_size)]
    return np.concatenate(out).astype(np.float32, copy=False)
