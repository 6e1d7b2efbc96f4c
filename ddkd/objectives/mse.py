"""``mse``: MKDT's objective (Joshi et al., ICLR 2025): regress the raw teacher feature,
``MSE_mean(head(f_s), f_t)``. Nothing to fit in this raw form.

Option ``standardize`` (ddkd's, not MKDT's; ``--set experts.target_norm=standardize``): regress
the teacher feature z-scored per dimension with the mean and standard deviation fitted once on
the training images' features, ``(f_t - mean) / std``. The loss is the same MSE; only the
target space changes. Why: MSE's gradient is proportional to the targets' scale, and an SSL
backbone's features can be tiny (the shipped Fashion-MNIST teacher's have RMS 0.064, per-
dimension std 0.05: nothing in Barlow Twins or SimCLR fixes the scale of the backbone's output,
only of the projector's). Under MKDT's lr 0.1 the students then learn the targets' mean and
nothing else (final loss = the targets' variance), so their features only drift from the
random initialisation. Standardised, the same students explain ~60% of the targets' variance in
5 epochs and probe above their initialisation. MKDT's published runs regress raw features
(their teacher's scale is not reported); ``ddkd teach`` warns when the experts fit almost none
of the targets, whichever the teacher.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ddkd.objectives.base import Objective

#: floor of a dimension's standard deviation, relative to the largest one (a constant teacher
#: dimension, e.g. a dead ReLU, would otherwise be divided by zero)
_STD_FLOOR = 1e-6


class MSEObjective(Objective):
    """Example:
        >>> obj = MSEObjective(teacher_dim=4)
        >>> z = torch.randn(8, 4)
        >>> float(obj.loss(z, obj.targets(z)))
        0.0
    """

    name = "mse"
    regression = True

    def __init__(self, teacher_dim: int, standardize: bool = False):
        super().__init__(teacher_dim)
        self.standardize = standardize
        self.mean: torch.Tensor | None = None
        self.std: torch.Tensor | None = None

    @property
    def state_names(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("mean", "std") if self.standardize else ()

    def fit(self, z_teacher: torch.Tensor, generator: torch.Generator) -> None:
        if not self.standardize:
            return
        z = z_teacher.double()
        self.mean = z.mean(0).float()
        std = z.std(0)
        self.std = std.clamp_min(_STD_FLOOR * float(std.max())).float()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        # A saved state says which variant it is: raw MKDT targets have none.
        self.standardize = "mean" in state or "std" in state
        super().load_state_dict(state)

    def targets(self, z_teacher: torch.Tensor) -> torch.Tensor:
        if not self.standardize:
            return z_teacher
        if self.mean is None or self.std is None:
            raise RuntimeError("objective 'mse' (standardize) is not fitted")
        return (z_teacher - self.mean.to(z_teacher)) / self.std.to(z_teacher)

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(output, target)
