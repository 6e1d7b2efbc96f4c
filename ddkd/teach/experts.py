"""KD students and their recorded trajectories (the "experts" of MKDT).

Follows Joshi et al. (MKDT, ICLR 2025), section 4.1: K students from different random
initialisations, each trained to regress the teacher's representations with
``MSE(student(x), target(x))`` (mean over batch and dimensions), SGD lr 0.1, momentum 0.9,
weight decay 1e-4, batch 256, 20 epochs, no augmentation, constant learning rate. The flat
parameter vector is saved at initialisation and after every epoch.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ddkd.config import ExpertConfig
from ddkd.errors import TrainingError
from ddkd.models.convnet import ConvNet, ConvNetConfig
from ddkd.models.functional import flat_params
from ddkd.runtime import make_generator

# Sub-stream ids of :func:`ddkd.runtime.make_generator` for the experts.
_STREAM_INIT, _STREAM_ORDER = 20, 21


def init_student(config: ConvNetConfig, seed: int, k: int) -> ConvNet:
    """Student ``k``'s initialisation, drawn from its own stream of ``seed`` (PyTorch's
    default initialisers, as the published code uses)."""
    gen = make_generator(seed, _STREAM_INIT, k)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(2**62, (1,), generator=gen)))
        return ConvNet(config)


def train_expert(
    config: ConvNetConfig,
    experts: ExpertConfig,
    x_train: torch.Tensor,
    z_train: torch.Tensor,
    seed: int,
    k: int,
    on_epoch: Callable[[int, float], None] | None = None,
) -> tuple[torch.Tensor, list[float]]:
    """Train student ``k`` by representation matching and record its trajectory.

    Args:
        config: the student ConvNet; ``out_dim`` must equal the target dimension.
        experts: optimisation settings.
        x_train: ``(N, C, H, W)`` normalised float images, already on the device.
        z_train: ``(N, D)`` targets on the same device.
        seed: the run's seed; expert ``k`` uses its own derived streams.
        on_epoch: called with ``(epoch, mean_loss)`` after every epoch.

    Returns:
        ``(epochs + 1, P)`` float32 snapshots on the CPU, and the per-epoch mean losses.
    """
    device = x_train.device
    student = init_student(config, seed, k).to(device)
    optimizer = torch.optim.SGD(
        student.parameters(),
        lr=experts.lr,
        momentum=experts.momentum,
        weight_decay=experts.weight_decay,
    )
    order_gen = make_generator(seed, _STREAM_ORDER, k)
    n = x_train.shape[0]
    snapshots = [flat_params(student).cpu()]
    losses: list[float] = []
    for epoch in range(experts.epochs):
        order = torch.randperm(n, generator=order_gen).to(device)
        total = torch.zeros((), device=device)
        for start in range(0, n, experts.batch_size):  # keeps the last partial batch, as MKDT
            idx = order[start : start + experts.batch_size]
            loss = F.mse_loss(student(x_train[idx]), z_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach() * idx.numel()
        mean_loss = (total / n).item()  # one host sync per epoch, not per step
        if not math.isfinite(mean_loss):
            raise TrainingError(
                f"expert {k}: KD loss became {mean_loss} in epoch {epoch + 1}; lower "
                f"--set experts.lr (now {experts.lr}) or check the targets for NaN"
            )
        losses.append(mean_loss)
        snapshots.append(flat_params(student).cpu())
        if on_epoch is not None:
            on_epoch(epoch, mean_loss)
    return torch.stack(snapshots), losses
