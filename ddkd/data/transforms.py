"""Normalisation and the SSL augmentations of the teacher.

Images are kept as uint8 and turned into float on the device, batch by batch.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

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
        mean, std = (_channels(v, x.device, x.dtype) for v in (self.mean, self.std))
        return (x - mean) / std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = (_channels(v, x.device, x.dtype) for v in (self.mean, self.std))
        return x * std + mean


@functools.lru_cache(maxsize=64)
def _channels(values: tuple[float, ...], device: torch.device,
              dtype: torch.dtype) -> torch.Tensor:
    """``values`` as a ``(1, C, 1, 1)`` tensor, made once per (values, device, dtype): built
    from a list at every call, it would be a blocking copy to a GPU, a host sync at every
    training step that normalises."""
    return torch.tensor(values, dtype=dtype).view(1, -1, 1, 1).to(device)


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
    ops: list[Any] = [
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


@dataclass(frozen=True)
class ZCA:
    """ZCA whitening of normalised images (kornia's ``ZCAWhitening``), as MTT uses it
    (``eps = 0.1``). Stored with the run and with every synthetic set so it can be undone.

    Attributes:
        mean: ``(d,)`` with ``d = C * H * W``.
        matrix: ``(d, d)``: whitened = (x - mean) @ matrix.
        inverse: ``(d, d)``: x = whitened @ inverse + mean.
        eps: the regulariser added to the eigenvalues.
    """

    mean: torch.Tensor
    matrix: torch.Tensor
    inverse: torch.Tensor
    eps: float

    @classmethod
    def fit(cls, x: torch.Tensor, eps: float = 0.1) -> ZCA:
        """Fit on normalised images ``(N, C, H, W)`` (float)."""
        from kornia.enhance import ZCAWhitening

        zca = ZCAWhitening(eps=eps, compute_inv=True).fit(x.detach().double().cpu())
        return cls(zca.mean_vector.reshape(-1).float(), zca.transform_matrix.float(),
                   zca.transform_inv.float(), float(eps))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1) - self.mean.to(x)
        return (flat @ self.matrix.to(x)).view_as(x)

    def undo(self, x: torch.Tensor) -> torch.Tensor:
        return (x.flatten(1) @ self.inverse.to(x) + self.mean.to(x)).view_as(x)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean, "matrix": self.matrix, "inverse": self.inverse}
