"""``tcs``: the Tailored Coordinate System (Zhou, Zhu & Wu, "Tailored Coordinate System for
Knowledge Distillation", 2024), label-free variant.

One pass over the teacher's features fits a PCA coordinate system ``(mu, P)``; the student's
head outputs ``k`` coordinates ``c`` and reconstructs ``f_hat = mu + P c``. The loss is
``beta * (BCE(W f_hat + b, 1[W f_t + b > 0]) + MSE_mean(f_hat, f_t))``: a locality-sensitive
hash of directions (fixed Gaussian ``W`` with ``32 D`` rows of scale ``1 / sqrt(D)``, bias
``b = -median(W f_t)`` so that every bit is balanced on the fitting data) plus MSE, ``beta = 6``.
The paper prunes coordinates with a label-based mask; without labels the top-``k`` principal
directions by eigenvalue are kept (``k`` explains ``explained`` of the variance by default).
Targets are the teacher features themselves.

At a perfect student (``f_hat = f_t``) the MSE term is zero and the hash term is at the value
the teacher's own features give; the hash term has no zero (its logits are finite).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ddkd.objectives.base import Objective


class TCSObjective(Objective):
    name = "tcs"
    state_names = ("mean", "basis", "hash_weight", "hash_bias")

    def __init__(self, teacher_dim: int, k: int | None = None, explained: float = 0.95,
                 bits_per_dim: int = 32, beta: float = 6.0):
        super().__init__(teacher_dim)
        self.k, self.explained = k, explained
        self.bits_per_dim, self.beta = bits_per_dim, beta
        self.mean = self.basis = self.hash_weight = self.hash_bias = None

    @property
    def student_dim(self) -> int:
        if self.basis is None:
            raise RuntimeError("tcs: fit the coordinate system before building the student")
        return self.basis.shape[1]

    def fit(self, z_teacher: torch.Tensor, generator: torch.Generator) -> None:
        z = z_teacher.double()
        self.mean = z.mean(0)
        cov = (z - self.mean).T @ (z - self.mean) / max(1, z.shape[0] - 1)
        eigenvalues, eigenvectors = torch.linalg.eigh(cov)  # ascending
        order = eigenvalues.argsort(descending=True)
        eigenvalues, eigenvectors = eigenvalues[order], eigenvectors[:, order]
        k = self.k
        if k is None:
            share = eigenvalues.clamp_min(0).cumsum(0) / eigenvalues.clamp_min(0).sum()
            k = int((share < self.explained).sum()) + 1
        self.basis = eigenvectors[:, : min(k, self.teacher_dim)]  # (D, k)
        d = self.teacher_dim
        self.hash_weight = torch.randn(self.bits_per_dim * d, d, generator=generator,
                                       dtype=torch.float64) / math.sqrt(d)
        self.hash_bias = -(z @ self.hash_weight.T).median(0).values
        for n in self.state_names:
            setattr(self, n, getattr(self, n).float())

    def reconstruct(self, coordinates: torch.Tensor) -> torch.Tensor:
        """Student coordinates ``(B, k)`` -> features ``(B, D)``."""
        return self.mean + coordinates @ self.basis.T

    def hash_logits(self, features: torch.Tensor) -> torch.Tensor:
        """``W f + b`` ``(B, bits)``: its sign is the hash code."""
        return features @ self.hash_weight.T + self.hash_bias

    def targets(self, z_teacher: torch.Tensor) -> torch.Tensor:
        return z_teacher

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        f_hat = self.reconstruct(output)
        bits = (self.hash_logits(target) > 0).to(f_hat.dtype)
        direction = F.binary_cross_entropy_with_logits(self.hash_logits(f_hat), bits)
        return self.beta * (direction + F.mse_loss(f_hat, target))
