"""``mse``: MKDT's objective (Joshi et al., ICLR 2025): regress the raw teacher feature,
``MSE_mean(head(f_s), f_t)``. Nothing to fit."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ddkd.objectives.base import Objective


class MSEObjective(Objective):
    """Example:
        >>> obj = MSEObjective(teacher_dim=4)
        >>> z = torch.randn(8, 4)
        >>> float(obj.loss(z, obj.targets(z)))
        0.0
    """

    name = "mse"

    def targets(self, z_teacher: torch.Tensor) -> torch.Tensor:
        return z_teacher

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(output, target)
