"""Self-supervised training of a backbone with one of lightly's SSL objectives.

Shared by ``teach`` (the teacher: a CIFAR-stem ResNet) and ``evaluate`` (the "random subset
trained with SSL" baseline: the student ConvNet). MKDT (Joshi et al., ICLR 2025) trains its
ResNet-18 teacher with Barlow Twins (Zbontar et al.,
ICML 2021); SimCLR (Chen et al., ICML 2020), BYOL (Grill et al., NeurIPS 2020) and VICReg
(Bardes et al., ICLR 2022) are offered as alternatives. Losses and heads are lightly's; the
augmentations are :func:`ddkd.data.ssl_augmentation` (lightly's parameters, applied batched).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ddkd.config import SSL_METHODS
from ddkd.data.transforms import Normalization, ssl_augmentation
from ddkd.errors import TrainingError
from ddkd.runtime import Ranks, Stream, global_rng_from, make_generator, maybe_autocast

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class SSLSchedule:
    """Optimisation of the teacher (SGD with warm-up then cosine decay, per step)."""

    epochs: int
    batch_size: int
    lr: float  # for batch 256; scaled linearly with batch_size
    weight_decay: float
    momentum: float = 0.9
    warmup_epochs: int = 1


class SSLModel(nn.Module):
    """Backbone + lightly projection head (+ predictor and momentum copy for BYOL)."""

    def __init__(self, backbone: nn.Module, feature_dim: int, method: str, proj_dim: int,
                 gather_distributed: bool = False, amp_dtype: torch.dtype | None = None):
        super().__init__()
        self.amp_dtype = amp_dtype  # the networks' forward under torch.autocast; losses in fp32
        from lightly import loss as L
        from lightly.models.modules import heads as H

        if method not in SSL_METHODS:
            raise ValueError(f"unknown SSL method {method!r}; valid: {', '.join(SSL_METHODS)}")
        self.method = method
        self.backbone = backbone
        hidden = proj_dim
        if method == "barlowtwins":
            self.head = H.BarlowTwinsProjectionHead(feature_dim, hidden, proj_dim)
            self.criterion = L.BarlowTwinsLoss(gather_distributed=gather_distributed)
        elif method == "simclr":
            self.head = H.SimCLRProjectionHead(feature_dim, hidden, 128)
            self.criterion = L.NTXentLoss(temperature=0.2,
                                          gather_distributed=gather_distributed)
        elif method == "vicreg":
            self.head = H.VICRegProjectionHead(feature_dim, hidden, proj_dim)
            self.criterion = L.VICRegLoss(gather_distributed=gather_distributed)
        else:  # byol
            self.head = H.BYOLProjectionHead(feature_dim, hidden, 256)
            self.predictor = H.BYOLPredictionHead(256, hidden, 256)
            self.criterion = L.NegativeCosineSimilarity()
            self.backbone_momentum = copy.deepcopy(backbone).requires_grad_(False)
            self.head_momentum = copy.deepcopy(self.head).requires_grad_(False)

    def forward(self, view_a: torch.Tensor, view_b: torch.Tensor,
                progress: float) -> torch.Tensor:
        """The loss (``forward``, so that a DistributedDataParallel wrapper sees the step)."""
        return self.loss(view_a, view_b, progress)

    def loss(self, view_a: torch.Tensor, view_b: torch.Tensor, progress: float) -> torch.Tensor:
        """SSL loss of two augmented views ``(B, C, H, W)``; ``progress`` in [0, 1] (BYOL tau)."""
        dtype = view_a.dtype
        if self.method != "byol":
            with maybe_autocast(view_a.device.type, self.amp_dtype):
                z_a = self.head(self.backbone(view_a))
                z_b = self.head(self.backbone(view_b))
            return self.criterion(z_a.to(dtype), z_b.to(dtype))
        from lightly.models.utils import update_momentum

        tau = 1.0 - (1.0 - 0.99) * (math.cos(math.pi * progress) + 1) / 2
        update_momentum(self.backbone, self.backbone_momentum, tau)
        update_momentum(self.head, self.head_momentum, tau)
        with maybe_autocast(view_a.device.type, self.amp_dtype):
            p_a = self.predictor(self.head(self.backbone(view_a)))
            p_b = self.predictor(self.head(self.backbone(view_b)))
            with torch.no_grad():
                t_a = self.head_momentum(self.backbone_momentum(view_a))
                t_b = self.head_momentum(self.backbone_momentum(view_b))
        p_a, p_b, t_a, t_b = (t.to(dtype) for t in (p_a, p_b, t_a, t_b))
        return 0.5 * (self.criterion(p_a, t_b) + self.criterion(p_b, t_a))


def lr_at(step: int, total_steps: int, warmup_steps: int, base_lr: float) -> float:
    """Linear warm-up then cosine decay to zero (precomputed per step, as DINO does)."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return base_lr * 0.5 * (1 + math.cos(math.pi * progress))


# Steps between two reads of the SSL loss: each read waits for the GPU (a host sync), so reading
# every step would stall it at every step. A non-finite loss is caught at most this late.
_READ_EVERY = 16


class SSLTrainer:
    """Epoch-resumable SSL training of ``backbone`` on uint8 images.

    Every epoch draws its data order and augmentations from a generator derived from
    ``(seed, epoch)``, so a run resumed from the checkpoint of epoch ``e`` continues exactly as
    the uninterrupted run would have.
    """

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        method: str,
        schedule: SSLSchedule,
        normalize: Normalization,
        image_shape: tuple[int, int, int],
        device: torch.device,
        seed: int,
        proj_dim: int = 1024,
        dist: Ranks | None = None,
        amp_dtype: torch.dtype | None = None,
    ):
        self.dist = dist or Ranks()
        self.model = SSLModel(backbone, feature_dim, method, proj_dim,
                              gather_distributed=self.dist.world > 1,
                              amp_dtype=amp_dtype).to(device)
        # Several processes: DDP averages the gradients; lightly's losses gather the other
        # processes' embeddings (negatives, cross-correlation) so the batch is the global one.
        self.step_model: nn.Module = self.model
        if self.dist.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.step_model = DistributedDataParallel(self.model)
        self.schedule = schedule
        self.normalize = normalize
        self.augment = ssl_augmentation(image_shape[0], image_shape[1]).to(device)
        self.device = device
        self.seed = seed
        self.base_lr = schedule.lr * schedule.batch_size / 256
        self.optimizer = torch.optim.SGD(
            [p for p in self.model.parameters() if p.requires_grad],
            lr=self.base_lr,
            momentum=schedule.momentum,
            weight_decay=schedule.weight_decay,
        )
        self.epoch = 0  # completed epochs

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": self.epoch,
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch = int(state["epoch"])

    def train_epoch(
        self, images: torch.Tensor, on_step: Callable[[int, float], None] | None = None
    ) -> float:
        """One epoch over ``images`` ``(N, C, H, W)`` uint8; returns the mean loss."""
        sched = self.schedule
        n = images.shape[0]
        batch = min(sched.batch_size, n)
        steps_per_epoch = max(1, n // batch)  # drop the last partial batch (BN, BT statistics)
        total = steps_per_epoch * sched.epochs
        warmup = min(total, steps_per_epoch * sched.warmup_epochs)
        gen = make_generator(self.seed, Stream.SSL_EPOCH, self.epoch)
        order = torch.randperm(n, generator=gen)
        self.model.train()
        losses: list[float] = []
        pending: list[torch.Tensor] = []  # losses on the device, not yet read back

        def read_back(first: int, values: list[torch.Tensor]) -> None:
            """Steps ``first``.. of this epoch: their losses, read back in one go (a host sync
            every ``_READ_EVERY`` steps, not every step), checked and reported."""
            stacked = torch.stack(values)
            if self.dist.world > 1:  # the mean over processes
                stacked = self.dist.sum([stacked])[0]
            for j, summed in enumerate(stacked.tolist(), start=first):
                value = summed / self.dist.world
                if not math.isfinite(value):
                    raise TrainingError(
                        f"teacher SSL loss became {value} at epoch {self.epoch + 1}, step {j + 1}; "
                        "lower --set teacher.lr or change --seed"
                    )
                losses.append(value)
                if on_step is not None:
                    on_step(j, value)

        # kornia draws from the global RNG (on the device): seed it so the epoch is reproducible
        # on its own; each process draws its own augmentations (process 0 as one process would)
        with global_rng_from(gen, self.device, offset=self.dist.rank):
            for i in range(steps_per_epoch):
                step = self.epoch * steps_per_epoch + i
                for group in self.optimizer.param_groups:
                    group["lr"] = lr_at(step, total, warmup, self.base_lr)
                idx = order[i * batch : (i + 1) * batch]
                idx = idx[self.dist.rank :: self.dist.world]  # this process's share
                x = images[idx].to(self.device, non_blocking=True).float() / 255.0
                view_a = self.normalize(self.augment(x))
                view_b = self.normalize(self.augment(x))
                loss = self.step_model(view_a, view_b, step / total)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                pending.append(loss.detach())
                if len(pending) == _READ_EVERY or i == steps_per_epoch - 1:
                    read_back(i + 1 - len(pending), pending)
                    pending = []
        self.epoch += 1
        return sum(losses) / len(losses)


@torch.no_grad()
def recalibrate_batchnorm(
    net: nn.Module,
    images: torch.Tensor,
    normalize: Normalization,
    device: torch.device,
    batch_size: int = 256,
    max_images: int = 10_000,
) -> None:
    """Re-estimate BatchNorm running statistics on un-augmented images ("precise BN").

    Follows Wu & Johnson, "Rethinking 'Batch' in BatchNorm" (2021): the exponential moving
    averages kept during SSL training describe *augmented* batches and lag the weights; the
    teacher is then used in eval mode on clean images. Short trainings are the extreme case:
    after a few steps the running variance is still ~1 and eval-mode features explode through
    the residual stages. A cumulative average over a pass of clean images fixes both. Used for
    a teacher ddkd trains (the randomly initialised network of the kNN report is left as
    initialised: re-estimated statistics make its features score lower still).
    """
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    saved = [(m.momentum, m.training) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over the pass
    was_training = net.training
    net.train()
    for start in range(0, min(images.shape[0], max_images), batch_size):
        net(normalize(images[start : start + batch_size].to(device)))
    for m, (momentum, _) in zip(norms, saved, strict=True):
        m.momentum = momentum
    net.train(was_training)
