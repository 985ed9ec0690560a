"""The ConvNet of Roth et al. (2015), with configurable widths, kernels, strides and input size.

Five convolutional layers, each followed by (optional) batch normalisation, ReLU and max-pooling, then
fully connected layers with ReLU and dropout, and a linear layer to the class logits; softmax is
applied by :func:`dicomnode.classification.model.predict_proba`. ``net_config`` is a plain dict (stored in checkpoints):

=============  ===========================  ====================================================
key            default                      meaning
=============  ===========================  ====================================================
in_channels    3                            input channels (one per preprocessing window)
input_size     128                          input height and width S
num_classes    6                            output classes (one per class of the checkpoint)
widths         [16, 32, 64, 64, 128]        output channels of the conv layers
kernels        [5, 3, 3, 3, 3]              conv kernel sizes ("same" padding)
strides        [1, 1, 1, 1, 1]              conv strides
pools          [2, 2, 2, 2, 2]              max-pool size after each conv (1 = none)
fc             [128]                        hidden fully connected widths
dropout        0.5                          dropout before each fully connected layer
batchnorm      true                         BatchNorm2d after each conv
=============  ===========================  ====================================================
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

DEFAULT_NET_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "input_size": 128,
    "num_classes": 6,
    "widths": [16, 32, 64, 64, 128],
    "kernels": [5, 3, 3, 3, 3],
    "strides": [1, 1, 1, 1, 1],
    "pools": [2, 2, 2, 2, 2],
    "fc": [128],
    "dropout": 0.5,
    "batchnorm": True,
}


def complete_net_config(net_config: dict[str, Any] | None) -> dict[str, Any]:
    """``net_config`` with defaults filled in and checked; ``ValueError`` names a bad key."""
    cfg = dict(DEFAULT_NET_CONFIG)
    unknown = sorted(set(net_config or {}) - set(cfg))
    if unknown:
        raise ValueError(f"net_config: unknown keys {unknown} (known: {sorted(cfg)})")
    cfg.update(net_config or {})
    for key in ("widths", "kernels", "strides", "pools", "fc"):
        cfg[key] = [int(v) for v in cfg[key]]
    n = len(cfg["widths"])
    if n == 0:
        raise ValueError("net_config.widths: at least one conv layer is needed")
    for key in ("kernels", "strides", "pools"):
        if len(cfg[key]) != n:
            raise ValueError(f"net_config.{key}: {len(cfg[key])} values for {n} conv layers")
        if any(v < 1 for v in cfg[key]):
            raise ValueError(f"net_config.{key}: values must be >= 1, got {cfg[key]}")
    if any(w < 1 for w in cfg["widths"] + cfg["fc"]):
        raise ValueError("net_config: widths and fc sizes must be >= 1")
    for key in ("in_channels", "input_size", "num_classes"):
        cfg[key] = int(cfg[key])
        if cfg[key] < 1:
            raise ValueError(f"net_config.{key} must be >= 1, got {cfg[key]}")
    cfg["dropout"] = float(cfg["dropout"])
    if not 0.0 <= cfg["dropout"] < 1.0:
        raise ValueError(f"net_config.dropout must be in [0, 1), got {cfg['dropout']}")
    cfg["batchnorm"] = bool(cfg["batchnorm"])
    side = cfg["input_size"]
    for k, s, p in zip(cfg["kernels"], cfg["strides"], cfg["pools"]):
        side = (side + 2 * (k // 2) - k) // s + 1
        side //= p
        if side < 1:
            raise ValueError(f"net_config: input_size {cfg['input_size']} is too small for these strides/pools")
    cfg["_flat_side"] = side
    return cfg


class ConvNet(nn.Module):
    """The paper's ConvNet; ``forward`` gives logits, ``features`` the penultimate activations."""

    def __init__(self, net_config: dict[str, Any] | None = None) -> None:
        super().__init__()
        cfg = complete_net_config(net_config)
        self.config = {k: v for k, v in cfg.items() if not k.startswith("_")}
        layers: list[nn.Module] = []
        cin = cfg["in_channels"]
        for w, k, s, p in zip(cfg["widths"], cfg["kernels"], cfg["strides"], cfg["pools"]):
            layers.append(nn.Conv2d(cin, w, k, stride=s, padding=k // 2, bias=not cfg["batchnorm"]))
            if cfg["batchnorm"]:
                layers.append(nn.BatchNorm2d(w))
            layers.append(nn.ReLU(inplace=True))
            if p > 1:
                layers.append(nn.MaxPool2d(p))
            cin = w
        self.conv = nn.Sequential(*layers)
        hidden: list[nn.Module] = [nn.Flatten()]
        fin = cin * cfg["_flat_side"] ** 2
        for width in cfg["fc"]:
            hidden += [nn.Dropout(cfg["dropout"]), nn.Linear(fin, width), nn.ReLU(inplace=True)]
            fin = width
        self.hidden = nn.Sequential(*hidden)
        self.head = nn.Sequential(nn.Dropout(cfg["dropout"]), nn.Linear(fin, cfg["num_classes"]))

    @property
    def first_conv(self) -> torch.Tensor:
        """Weights of the first conv layer, (widths[0], in_channels, k, k) (the paper's Fig. 2)."""
        return self.conv[0].weight

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (N, fc[-1]) (or the flattened conv output without fc layers)."""
        return self.hidden(self.conv(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build_net(net_config: dict[str, Any] | None = None) -> ConvNet:
    """A freshly initialised :class:`ConvNet` from ``net_config`` (defaults for missing keys)."""
    return ConvNet(net_config)


def inference_copy(net: ConvNet) -> nn.Module:
    """A copy of ``net`` for inference only (eval mode, no gradients): every BatchNorm folded into the
    convolution before it, in channels-last memory format. The outputs equal ``net``'s (to float rounding,
    ~1e-6); on the 2-core CPU this about doubles the slices per second (oneDNN's channels-last kernels,
    one pass less over each feature map). ``net`` itself is untouched (the trainer reads its layers)."""
    import copy

    from torch.nn.utils.fusion import fuse_conv_bn_eval

    fused = copy.deepcopy(net).eval()
    layers, modules, i = [], list(fused.conv), 0
    while i < len(modules):
        if (isinstance(modules[i], nn.Conv2d) and i + 1 < len(modules)
                and isinstance(modules[i + 1], nn.BatchNorm2d)):
            layers.append(fuse_conv_bn_eval(modules[i], modules[i + 1]))
            i += 2
        else:
            layers.append(modules[i])
            i += 1
    fused.conv = nn.Sequential(*layers)
    for param in fused.parameters():
        param.requires_grad_(False)
    return fused.to(memory_format=torch.channels_last)
