"""``ssld``: label-free symmetric-KL distillation (Cui et al., "Beyond Self-Supervision: A
Simple Yet Effective Network Distillation Alternative", 2021; PaddleClas SSLD), for a teacher
that outputs features rather than logits.

Logits are cosine similarities to ``K`` fixed anchors (k-means centroids of the L2-normalised
teacher features, ``K = 100`` by default, about 10 x the classes of the small datasets) divided
by ``tau``; the loss is ``1/2 (KL(p_t || p_s) + KL(p_s || p_t))`` with ``p = softmax``.
``tau = 0.1``: with ``tau = 1`` the softmax of cosines in [-1, 1] is nearly uniform and the
targets carry little information. Targets are the teacher's logits (so that synthetic targets
can move freely; the softmax is taken inside the loss); the student's head has the teacher's
width and is mapped to logits through the same anchors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ddkd.objectives.base import Objective


def kmeans_cosine(z: torch.Tensor, k: int, generator: torch.Generator,
                  iterations: int = 30) -> torch.Tensor:
    """Spherical k-means: ``k`` unit centroids ``(k, D)`` of the rows of ``z`` (k-means++
    seeding from ``generator``, then Lloyd steps on cosine similarity)."""
    x = F.normalize(z.double(), dim=1)
    n = x.shape[0]
    if k > n:
        raise ValueError(f"ssld: {k} anchors need at least {k} fitting features, got {n}")
    first = int(torch.randint(n, (1,), generator=generator))
    centroids = [x[first]]
    distance = 1 - x @ x[first]
    for _ in range(1, k):
        weights = distance.clamp_min(0)
        nxt = int(torch.multinomial(weights / weights.sum() if weights.sum() > 0
                                    else torch.ones(n, dtype=x.dtype) / n, 1,
                                    generator=generator))
        centroids.append(x[nxt])
        distance = torch.minimum(distance, 1 - x @ x[nxt])
    c = torch.stack(centroids)
    for _ in range(iterations):
        assign = (x @ c.T).argmax(1)
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        empty = sums.norm(dim=1) == 0
        c = torch.where(empty[:, None], c, F.normalize(sums, dim=1))
    return c


class SSLDObjective(Objective):
    name = "ssld"
    state_names = ("anchors", "tau")

    def __init__(self, teacher_dim: int, num_anchors: int = 100, tau: float = 0.1):
        super().__init__(teacher_dim)
        self.num_anchors = num_anchors
        self.anchors = None
        self.tau = torch.tensor(float(tau))

    def fit(self, z_teacher: torch.Tensor, generator: torch.Generator) -> None:
        self.anchors = kmeans_cosine(z_teacher, self.num_anchors, generator).float()

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Cosine similarity to the anchors over tau: ``(B, D)`` -> ``(B, K)``."""
        return F.normalize(features, dim=1) @ self.anchors.T / self.tau

    def targets(self, z_teacher: torch.Tensor) -> torch.Tensor:
        return self.logits(z_teacher)

    @staticmethod
    def teacher_dim_from_state(state: dict, target_dim: int) -> int:
        return int(state["anchors"].shape[1])

    def per_example_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_p_s = F.log_softmax(self.logits(output), dim=1)
        log_p_t = F.log_softmax(target, dim=1)
        kl_ts = (log_p_t.exp() * (log_p_t - log_p_s)).sum(1)  # KL(p_t || p_s)
        kl_st = (log_p_s.exp() * (log_p_s - log_p_t)).sum(1)  # KL(p_s || p_t)
        return 0.5 * (kl_ts + kl_st)

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.per_example_loss(output, target).mean()
