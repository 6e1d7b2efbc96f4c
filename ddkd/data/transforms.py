"""Normalisation and the SSL augmentations of the teacher.

Images are kept as uint8 and turned into float on the device, batch by batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Normalization:
    """Per-channel mean and std in [0, 1] pixel units (stored with every run and set)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def fit(cls, images: torch.Tensor) -> Normalization:
        """Statistics of ``(N, C, H, W)`` uint8 images."""
        x = images.to(torch.float64) / 255.0
        mean = x.mean(dim=(0, 2, 3))
        std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
        return cls(tuple(float(m) for m in mean), tuple(float(s) for s in std))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 or [0, 1] float ``(B, C, H, W)`` -> normalised float32."""
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        return (x - mean) / std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        return x * std + mean


def ssl_augmentation(channels: int, image_size: int) -> nn.Module:
    """Two-view SSL augmentation, batched on the device with kornia.

    The parameters follow lightly's ``BarlowTwinsTransform`` / ``SimCLRTransform`` for CIFAR
    (random resized crop, horizontal flip, colour jitter 0.8, grayscale 0.2), adapted to the
    image: grey images get brightness/contrast jitter only and no grayscale; images of at most
    32 pixels get no Gaussian blur (it destroys them) and a crop scale floor of 0.2 rather than
    0.08. We apply it with kornia on whole batches instead of lightly's per-image PIL pipeline
    because on two CPU cores the per-image pipeline costs as much as the network; the draw is
    still independent for every image. Input and output: ``(B, C, H, W)`` floats in [0, 1].
    """
    import kornia.augmentation as K

    small = image_size <= 32
    ops: list[nn.Module] = [
        K.RandomResizedCrop((image_size, image_size), scale=(0.2 if small else 0.08, 1.0)),
        K.RandomHorizontalFlip(),
    ]
    if channels == 3:
        ops += [
            K.ColorJitter(0.4, 0.4, 0.2, 0.1, p=0.8),
            K.RandomGrayscale(p=0.2),
        ]
    else:
        ops += [K.ColorJitter(0.4, 0.4, 0.0, 0.0, p=0.8)]
    if not small:
        ops += [K.RandomGaussianBlur((23, 23), (0.1, 2.0), p=0.5)]
    return K.AugmentationSequential(*ops)
