"""Nucleus classifiers (Phases II-IV): small CNNs on crops centred on one nucleus.

Every model maps float32 (B, C, S, S) from :func:`classifier_input` to logits (B, num_classes)
and carries ``input_kind``, telling the data loader which crops of the nuclei store to feed:

- ``"level0"``: ``crops/level0``, uint8 (N, 32, 32, 3) -> input (B, 3, 32, 32).
- ``"multiscale"``: ``crops/level1`` and ``crops/level2`` (16x16 crops of the same nucleus at
  1/2 and 1/4 resolution) concatenated along channels, uint8 (N, 16, 16, 6) -> input (B, 6, 16, 16).
  Two real scales (the nucleus at 1/2, its surroundings at 1/4) carry more context than
  downsampling level 0 would.

Architectures (all randomly initialised; no weights are downloaded):

- ``resnet18``: torchvision's ResNet-18 (:mod:`cellkd.models.resnet`) adapted to 32x32 (CIFAR-style): 3x3
  stride-1 stem, no max-pool, so the four stages see 32, 16, 8, 4 px; dropout before the final linear layer.
- ``resnet16``: the same with BasicBlock stages [2, 2, 2, 1]: 1 stem conv + 14 block convs + 1
  linear = 16 weighted layers (ResNet-18 has [2, 2, 2, 2]); the last, widest stage is halved,
  which drops ~4.7M of ResNet-18's 11.2M parameters.
- ``vgg4``: one VGG block (2x conv3x3(64)+BN+ReLU, 2x2 max-pool) and two linear layers
  (64*16*16 -> 128 -> num_classes): 4 weighted layers, ~2.1M parameters.
- ``resnet16ms`` and ``vgg4ms``: ResNet-16 and VGG-4 on the 16x16 multiscale input (6-channel stem; the
  VGG-4 flatten sees 64*8*8), the inputs on which the paper compares ResNet-16, VGG-4 and Xception before it
  moves to ResNet-18 on 32x32 crops.
- ``xception``: a small Xception for the 16x16 multiscale input: a 2-conv entry stem, two
  strided residual blocks of depthwise-separable convolutions (64 -> 128 -> 256 channels, 16 -> 4 px),
  two middle residual blocks, a separable exit conv (512), global average pooling; ~0.74M parameters.
- ``rccnet``: RCCNet (Basha et al. 2018): conv(32, same) - conv(32, valid) - maxpool - conv(64, same)
  - conv(64, valid) - maxpool - FC 512 - FC 512 - FC num_classes, BatchNorm + ReLU after every conv and
  hidden FC, dropout after the hidden FCs. With 4 classes this has exactly 1,512,868 parameters, the
  count the paper reports (the paddings and BatchNorm layers are the ones that reproduce it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import nn

from cellkd.models.segmentation import preprocess

InputKind = Literal["level0", "multiscale"]

INPUT_SHAPES: dict[str, tuple[int, int, int]] = {"level0": (3, 32, 32), "multiscale": (6, 16, 16)}
"""input_kind -> the (C, H, W) each model of that kind expects."""
INPUT_LEVELS: dict[str, tuple[int, ...]] = {"level0": (0,), "multiscale": (1, 2)}
"""input_kind -> the nuclei-store crop levels it reads, stacked along channels in this order."""

RCCNET_PARAMETERS = 1_512_868
"""Parameters of ``rccnet`` with 4 classes (Basha et al. 2018 report 1,512,868)."""


def _check(num_classes: int, dropout: float) -> None:
    if int(num_classes) != num_classes or num_classes < 2:
        raise ValueError(f"num_classes={num_classes!r} must be an integer >= 2")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout={dropout!r} must lie in [0, 1)")


def classifier_input(crops: torch.Tensor) -> torch.Tensor:
    """Network input from crops: uint8 (B, S, S, 3k) (k stacked RGB crops) -> float32 (B, 3k, S, S).

    Each RGB group is normalized by :func:`cellkd.models.segmentation.preprocess` (ImageNet mean/std),
    so level-0 crops (k=1) and multiscale crops (k=2) share one convention. Stays on the input's device.
    """
    if crops.ndim != 4 or crops.shape[-1] % 3:
        raise ValueError(f"crops must be uint8 (B, S, S, 3k), got shape {tuple(crops.shape)}")
    groups = [preprocess(crops[..., i : i + 3]) for i in range(0, crops.shape[-1], 3)]
    return groups[0] if len(groups) == 1 else torch.cat(groups, dim=1)


def _cifar_resnet(layers: list[int], num_classes: int, dropout: float, input_kind: InputKind = "level0") -> nn.Module:
    from cellkd.models.resnet import CifarResNet  # lazily: torchvision loads only where a ResNet is built

    _check(num_classes, dropout)
    return CifarResNet(layers, num_classes, dropout, input_kind=input_kind)


def create_resnet18(num_classes: int = 4, dropout: float = 0.3) -> nn.Module:
    """ResNet-18 for (B, 3, 32, 32) level-0 crops -> logits (B, num_classes); ~11.2M parameters."""
    return _cifar_resnet([2, 2, 2, 2], num_classes, dropout)


def create_resnet16(num_classes: int = 4, dropout: float = 0.3) -> nn.Module:
    """ResNet-16 (BasicBlock stages [2, 2, 2, 1]) for (B, 3, 32, 32) -> logits (B, num_classes); ~6.5M parameters."""
    return _cifar_resnet([2, 2, 2, 1], num_classes, dropout)


def create_resnet16_multiscale(num_classes: int = 4, dropout: float = 0.3) -> nn.Module:
    """ResNet-16 for (B, 6, 16, 16) multiscale crops -> logits (B, num_classes); stages see 16, 8, 4, 2 px."""
    return _cifar_resnet([2, 2, 2, 1], num_classes, dropout, input_kind="multiscale")


def _conv_bn_relu(c_in: int, c_out: int, padding: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=padding, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class VGG4(nn.Sequential):
    """VGG-4 for (B, 3, 32, 32) level-0 crops (or (B, 6, 16, 16) multiscale) -> logits (B, num_classes).

    2 convs + 2 linear layers; the first linear layer sees ``width`` x (S/2)^2 features.
    """

    input_kind: InputKind = "level0"

    def __init__(
        self,
        num_classes: int = 4,
        dropout: float = 0.3,
        width: int = 64,
        hidden: int = 128,
        input_kind: InputKind = "level0",
    ) -> None:
        _check(num_classes, dropout)
        in_channels, size, _ = INPUT_SHAPES[input_kind]
        super().__init__(
            *_conv_bn_relu(in_channels, width),
            *_conv_bn_relu(width, width),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(width * (size // 2) ** 2, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(hidden, num_classes),
        )
        self.input_kind = input_kind


def create_vgg4_multiscale(num_classes: int = 4, dropout: float = 0.3) -> nn.Module:
    """VGG-4 for (B, 6, 16, 16) multiscale crops -> logits (B, num_classes); ~0.57M parameters."""
    return VGG4(num_classes, dropout, input_kind="multiscale")


class SeparableConv2d(nn.Sequential):
    """Depthwise 3x3 conv (one filter per channel) followed by a pointwise 1x1 conv; no bias (BN follows)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_in, 3, padding=1, groups=c_in, bias=False),
            nn.Conv2d(c_in, c_out, 1, bias=False),
        )


class XceptionBlock(nn.Module):
    """Xception residual block: ``reps`` x (ReLU, SeparableConv, BN), optional 3x3 stride-2 max-pool.

    The shortcut is the identity, or a strided 1x1 conv + BN when the shape changes.
    (B, c_in, H, W) -> (B, c_out, H / stride, W / stride).
    """

    def __init__(self, c_in: int, c_out: int, reps: int, stride: int = 1) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(reps):
            layers += [nn.ReLU(), SeparableConv2d(c_in if i == 0 else c_out, c_out), nn.BatchNorm2d(c_out)]
        if stride != 1:
            layers.append(nn.MaxPool2d(3, stride=stride, padding=1))
        self.body = nn.Sequential(*layers)
        self.skip: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.skip = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.skip(x)


class SmallXception(nn.Module):
    """Small Xception for (B, 6, 16, 16) multiscale crops (levels 1 and 2 stacked) -> logits (B, num_classes)."""

    input_kind: InputKind = "multiscale"

    def __init__(self, num_classes: int = 4, dropout: float = 0.3, in_channels: int = 6) -> None:
        _check(num_classes, dropout)
        super().__init__()
        self.entry = nn.Sequential(*_conv_bn_relu(in_channels, 32), *_conv_bn_relu(32, 64))
        self.blocks = nn.Sequential(
            XceptionBlock(64, 128, reps=2, stride=2),  # 16 -> 8 px
            XceptionBlock(128, 256, reps=2, stride=2),  # 8 -> 4 px
            XceptionBlock(256, 256, reps=3),
            XceptionBlock(256, 256, reps=3),
        )
        self.exit = nn.Sequential(SeparableConv2d(256, 512), nn.BatchNorm2d(512), nn.ReLU(inplace=True))
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(p=dropout), nn.Linear(512, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.exit(self.blocks(self.entry(x))))


class RCCNet(nn.Sequential):
    """RCCNet (Basha et al. 2018) for (B, 3, 32, 32) level-0 crops -> logits (B, num_classes).

    Spatial sizes: 32 -conv same-> 32 -conv valid-> 30 -pool-> 15 -conv same-> 15 -conv valid-> 13
    -pool-> 6, so the first FC sees 64 * 6 * 6 = 2304 features.
    """

    input_kind: InputKind = "level0"

    def __init__(self, num_classes: int = 4, dropout: float = 0.3) -> None:
        _check(num_classes, dropout)

        def conv(c_in: int, c_out: int, padding: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, padding=padding), nn.BatchNorm2d(c_out), nn.ReLU(True)]

        def fc(n_in: int, n_out: int) -> list[nn.Module]:
            return [nn.Linear(n_in, n_out), nn.BatchNorm1d(n_out), nn.ReLU(True), nn.Dropout(p=dropout)]

        super().__init__(
            *conv(3, 32, 1),
            *conv(32, 32, 0),
            nn.MaxPool2d(2),
            *conv(32, 64, 1),
            *conv(64, 64, 0),
            nn.MaxPool2d(2),
            nn.Flatten(),
            *fc(64 * 6 * 6, 512),
            *fc(512, 512),
            nn.Linear(512, num_classes),
        )


CLASSIFIER_CONSTRUCTORS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": create_resnet18,
    "resnet16": create_resnet16,
    "vgg4": VGG4,
    "resnet16ms": create_resnet16_multiscale,
    "vgg4ms": create_vgg4_multiscale,
    "xception": SmallXception,
    "rccnet": RCCNet,
}
"""name -> constructor(num_classes=4, dropout=0.3); registered in ``cellkd.models``' registry."""

CLASSIFIER_ARCHS: tuple[str, ...] = tuple(CLASSIFIER_CONSTRUCTORS)
"""Valid classifier names for ``create_model``."""
