"""The ConvNet of the dataset-distillation literature (the MKDT/MTT student).

Follows Gidaris & Komodakis (2018) as used by Wang et al. (2018), Cazenavette et al. (MTT,
CVPR 2022) and Joshi et al. (MKDT, ICLR 2025): ``depth`` blocks of conv3x3 (padding 1) ->
instance norm (``GroupNorm(width, width, affine=True)``) -> ReLU -> AvgPool2d(2), then a flatten
and a linear head to the target dimension. At 32x32 and depth 3 the flattened feature is
``width * 4 * 4`` (2048 at width 128); at 28x28 it is ``width * 3 * 3`` (1152).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ConvNetConfig:
    """Everything needed to rebuild a ConvNet (stored in every experts file and set)."""

    in_channels: int = 3
    image_size: int = 32
    depth: int = 3
    width: int = 128
    norm: str = "instancenorm"  # instancenorm | batchnorm | none
    out_dim: int = 512  # target dimension of the head; 0 drops the head
    # "linear": a linear head on the flat features. "prenorm": no parameters; the last block's
    # convolution output (before its norm and ReLU: signed) average-pooled to out_dim / width
    # cells, KDEP's student side. "prerelu": the same after the norm; kept to read runs made
    # before "prenorm", it is degenerate under instance norm (each channel's spatial mean is
    # the norm's bias whatever the input, so one cell per channel is a constant output).
    output: str = "linear"

    def block_size(self, s: int) -> int:
        """Side of block ``s``'s (0-based) square output map."""
        return self.image_size // 2 ** (s + 1)

    @property
    def feature_dim(self) -> int:
        """Width of the flat features (as ResNetConfig.feature_dim)."""
        return self.width * self.block_size(self.depth - 1) ** 2


def _norm_layer(kind: str, channels: int) -> nn.Module:
    if kind == "instancenorm":
        # GroupNorm with one group per channel is instance norm with a learnable affine.
        return nn.GroupNorm(channels, channels, affine=True)
    if kind == "batchnorm":
        return nn.BatchNorm2d(channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}; expected instancenorm, batchnorm or none")


class ConvNet(nn.Module):
    """Depth-``d`` ConvNet; ``forward`` returns the head output, ``features`` the flat features.

    Shapes: input ``(B, C, H, W)``; ``features`` ``(B, feature_dim)``; output ``(B, out_dim)``.

    Example:
        >>> net = ConvNet(ConvNetConfig(in_channels=1, image_size=28, out_dim=64))
        >>> net(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 64])
    """

    def __init__(self, config: ConvNetConfig):
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        channels = config.in_channels
        for _ in range(config.depth):
            layers += [
                nn.Conv2d(channels, config.width, kernel_size=3, padding=1),
                _norm_layer(config.norm, config.width),
                nn.ReLU(inplace=False),
                nn.AvgPool2d(2),
            ]
            channels = config.width
        self.body = nn.Sequential(*layers)
        self.head = None
        if config.output in ("prenorm", "prerelu"):
            cells = math.isqrt(max(1, config.out_dim // config.width))
            if cells * cells * config.width != config.out_dim:
                raise ValueError(f"a prerelu output of {config.out_dim} is not width "
                                 f"{config.width} x a square number of cells")
            self.cells = cells
        elif config.output != "linear":
            raise ValueError(f"unknown ConvNet output {config.output!r}; expected linear, "
                             "prenorm or prerelu")
        elif config.out_dim:
            self.head = nn.Linear(config.feature_dim, config.out_dim)

    def block(self, s: int) -> nn.Sequential:
        """Block ``s`` (0-based): conv, norm, ReLU, pool; output ``config.block_size(s)`` square."""
        return self.body[4 * s : 4 * (s + 1)]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).flatten(1)  # (B, feature_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.output != "linear":
            # the last block's conv (prenorm) or conv + norm (prerelu): (B, width, h, w)
            signed = self.body[: -3 if self.config.output == "prenorm" else -2](x)
            return F.adaptive_avg_pool2d(signed, self.cells).flatten(1)
        feats = self.features(x)
        return self.head(feats) if self.head is not None else feats
