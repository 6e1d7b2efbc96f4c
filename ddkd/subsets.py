"""Choosing real subsets: where a synthetic set starts from, and the subset baselines.

Shared by ``synthesize`` (initialisation) and ``evaluate`` (the high-loss and random baselines).

MKDT (Joshi et al., ICLR 2025, section 4.3) initialises with *high-loss* images: for every
expert take its epoch-1 checkpoint, compute each training image's KD loss, average over the
experts, and keep the n images with the largest loss. A random subset is the ablation.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ddkd.errors import ConfigError
from ddkd.models.functional import ParamSpec, functional_forward
from ddkd.runtime import Stream, make_generator

# The random stream of a run's training subset: teach draws it, and evaluate draws it again to
# rebuild the baselines of a set made from the shipped teacher. Changing it changes every run.


def select_subset(n: int, subset: int | None, seed: int) -> torch.Tensor:
    """Sorted indices of the training images a run uses (all, or a seeded random subset)."""
    if subset is None:
        return torch.arange(n)
    if subset > n:
        raise ConfigError(f"--subset {subset} is larger than the dataset ({n} training images)")
    gen = make_generator(seed, Stream.RUN_SUBSET)
    return torch.randperm(n, generator=gen)[:subset].sort().values


@torch.no_grad()
def per_example_kd_loss(
    model: nn.Module,
    spec: ParamSpec,
    theta: torch.Tensor,
    x: torch.Tensor,
    z: torch.Tensor,
    batch_size: int = 1024,
    per_example_loss=None,
) -> torch.Tensor:
    """The KD loss of each example under parameters ``theta`` -> ``(N,)``: MSE (mean over
    dimensions, MKDT's) unless ``per_example_loss(output, target) -> (B,)`` says otherwise."""
    out = []
    for start in range(0, x.shape[0], batch_size):
        pred = functional_forward(model, spec, theta, x[start : start + batch_size])
        target = z[start : start + batch_size]
        out.append(per_example_loss(pred, target) if per_example_loss is not None
                   else (pred - target).pow(2).mean(dim=1))
    return torch.cat(out)


def high_loss_indices(
    model: nn.Module,
    spec: ParamSpec,
    snapshots: Iterable[torch.Tensor],
    x: torch.Tensor,
    z: torch.Tensor,
    n: int,
    per_example_loss=None,
) -> torch.Tensor:
    """Indices of the ``n`` images with the highest KD loss averaged over ``snapshots``
    (the experts' epoch-1 parameters), highest first -> ``(n,)`` int64 on the CPU."""
    total = torch.zeros(x.shape[0], device=x.device, dtype=torch.float64)
    count = 0
    for theta in snapshots:
        total += per_example_kd_loss(model, spec, theta.to(x.device), x, z,
                                     per_example_loss=per_example_loss).double()
        count += 1
    if count == 0:
        raise ValueError("high-loss initialisation needs at least one expert")
    return (total / count).topk(n).indices.cpu()


def random_indices(num_train: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` distinct indices drawn uniformly -> ``(n,)`` int64."""
    return torch.randperm(num_train, generator=generator)[:n]
