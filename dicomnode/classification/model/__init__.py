"""The ConvNet, its checkpoints and the shipped default model (one definition for node and trainer)."""

from dicomnode.classification.model.checkpoint import (
    BODY_PARTS,
    CHECKPOINT_NAME,
    CLASSES,
    DEFAULT_MODEL_DIR,
    LoadedModel,
    checkpoint_path,
    load_model,
    make_untrained_checkpoint,
    predict_proba,
    read_checkpoint,
    resolve_device,
    save_checkpoint,
)
from dicomnode.classification.model.net import DEFAULT_NET_CONFIG, ConvNet, build_net, complete_net_config

__all__ = [
    "BODY_PARTS", "CHECKPOINT_NAME", "CLASSES", "DEFAULT_MODEL_DIR", "DEFAULT_NET_CONFIG", "ConvNet", "LoadedModel",
    "build_net", "checkpoint_path", "complete_net_config", "load_model", "make_untrained_checkpoint",
    "predict_proba", "read_checkpoint", "resolve_device", "save_checkpoint",
]
