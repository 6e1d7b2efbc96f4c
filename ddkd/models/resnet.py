"""ResNets with the CIFAR stem, used as SSL teachers and cross-architecture encoders.

Follows He et al. (CVPR 2016) with the small-image stem of the SSL literature (SimCLR, Barlow
Twins and MKDT on CIFAR): conv1 is 3x3 stride 1 and there is no max-pool, because lightly's /
torchvision's ImageNet stem (7x7 stride 2 + max-pool) throws away most of a 32x32 image and
costs about 8 points of accuracy. ``fc`` is absent: the global-average-pooled feature of
``8 * base_width`` channels is the representation (512 at the paper's base width 64), with no
projector and no L2 normalisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ResNetConfig:
    """Everything needed to rebuild a CIFAR-stem ResNet (stored with every checkpoint)."""

    in_channels: int = 3
    depth: int = 18  # 10 or 18 (BasicBlock); 10 = one block per stage
    base_width: int = 64  # 64 is the paper's; 16 (quarter width) makes CPU runs feasible

    @property
    def feature_dim(self) -> int:
        return 8 * self.base_width


_BLOCKS = {10: (1, 1, 1, 1), 18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-stem ResNet encoder: ``(B, C, H, W)`` -> ``(B, 8 * base_width)``.

    Example:
        >>> net = ResNet(ResNetConfig(in_channels=1, base_width=16))
        >>> net(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 128])
    """

    def __init__(self, config: ResNetConfig):
        super().__init__()
        if config.depth not in _BLOCKS:
            raise ValueError(
                f"ResNet depth {config.depth} unsupported; use one of {sorted(_BLOCKS)}"
            )
        self.config = config
        w = config.base_width
        self.conv1 = nn.Conv2d(config.in_channels, w, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        stages = []
        c_in = w
        for i, n_blocks in enumerate(_BLOCKS[config.depth]):
            c_out = w * 2**i
            blocks = []
            for j in range(n_blocks):
                blocks.append(BasicBlock(c_in, c_out, stride=2 if (i > 0 and j == 0) else 1))
                c_in = c_out
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.pool(out).flatten(1)  # (B, 8 * base_width)
