"""``labels`` and ``soft-labels``: the objectives of *supervised* synthetic sets.

ddkd distils sets whose targets are representations (MKDT). The sets that MTT (Cazenavette et
al., CVPR 2022; ``GeorgeCazenavette/mtt-distillation``, ``distill.py``) and DATM (Guo et al.,
ICLR 2024; ``NUS-HPC-AI-Lab/DATM``, ``distill/DATM.py``) write carry class labels instead. When
``ddkd import`` reads one, it keeps the labels as labels and names them by the set's
objective, so that nothing mistakes them for representations:

- ``labels``: hard class labels, stored as one-hot rows ``(n, K)``; the loss is cross-entropy,
  the way MTT trains a network on its set.
- ``soft-labels``: DATM's learned logits ``(n, K)`` stored as they are; the loss is
  cross-entropy against ``softmax(target)``, DATM's ``SoftCrossEntropy``.

``ddkd evaluate`` pre-trains an encoder on such a set with this loss (head of K classes) and
then probes its features, as it does for any set. Neither objective can train experts: they are
not in ``ddkd.objectives.OBJECTIVES`` (what ``ddkd teach --objective`` accepts), only in
``LABEL_OBJECTIVES``, which :func:`ddkd.objectives.restore_objective` also reads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ddkd.objectives.base import Objective


class LabelsObjective(Objective):
    """Cross-entropy to class-probability targets (one-hot for hard labels).

    Shapes: output ``(B, K)`` logits, target ``(B, K)`` probabilities (rows sum to 1).

    Example:
        >>> obj = LabelsObjective(teacher_dim=3)
        >>> y = torch.eye(3)[torch.tensor([0, 2])]
        >>> float(obj.loss(100 * y, y)) < 1e-6
        True
    """

    name = "labels"

    def targets(self, z_teacher: torch.Tensor) -> torch.Tensor:
        # The targets are the labels themselves: there is no teacher to transform.
        return z_teacher

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(output, target)


class SoftLabelsObjective(LabelsObjective):
    """Cross-entropy against ``softmax(target)``: the targets are logits (DATM's soft labels).

    Shapes: output ``(B, K)`` logits, target ``(B, K)`` logits.
    """

    name = "soft-labels"

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(output, F.softmax(target, dim=1))
