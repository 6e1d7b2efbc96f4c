"""The block stages of ``--objective skd`` (Kulkarni et al., 2019; see ddkd/objectives/skd.py):
fitting the per-stage normalisers on the teacher's maps, and training each student block by
block, every other block frozen. Their result is the initialisation of the recorded global
stage (:func:`ddkd.teach.experts.train_experts` with ``init``).
"""

from __future__ import annotations

import math
import typing
from collections.abc import Callable

import torch
from torch import nn

from ddkd.config import ExpertConfig
from ddkd.errors import TrainingError
from ddkd.models.convnet import ConvNet, ConvNetConfig
from ddkd.objectives.skd import SKDObjective, plan_stages, teacher_stage_maps
from ddkd.runtime import Stream, autocast_dtype, global_cpu_rng_from, make_generator, maybe_autocast
from ddkd.teach.experts import init_student


def fit_skd_stages(objective: SKDObjective, teacher: nn.Module, student: ConvNetConfig,
                   teacher_x: torch.Tensor, batch_size: int = 1024) -> None:
    """Plan the stages (block -> teacher stage by size) and fit the per-channel normalisers of
    every planned teacher map on ``teacher_x`` (the normalised training images, on the
    teacher's device)."""
    teacher.eval()
    probe = teacher_stage_maps(teacher, teacher_x[:1], [0, 1, 2, 3])
    teacher_sizes = [int(m.shape[-1]) for m in probe]
    sizes = [student.block_size(s) for s in range(student.depth)]
    source = plan_stages(sizes, teacher_sizes)
    objective.fit_stages(source, sizes, [torch.zeros(probe[t].shape[1]) for t in source],
                         [torch.ones(probe[t].shape[1]) for t in source])
    sums = [torch.zeros(probe[t].shape[1], dtype=torch.float64) for t in source]
    squares = [torch.zeros_like(v) for v in sums]
    count = 0
    for start in range(0, teacher_x.shape[0], batch_size):
        maps = teacher_stage_maps(teacher, teacher_x[start : start + batch_size], source)
        for s, m in enumerate(maps):
            pooled = objective.pool(s, m).double().cpu()
            sums[s] += pooled.sum((0, 2, 3))
            squares[s] += pooled.square().sum((0, 2, 3))
        count += maps[0].shape[0]
    means, stds = [], []
    for s in range(len(source)):
        cells = count * sizes[s] ** 2
        mean = sums[s] / cells
        means.append(mean)
        stds.append((squares[s] / cells - mean.square()).clamp_min(0).sqrt())
    objective.fit_stages(source, sizes, means, stds)


@torch.no_grad()
def stage_targets(objective: SKDObjective, s: int, teacher: nn.Module,
                  teacher_x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Block ``s``'s targets for every training image ``(N, C_t, h, h)``, on the device."""
    source = int(typing.cast(torch.Tensor, objective.stage_source)[s])  # (planned: set)
    out = [objective.stage_targets(s, teacher_stage_maps(teacher, teacher_x[i : i + batch_size],
                                                         [source])[0])
           for i in range(0, teacher_x.shape[0], batch_size)]
    return torch.cat(out)


def train_stage(student: ConvNet, s: int, targets: torch.Tensor, x_train: torch.Tensor,
                experts: ExpertConfig, seed: int, k: int) -> list[float]:
    """Train block ``s`` of ``student`` (and a fresh 1x1 adapter to the targets' channels) to
    regress ``targets`` ``(N, C_t, h, h)``; every other parameter and buffer stays as it is.
    Same optimiser settings and precision as the experts; ``experts.stage_epochs`` epochs.
    -> epoch losses."""
    device = x_train.device
    amp_dtype = autocast_dtype(experts.precision, device, "experts.precision")
    block, prefix = student.block(s), student.body[: 4 * s]
    gen = make_generator(seed, Stream.SKD_ADAPTER, k, s)
    with global_cpu_rng_from(gen):
        adapter = nn.Conv2d(student.config.width, targets.shape[1], 1).to(device)
    params = [*block.parameters(), *adapter.parameters()]
    optimizer = torch.optim.SGD(params, lr=experts.lr, momentum=experts.momentum,
                                weight_decay=experts.weight_decay)
    prefix.eval()  # frozen: no BatchNorm statistics move either
    block.train()
    order_gen = make_generator(seed, Stream.SKD_STAGE_ORDER, k, s)
    n = x_train.shape[0]
    losses = []
    for epoch in range(experts.stage_epochs):
        order = torch.randperm(n, generator=order_gen).to(device)
        total = torch.zeros((), device=device)
        for start in range(0, n, experts.batch_size):
            idx = order[start : start + experts.batch_size]
            with maybe_autocast(device.type, amp_dtype):
                with torch.no_grad():
                    h = prefix(x_train[idx])
                out = adapter(block(h))
            loss = SKDObjective.stage_loss(out if amp_dtype is None else out.to(targets.dtype),
                                           targets[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach() * idx.numel()
        mean_loss = (total / n).item()
        if not math.isfinite(mean_loss):
            raise TrainingError(
                f"expert {k}: skd stage {s + 1} loss became {mean_loss} in epoch {epoch + 1}; "
                f"lower --set experts.lr (now {experts.lr})")
        losses.append(mean_loss)
    student.train()
    return losses


def stagewise_students(config: ConvNetConfig, experts: ExpertConfig, objective: SKDObjective,
                       teacher: nn.Module, teacher_x: torch.Tensor, x_train: torch.Tensor,
                       seed: int, ks: list[int],
                       on_stage: Callable[[int, int, list[float]], None] | None = None,
                       ) -> dict[int, ConvNet]:
    """Students ``ks`` from their usual initialisations through every block stage; the
    teacher's maps of a stage are computed once and shared by all of them.
    ``on_stage(k, s, losses)`` after each student's stage."""
    students = {k: init_student(config, seed, k).to(x_train.device) for k in ks}
    for s in range(objective.num_stages):
        targets = stage_targets(objective, s, teacher, teacher_x)
        for k in ks:
            losses = train_stage(students[k], s, targets, x_train, experts, seed, k)
            if on_stage is not None:
                on_stage(k, s, losses)
        del targets
    return students


__all__ = ["fit_skd_stages", "stage_targets", "stagewise_students", "train_stage"]
