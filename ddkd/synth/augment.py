"""Differentiable siamese augmentation (DSA) for trajectory matching, via kornia.

Follows Zhao & Bilen, "Dataset Condensation with Differentiable Siamese Augmentation" (ICML
2021), as MTT (Cazenavette et al., CVPR 2022) uses it: the strategy
``color_crop_cutout_flip_scale_rotate`` in MTT's mode "S", where each call applies *one*
operation chosen at random, with DSA's magnitudes (brightness +-0.5, saturation x[0, 2],
contrast x[0.5, 1.5], translation up to 1/8 of the side, cutout of half the side, flip with
probability 1/2, scale in [1/1.2, 1.2] per axis, rotation up to 15 degrees).

One random draw is shared by every image of an inner step, and the draw is a pure function of
``(seed, iteration, step)``: replaying a step (as a constant-memory backward pass must)
reproduces it exactly. The geometric operations and cutout are kornia's, which draw their
parameters separately from applying them (``aug(x, params=...)``); colour is three lines of
tensor arithmetic on the normalised images, as DSA does it (kornia's colour ops clamp to
[0, 1], which would cut the gradient of normalised images).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ddkd.runtime import Stream, global_cpu_rng_from, make_generator

DSA_OPS = ("color", "crop", "cutout", "flip", "scale", "rotate")


def _kornia_ops() -> dict[str, nn.Module]:
    import kornia.augmentation as K

    return {
        "crop": K.RandomAffine(degrees=0.0, translate=(0.125, 0.125), p=1.0, same_on_batch=True),
        "cutout": K.RandomErasing(scale=(0.25, 0.25), ratio=(1.0, 1.0), value=0.0, p=1.0,
                                  same_on_batch=True),
        "flip": K.RandomHorizontalFlip(p=0.5, same_on_batch=True),
        "scale": K.RandomAffine(degrees=0.0, scale=(1 / 1.2, 1.2, 1 / 1.2, 1.2), p=1.0,
                                same_on_batch=True),
        "rotate": K.RandomAffine(degrees=15.0, p=1.0, same_on_batch=True),
    }


def color(x: torch.Tensor, brightness: float, saturation: float, contrast: float) -> torch.Tensor:
    """DSA's colour jitter of normalised images ``(B, C, H, W)``: add brightness, scale the
    deviation from the channel mean (saturation) and from the image mean (contrast)."""
    x = x + brightness
    x = x.mean(dim=1, keepdim=True) + (x - x.mean(dim=1, keepdim=True)) * saturation
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return mean + (x - mean) * contrast


class DSA:
    """Replayable DSA: ``dsa(x, iteration, step)`` is deterministic in its three arguments.

    Example:
        >>> dsa = DSA(seed=0)
        >>> x = torch.randn(4, 3, 32, 32)
        >>> torch.equal(dsa(x, 7, 2), dsa(x, 7, 2))
        True
    """

    def __init__(self, seed: int, ops: tuple[str, ...] = DSA_OPS):
        unknown = set(ops) - set(DSA_OPS)
        if unknown:
            raise ValueError(f"unknown DSA operations {sorted(unknown)}; valid: {DSA_OPS}")
        self.seed = seed
        self.ops = ops
        self._kornia: dict[str, Any] = _kornia_ops()

    def draw(self, iteration: int, step: int, shape: torch.Size,
             segment: int = 0) -> tuple[str, object]:
        """The operation and its parameters for ``(iteration, step)`` (and ``segment``, when
        an iteration matches several)."""
        streams = (iteration, step) if segment == 0 else (iteration, step, segment)
        gen = make_generator(self.seed, Stream.DSA, *streams)
        op = self.ops[int(torch.randint(len(self.ops), (1,), generator=gen))]
        if op == "color":
            r = torch.rand(3, generator=gen, dtype=torch.float64).tolist()
            return op, (r[0] - 0.5, 2.0 * r[1], r[2] + 0.5)
        # kornia draws from the global RNG: fork it and seed from our stream.
        with global_cpu_rng_from(gen):
            return op, self._kornia[op].forward_parameters(shape)

    def __call__(self, x: torch.Tensor, iteration: int, step: int,
                 segment: int = 0) -> torch.Tensor:
        op, params = self.draw(iteration, step, x.shape, segment)
        if op == "color":
            return color(x, *params)  # type: ignore[misc]
        return self._kornia[op](x, params=params)
