"""Pre-training a fresh encoder on a synthetic (or real) set by regressing its targets.

MKDT (Joshi et al., ICLR 2025), section 5: MSE to the set's targets, SGD momentum 0.9, weight
decay 1e-4, batch 256, 20 epochs, learning rate = the set's learned step size (0.1 for
baselines). The encoder is the student ConvNet by default, or a CIFAR-stem ResNet (BatchNorm)
with a linear head for cross-architecture evaluation; the head is dropped for probing.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ddkd.config import EVAL_ARCHS
from ddkd.errors import ConfigError, TrainingError
from ddkd.models.convnet import ConvNet, ConvNetConfig
from ddkd.models.registry import model_config
from ddkd.models.resnet import ResNet, ResNetConfig
from ddkd.runtime import Stream, global_cpu_rng_from, make_generator

ARCHS = EVAL_ARCHS


class ResNetEncoder(nn.Module):
    """A CIFAR-stem ResNet with a linear head to the target dimension."""

    def __init__(self, config: ResNetConfig, out_dim: int):
        super().__init__()
        self.backbone = ResNet(config)
        self.head = nn.Linear(config.feature_dim, out_dim)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def build_encoder(arch: str, shape: tuple[int, int, int], out_dim: int, seed: int,
                  student: dict | None = None) -> nn.Module:
    """A freshly initialised encoder with ``features(x)`` and a head to ``out_dim``.

    ``student`` (a ConvNet configuration from an experts file or a set) sets the ConvNet's
    depth, width and norm, so that the default encoder is exactly the distilled student.
    """
    c, h, w = shape
    if arch not in ARCHS:
        raise ConfigError(f"--arch {arch!r} is unknown; valid: {', '.join(ARCHS)}")
    gen = make_generator(seed, Stream.PRETRAIN_INIT)
    with global_cpu_rng_from(gen):
        if arch == "convnet":
            if h != w:
                raise ConfigError(f"the ConvNet needs square images, got {h}x{w}")
            base = dict(student or {})
            base.update(in_channels=c, image_size=h, out_dim=out_dim)
            return ConvNet(ConvNetConfig(**{k: base[k] for k in base
                                            if k in ConvNetConfig.__dataclass_fields__}))
        rc = typing.cast(ResNetConfig, model_config(arch, in_channels=c, base_width=64))
        return ResNetEncoder(rc, out_dim)


def steps_per_epoch(n: int, batch_size: int, encoder: nn.Module) -> int:
    """SGD steps one epoch of :func:`pretrain` takes on ``n`` images: every mini-batch, but a
    last batch of one image under BatchNorm, which is skipped."""
    full, rest = divmod(n, batch_size)
    has_bn = any(isinstance(m, nn.BatchNorm2d) for m in encoder.modules())
    return full + (1 if rest > 1 or (rest == 1 and not has_bn) else 0)


def pretrain(
    encoder: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    lr: float,
    seed: int,
    epochs: int = 20,
    batch_size: int = 256,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    loss_fn=None,
    steps: int | None = None,
    on_step: Callable[[int], None] | None = None,
) -> list[float]:
    """Train ``encoder`` on ``x`` ``(n, C, H, W)`` (model-input space) to regress ``y``
    ``(n, D)``, in place, with ``loss_fn(output, target)`` (the set's KD objective; MSE by
    default); returns the mean loss of every epoch.

    ``steps``: train for exactly this many SGD steps instead of ``epochs`` epochs (the last
    epoch may be partial; the data order is the same stream, so the first ``k`` steps of any
    run are the same ``k`` steps: a longer run passes through every shorter budget).
    ``on_step(step)`` is called after every step (1-based), in train mode; the pre-training
    budget curve probes the encoder there.
    """
    loss_fn = loss_fn or F.mse_loss
    opt = torch.optim.SGD(encoder.parameters(), lr=lr, momentum=momentum,
                          weight_decay=weight_decay)
    gen = make_generator(seed, Stream.PRETRAIN_ORDER)
    encoder.train()
    n = x.shape[0]
    has_bn = any(isinstance(m, nn.BatchNorm2d) for m in encoder.modules())
    total_steps = epochs * steps_per_epoch(n, batch_size, encoder) if steps is None else steps
    if total_steps > 0 and steps_per_epoch(n, batch_size, encoder) == 0:
        raise ConfigError(f"cannot pre-train on {n} image(s) with BatchNorm: a batch of one "
                          "cannot be normalised")
    losses: list[float] = []
    step, epoch = 0, 0
    while step < total_steps:
        order = torch.randperm(n, generator=gen).to(x.device)
        total = torch.zeros((), device=x.device)
        seen = 0
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            if len(idx) == 1 and has_bn:
                continue  # BatchNorm cannot normalise a batch of one
            loss = loss_fn(encoder(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach() * len(idx)
            seen += len(idx)
            step += 1
            if on_step is not None:
                on_step(step)
            if step == total_steps:
                break
        mean = (total / seen).item()
        if not math.isfinite(mean):
            raise TrainingError(f"pre-training diverged (loss {mean}) in epoch {epoch + 1} at "
                                f"lr {lr:g}")
        losses.append(mean)
        epoch += 1
    encoder.eval()
    return losses
