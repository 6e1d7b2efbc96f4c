"""Predefined views: a small fixed set of deterministic image transforms (flips, 90-degree
rotations), each an exact permutation of the pixels.

After Yu, Yao & Chiu, "Boost Self-Supervised Dataset Distillation via Parameterization,
Predefined Augmentation, and Approximation" (ICLR 2025, arXiv 2507.21455): instead of random
augmentations, every synthetic image is used under each of a fixed set of views, and each
(image, view) pair carries its own target, which can then be learned and stored with the set.

The views are ``torch.flip`` and ``torch.rot90`` on the last two axes: pure index permutations,
so they are exact (no interpolation), work on any dtype (uint8 pixels as well as normalised
images), and their gradient is the inverse permutation (autograd handles it). Rotations are
counter-clockwise as an image is displayed (row 0 at the top), so ``rot90`` of an image whose
top row is bright has a bright left column.

Example:
    >>> views = parse_views("rot4")                       # ('identity', 'rot90', ...)
    >>> pairs = expand_views(torch.zeros(5, 1, 8, 8), views)  # (5 * 4, 1, 8, 8)
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ddkd.errors import ConfigError

# name -> the view of a batch (..., H, W); rotations need H == W (they swap the two axes)
VIEWS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "identity": lambda x: x,
    "hflip": lambda x: torch.flip(x, dims=(-1,)),
    "vflip": lambda x: torch.flip(x, dims=(-2,)),
    "rot90": lambda x: torch.rot90(x, 1, dims=(-2, -1)),
    "rot180": lambda x: torch.rot90(x, 2, dims=(-2, -1)),
    "rot270": lambda x: torch.rot90(x, 3, dims=(-2, -1)),
}
_SWAPS_AXES = ("rot90", "rot270")
# Named sets: Boost-SSD's four rotations, and the horizontal flip of MTT's DSA made fixed.
GROUPS: dict[str, tuple[str, ...]] = {
    "rot4": ("identity", "rot90", "rot180", "rot270"),
    "flip2": ("identity", "hflip"),
}
NO_VIEWS = "none"


def parse_views(spec: str, flag: str = "--views") -> tuple[str, ...]:
    """``"none"`` -> ``()``; a group name (``rot4``, ``flip2``) or a comma list of view names
    (``identity,hflip,rot90``) -> the view names, in order. Unknown names, repeats and an
    empty list raise a :class:`ConfigError` naming ``flag``."""
    text = str(spec).strip()
    if text.lower() in (NO_VIEWS, ""):
        return ()
    if text in GROUPS:
        return GROUPS[text]
    names = tuple(v.strip() for v in text.split(","))
    unknown = [v for v in names if v not in VIEWS]
    groups = "; ".join(f"{k} = {','.join(v)}" for k, v in GROUPS.items())
    valid = (f"a comma list of {', '.join(VIEWS)}, or one of {', '.join(GROUPS)} "
             f"({groups}), or none")
    if unknown:
        raise ConfigError(f"{flag} {spec!r}: unknown view {unknown[0]!r}; expected {valid}",
                          key="views")
    repeated = sorted({v for v in names if names.count(v) > 1})
    if repeated:
        raise ConfigError(f"{flag} {spec!r} names {repeated[0]!r} twice; expected each view "
                          "once", key="views")
    return names


def check_views_fit(views: tuple[str, ...], shape: tuple[int, ...], flag: str = "--views",
                    where: str = "the images") -> None:
    """Refuse views that the image shape ``(C, H, W)`` does not allow: a 90-degree rotation
    of a non-square image would change its shape."""
    h, w = shape[-2], shape[-1]
    swapping = [v for v in views if v in _SWAPS_AXES]
    if swapping and h != w:
        raise ConfigError(f"{flag} {','.join(views)}: {swapping[0]} needs square images, but "
                          f"{where} are {h}x{w}; expected views without 90-degree rotations "
                          "(identity, hflip, vflip, rot180)", key="views")


def apply_view(x: torch.Tensor, view: str) -> torch.Tensor:
    """One view of a batch ``(..., H, W)``."""
    return VIEWS[view](x)


def expand_views(x: torch.Tensor, views: tuple[str, ...]) -> torch.Tensor:
    """Every (image, view) pair: ``(n, C, H, W)`` -> ``(n * V, C, H, W)``, image-major (pair
    ``i * V + v`` is view ``v`` of image ``i``, matching a ``(n, V, D)`` targets tensor
    flattened to ``(n * V, D)``). Differentiable: the gradient of a pair flows to its image."""
    stacked = torch.stack([apply_view(x, v) for v in views], dim=1)  # (n, V, C, H, W)
    return stacked.flatten(0, 1)
