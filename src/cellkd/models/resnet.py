"""CIFAR-style torchvision ResNets for nucleus crops (``resnet18``, ``resnet16`` and ``resnet16ms`` classifiers).

Its own module so that torchvision, a 2-6 s import, loads only in jobs that build a ResNet:
:mod:`cellkd.models.classifiers` imports this module from the constructors that need it.
"""

from __future__ import annotations

from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

from cellkd.models.classifiers import INPUT_SHAPES, InputKind


class CifarResNet(ResNet):
    """torchvision ResNet for 32x32 (or 16x16 multiscale) crops: 3x3 stride-1 stem, no max-pool, dropout before fc.

    layers: BasicBlocks per stage ([2, 2, 2, 2] is ResNet-18). input_kind: ``level0`` maps (B, 3, 32, 32),
    ``multiscale`` (B, 6, 16, 16) to logits (B, num_classes) (see ``cellkd.models.classifiers.INPUT_SHAPES``).
    """

    input_kind: InputKind = "level0"

    def __init__(self, layers: list[int], num_classes: int, dropout: float, input_kind: InputKind = "level0") -> None:
        super().__init__(BasicBlock, layers, num_classes=num_classes)
        self.input_kind = input_kind
        # The ImageNet stem (7x7 stride 2 + max-pool) would shrink a 32 px crop to 8 px before stage 1.
        in_channels = INPUT_SHAPES[input_kind][0]
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.maxpool = nn.Identity()
        self.fc = nn.Sequential(nn.Dropout(p=dropout), self.fc)
