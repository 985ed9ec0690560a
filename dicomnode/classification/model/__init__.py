"""The ConvNet, its checkpoints and the shipped default model (one definition for node and trainer).

Names are imported on first use (PEP 562), so that the class list, the Body Part terms, the
checkpoint paths (:mod:`.classes`, :mod:`.files`) and the node's inference on a checkpoint's ONNX twin
(:mod:`.runtime`) come without importing torch; the net, torch loading and the twin's writer
(:mod:`.net`, :mod:`.checkpoint`, :mod:`.onnx_twin`) import it.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "classes": ("ANATOMICAL_ORDER", "BODY_PARTS", "CLASSES", "FIVE_CLASSES", "check_class_order"),
    "files": ("CHECKPOINT_NAME", "DEFAULT_MODEL_DIR", "checkpoint_path", "node_model_path", "onnx_twin_path",
              "read_checkpoint_header", "read_preprocess"),
    "runtime": ("OnnxModel", "TwinUnusable", "configure_torch", "load_inference_model", "load_onnx_model",
                "predict_proba"),
    "checkpoint": ("LoadedModel", "load_model", "make_untrained_checkpoint", "read_checkpoint",
                   "resolve_device", "save_checkpoint"),
    "onnx_twin": ("write_onnx_twin",),
    "net": ("DEFAULT_NET_CONFIG", "ConvNet", "build_net", "complete_net_config"),
}
_HOME_OF = {name: module for module, names in _HOMES.items() for name in names}

__all__ = sorted(_HOME_OF)


def __getattr__(name: str) -> Any:
    module = _HOME_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
