"""Teacher targets: the frozen teacher's representation of every training image.

MKDT (Joshi et al., ICLR 2025): the teacher runs once, in eval mode, over the un-augmented,
normalised training set; the ``(N, D)`` matrix is what the students regress.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ddkd.data.transforms import Normalization
from ddkd.errors import TrainingError


@torch.no_grad()
def compute_targets(
    teacher: nn.Module,
    images: torch.Tensor,
    normalize: Normalization,
    device: torch.device,
    batch_size: int = 1024,
    on_batch=None,
) -> torch.Tensor:
    """``(N, C, H, W)`` uint8 -> ``(N, D)`` float32 targets on the CPU."""
    teacher.eval()
    out = []
    for start in range(0, images.shape[0], batch_size):
        batch = normalize(images[start : start + batch_size].to(device))
        out.append(teacher(batch).float().cpu())
        if on_batch is not None:
            on_batch(out[-1].shape[0])
    targets = torch.cat(out)
    if not torch.isfinite(targets).all():
        bad = int((~torch.isfinite(targets)).any(1).sum())
        raise TrainingError(f"the teacher produced NaN/inf features for {bad} images")
    if math.isclose(float(targets.std()), 0.0, abs_tol=1e-8):
        raise TrainingError("the teacher maps every image to the same feature (collapsed)")
    return targets
