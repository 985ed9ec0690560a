"""Checkpoints: weights + net config + class order + preprocessing + version, in one file.

A checkpoint is a ``torch.save`` dict read back with ``weights_only=True`` (no pickled code), so
inference rebuilds the model from the file alone. Every checkpoint written here gets an ONNX twin
beside it, which the node infers with on the CPU (:mod:`.runtime`). ``load_model(None)`` loads the shipped default model in
``dicomnode/classification/model/default/model.pt``; a directory is read as ``<dir>/model.pt``.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dicomnode.classification.imaging.preprocess import PreprocessParams
from dicomnode.classification.model.classes import (  # noqa: F401 (names of the model's public API)
    ANATOMICAL_ORDER,
    BODY_PARTS,
    CLASSES,
    FIVE_CLASSES,
    check_class_order,
)
from dicomnode.classification.model.files import (  # noqa: F401
    CHECKPOINT_NAME,
    DEFAULT_MODEL_DIR,
    FORMAT,
    FORMAT_VERSION,
    PROMOTED_RELATIVE,
    UNTRAINED_VERSION,
    check_payload,
    checkpoint_path,
    existing_checkpoint,
    node_model_path,
)
from dicomnode.classification.model.net import ConvNet, build_net, inference_copy

@dataclass
class LoadedModel:
    """A model ready for inference (``net`` in eval mode on ``device``)."""

    net: ConvNet
    classes: tuple[str, ...]
    preprocess: PreprocessParams
    version: str
    device: torch.device
    net_config: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    #: the fused, channels-last copy :func:`predict_proba` runs (None: it runs ``net``)
    inference_net: torch.nn.Module | None = None


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; anything else as given."""
    if isinstance(device, torch.device):
        return device
    if device in ("", "auto", None):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def save_checkpoint(path: str | Path, net: torch.nn.Module, net_config: dict[str, Any],
                    preprocess: PreprocessParams, version: str, extra: dict[str, Any] | None = None,
                    classes: tuple[str, ...] = CLASSES) -> Path:
    """Write a checkpoint atomically (temp file + rename), then its ONNX twin beside it (``model.onnx``,
    :func:`write_onnx_twin`); a directory ``path`` gets ``model.pt``. Returns the checkpoint's path.

    ``extra`` must hold only JSON-like values (dict/list/str/int/float/bool/None) and tensors.
    """
    p = Path(path)
    if p.is_dir() or (not p.suffix and not p.exists()):
        p.mkdir(parents=True, exist_ok=True)
        p = p / CHECKPOINT_NAME
    p.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").clone() for k, v in net.state_dict().items()}
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "version": str(version),
        "classes": list(classes),
        "net_config": dict(net_config),
        "preprocess": preprocess.to_dict(),
        "state_dict": state,
        "extra": dict(extra or {}),
    }
    fd, tmp = tempfile.mkstemp(prefix=".model-", suffix=".tmp", dir=p.parent)
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a model is meant to be read by the node's user too
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    from dicomnode.classification.model.onnx_twin import write_onnx_twin

    write_onnx_twin(p, net, str(version))  # a crash before this leaves a stale twin, which is not used
    return p


def read_checkpoint(path: str | Path | None) -> dict[str, Any]:
    """The raw checkpoint dict (checked), or ``FileNotFoundError``/``ValueError`` naming the file."""
    p = existing_checkpoint(path)
    try:
        payload = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt / not a torch file
        raise ValueError(f"{p}: not a readable dicomnode checkpoint ({exc})") from exc
    return check_payload(p, payload, ("version", "classes", "net_config", "preprocess", "state_dict"))


def load_model(path: str | Path | None = None, device: str | torch.device = "auto") -> LoadedModel:
    """Rebuild the model from a checkpoint file (or directory); None = the shipped default model."""
    p = checkpoint_path(path)
    payload = read_checkpoint(path)
    try:
        preprocess = PreprocessParams.from_dict(payload["preprocess"])
        net = build_net(payload["net_config"])
        net.load_state_dict(payload["state_dict"])
    except (ValueError, RuntimeError, TypeError) as exc:
        raise ValueError(f"{p}: checkpoint does not rebuild: {exc}") from exc
    classes = check_class_order(payload["classes"], str(p))
    if net.config["num_classes"] != len(classes):
        raise ValueError(f"{p}: {len(classes)} classes but the net has {net.config['num_classes']} outputs")
    if net.config["in_channels"] != preprocess.channels or net.config["input_size"] != preprocess.size:
        raise ValueError(f"{p}: net input ({net.config['in_channels']}x{net.config['input_size']}) does not match "
                         f"preprocessing ({preprocess.channels}x{preprocess.size})")
    dev = resolve_device(device)
    net.to(dev).eval()
    return LoadedModel(net=net, classes=classes, preprocess=preprocess, version=str(payload["version"]),
                       device=dev, net_config=dict(payload["net_config"]), extra=dict(payload.get("extra") or {}),
                       path=p, inference_net=inference_copy(net).to(dev))


def predict_proba(model: LoadedModel, batch: np.ndarray | torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """Class probabilities (N, n_classes) float32 for preprocessed input (N, C, S, S).

    No gradients; on CUDA under autocast (bf16 where supported, else fp16), float32 on the CPU.
    """
    x = torch.as_tensor(batch)
    if x.ndim != 4:
        raise ValueError(f"predict_proba: expected (N, C, S, S), got shape {tuple(x.shape)}")
    out = []
    dev = model.device
    net = model.inference_net if model.inference_net is not None else model.net
    memory_format = torch.channels_last if model.inference_net is not None else torch.contiguous_format
    with torch.inference_mode():
        for i in range(0, x.shape[0], batch_size):
            chunk = x[i:i + batch_size].to(dev, dtype=torch.float32, non_blocking=True)
            chunk = chunk.contiguous(memory_format=memory_format)
            if dev.type == "cuda":
                dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
                with torch.autocast("cuda", dtype=dtype):
                    logits = net(chunk)
            else:
                logits = net(chunk)
            out.append(torch.softmax(logits.float(), dim=1).cpu())
    if not out:
        return np.zeros((0, len(model.classes)), dtype=np.float32)
    return torch.cat(out).numpy()


def make_untrained_checkpoint(path: str | Path, seed: int = 0) -> Path:
    """A tiny randomly initialised model for tests where the weights do not matter."""
    torch.manual_seed(seed)
    preprocess = PreprocessParams(size=64, pixel_mm=6.4)
    net_config = {"in_channels": preprocess.channels, "input_size": preprocess.size, "num_classes": len(CLASSES),
                  "widths": [4, 8, 8, 8, 8], "kernels": [3, 3, 3, 3, 3], "fc": [16]}
    net = build_net(net_config)
    return save_checkpoint(path, net, net_config, preprocess, f"{UNTRAINED_VERSION}-seed{seed}",
                           extra={"note": "randomly initialised; for tests only"})
