"""The ConvNet, its checkpoints and the shipped default model (one definition for node and trainer)."""

from dicomnode.classification.model.checkpoint import (
    ANATOMICAL_ORDER,
    BODY_PARTS,
    CHECKPOINT_NAME,
    CLASSES,
    DEFAULT_MODEL_DIR,
    FIVE_CLASSES,
    LoadedModel,
    check_class_order,
    checkpoint_path,
    load_model,
    make_untrained_checkpoint,
    node_model_path,
    predict_proba,
    read_checkpoint,
    resolve_device,
    save_checkpoint,
)
from dicomnode.classification.model.net import DEFAULT_NET_CONFIG, ConvNet, build_net, complete_net_config

__all__ = [
    "ANATOMICAL_ORDER", "FIVE_CLASSES", "check_class_order", "BODY_PARTS", "CHECKPOINT_NAME", "CLASSES", "DEFAULT_MODEL_DIR", "DEFAULT_NET_CONFIG", "ConvNet", "LoadedModel",
    "build_net", "checkpoint_path", "complete_net_config", "load_model", "make_untrained_checkpoint", "node_model_path",
    "predict_proba", "read_checkpoint", "resolve_device", "save_checkpoint",
]
