"""``kdep``: KDEP's non-parametric feature alignment (He et al., "Knowledge Distillation as
Efficient Pre-training", CVPR 2022).

The teacher features are centred (mean ``mu``) and rotated onto their top-``d`` principal
directions ``V`` (SVD), then squashed by power temperature scaling,
``PTS(u) = sign(u) |u / T|^(1/n)`` with ``n = 3``, and regressed with ``w * MSE_mean``
(``w = 3``). The paper's ``T = 0.1`` belongs to its teachers' feature scale; here ``T`` is
recalibrated on the fitting data so that the targets have unit root-mean-square (O(1) spread;
docs/method.md section 5). The student side must be signed: its output is the last block's
convolution, before its norm and ReLU, average-pooled non-parametrically to ``d`` (the
student's ``prenorm`` output, never a ReLU output). KDEP's ResNet students take the map after
BatchNorm; after the ConvNet's instance norm that would be useless, since every channel's
spatial mean is then the norm's bias whatever the input (one cell per channel: a constant
student, which ddkd's first kdep experts were, fitting nothing).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ddkd.errors import ConfigError
from ddkd.objectives.base import Objective


def pts(u: torch.Tensor, temperature: float | torch.Tensor, power: float = 3.0) -> torch.Tensor:
    """Power temperature scaling: ``sign(u) |u / T|^(1/n)``; odd and monotone in ``u``."""
    return torch.sign(u) * (u.abs() / temperature).pow(1.0 / power)


class KDEPObjective(Objective):
    name = "kdep"
    regression = True
    state_names = ("mean", "directions", "temperature")

    def __init__(self, teacher_dim: int, dim: int | None = None, power: float = 3.0,
                 weight: float = 3.0, student_width: int | None = None):
        super().__init__(teacher_dim)
        self.dim = min(dim or teacher_dim, teacher_dim)
        self.student_width = student_width
        if student_width is not None and student_width > teacher_dim:
            raise ConfigError(
                f"kdep: the student's pre-ReLU output has at least student.width = "
                f"{student_width} dimensions, more than the teacher's {teacher_dim}; "
                f"lower --set student.width to at most {teacher_dim}")
        self.power, self.weight = power, weight
        self.mean = self.directions = self.temperature = None

    @property
    def student_dim(self) -> int:
        return self.dim if self.directions is None else self.directions.shape[1]

    def _aligned_dim(self, limit: int) -> int:
        """d: at most ``limit``; with a student width, width x c x c for the largest c (the
        pooled pre-ReLU cells; 512 = 128 x 2 x 2 at most, as in KDEP)."""
        if self.student_width is None:
            return limit
        if self.student_width > limit:
            raise ConfigError(f"kdep: {limit} principal directions (teacher dimension or fitting "
                              f"images) cannot fill a student width of {self.student_width}")
        cells = 1
        while self.student_width * (cells + 1) ** 2 <= min(limit, 512):
            cells += 1
        return self.student_width * cells * cells

    def fit(self, z_teacher: torch.Tensor, generator: torch.Generator) -> None:
        z = z_teacher.double()
        self.mean = z.mean(0)
        # right singular vectors of the centred features = principal directions (D, d)
        _, _, vh = torch.linalg.svd(z - self.mean, full_matrices=False)
        directions = vh[: self._aligned_dim(min(self.dim, vh.shape[0]))].T
        # fix each direction's sign (SVD's is arbitrary): largest loading positive
        signs = torch.sign(directions.gather(0, directions.abs().argmax(0, keepdim=True)))
        self.directions = directions * signs
        u = (z - self.mean) @ self.directions
        # T with mean(|u / T|^(2/n)) = 1, i.e. unit-RMS targets
        self.temperature = u.abs().pow(2.0 / self.power).mean().pow(self.power / 2.0)
        self.mean, self.directions = self.mean.float(), self.directions.float()
        self.temperature = self.temperature.float()

    def rotate(self, z_teacher: torch.Tensor) -> torch.Tensor:
        """Centred, rotated teacher features ``(N, d)`` (before PTS)."""
        return (z_teacher - self.mean) @ self.directions

    def targets(self, z_teacher: torch.Tensor) -> torch.Tensor:
        return pts(self.rotate(z_teacher), self.temperature, self.power)

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.weight * F.mse_loss(output, target)
