"""CIFAR-style torchvision ResNets for 32x32 nucleus crops (the ``resnet18`` / ``resnet16`` classifiers).

Its own module so that torchvision, a 2-6 s import, loads only in jobs that build a ResNet:
:mod:`cellkd.models.classifiers` imports this module from the constructors that need it.
"""

from __future__ import annotations

from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet


class CifarResNet(ResNet):
    """torchvision ResNet for 32x32 inputs: 3x3 stride-1 stem, no max-pool, dropout before ``fc``.

    layers: BasicBlocks per stage ([2, 2, 2, 2] is ResNet-18). Maps (B, 3, 32, 32) -> logits (B, num_classes).
    """

    input_kind = "level0"

    def __init__(self, layers: list[int], num_classes: int, dropout: float) -> None:
        super().__init__(BasicBlock, layers, num_classes=num_classes)
        # The ImageNet stem (7x7 stride 2 + max-pool) would shrink a 32 px crop to 8 px before stage 1.
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.maxpool = nn.Identity()
        self.fc = nn.Sequential(nn.Dropout(p=dropout), self.fc)
