"""KD students and their recorded trajectories (the "experts" of MKDT).

Follows Joshi et al. (MKDT, ICLR 2025), section 4.1: K students from different random
initialisations, each trained to regress the teacher's representations with
``MSE(student(x), target(x))`` (mean over batch and dimensions), SGD lr 0.1, momentum 0.9,
weight decay 1e-4, batch 256, 20 epochs, no augmentation, constant learning rate. The flat
parameter vector is saved at initialisation and after every epoch.

:func:`train_experts` trains a group of students at once in one process: their parameters are
stacked (``torch.func.stack_module_state``) and one ``vmap``-ed forward serves all of them, each
on its own batch (every student keeps its own initialisation and data order). The summed loss
has each student's gradient on its own slice, and SGD is elementwise, so a group gives the
trajectories of training its members one by one, to float tolerance.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state, vmap

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
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.mse_loss,
    init: Callable[[int], ConvNet] | None = None,
) -> tuple[torch.Tensor, list[float]]:
    """Train student ``k`` by representation matching and record its trajectory.

    Args:
        config: the student ConvNet; ``out_dim`` must equal the target dimension.
        experts: optimisation settings.
        x_train: ``(N, C, H, W)`` normalised float images, already on the device.
        z_train: ``(N, D)`` targets on the same device.
        seed: the run's seed; expert ``k`` uses its own derived streams.
        on_epoch: called with ``(epoch, mean_loss)`` after every epoch.
        loss_fn: the KD objective's loss ``(output, target) -> scalar`` (MKDT's MSE by default).
        init: student ``k``'s starting network (default: :func:`init_student`; ``skd`` starts
            from its block stages' result).

    Returns:
        ``(epochs + 1, P)`` float32 snapshots on the CPU, and the per-epoch mean losses.
    """
    device = x_train.device
    student = (init(k) if init is not None else init_student(config, seed, k)).to(device)
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
            loss = loss_fn(student(x_train[idx]), z_train[idx])
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


def default_experts_per_batch(device: torch.device) -> int:
    """Students per group when ``experts.per_batch`` is 0: batched on a GPU, where one small
    ConvNet leaves it mostly idle; one at a time on the CPU, where a single student already
    keeps the cores busy (measured by ``bench/``)."""
    return 8 if device.type == "cuda" else 1


def train_experts(
    config: ConvNetConfig,
    experts: ExpertConfig,
    x_train: torch.Tensor,
    z_train: torch.Tensor,
    seed: int,
    ks: list[int],
    on_epoch: Callable[[int, list[float]], None] | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.mse_loss,
    init: Callable[[int], ConvNet] | None = None,
) -> list[tuple[torch.Tensor, list[float]]]:
    """Train students ``ks`` together (see the module docstring); for each, what
    :func:`train_expert` returns for it: ``(epochs + 1, P)`` snapshots and per-epoch losses.

    ``on_epoch`` is called with ``(epoch, [mean loss of each student])``.
    """
    if len(ks) == 1:
        single = None if on_epoch is None else (lambda e, loss: on_epoch(e, [loss]))
        return [train_expert(config, experts, x_train, z_train, seed, ks[0], single, loss_fn,
                             init)]
    device = x_train.device
    init = init or (lambda k: init_student(config, seed, k))
    students = [init(k).to(device) for k in ks]
    params, buffers = stack_module_state(students)  # {name: (G, ...)} leaves
    names = [name for name, _ in students[0].named_parameters()]
    template = copy.deepcopy(students[0]).to("meta")
    del students

    def loss_of_one(p, b, x, z):  # one student: (b, C, H, W), (b, D) -> ()
        return loss_fn(functional_call(template, (p, b), (x,)), z)

    loss_of_group = vmap(loss_of_one)  # (G, b, C, H, W), (G, b, D) -> (G,)
    optimizer = torch.optim.SGD(
        [params[name] for name in names],
        lr=experts.lr,
        momentum=experts.momentum,
        weight_decay=experts.weight_decay,
    )
    order_gens = [make_generator(seed, _STREAM_ORDER, k) for k in ks]
    n = x_train.shape[0]

    def snapshot() -> list[torch.Tensor]:
        flat = torch.cat([params[name].detach().flatten(1) for name in names], dim=1).cpu()
        return list(flat)  # G x (P,)

    snapshots = [[theta] for theta in snapshot()]
    losses: list[list[float]] = [[] for _ in ks]
    for epoch in range(experts.epochs):
        orders = torch.stack([torch.randperm(n, generator=g) for g in order_gens]).to(device)
        total = torch.zeros(len(ks), device=device)
        for start in range(0, n, experts.batch_size):  # every student has the same batch sizes
            idx = orders[:, start : start + experts.batch_size]  # (G, b)
            group_loss = loss_of_group(params, buffers, x_train[idx], z_train[idx])  # (G,)
            optimizer.zero_grad(set_to_none=True)
            group_loss.sum().backward()
            optimizer.step()
            total += group_loss.detach() * idx.shape[1]
        means = (total / n).tolist()
        for g, (k, mean_loss) in enumerate(zip(ks, means, strict=True)):
            if not math.isfinite(mean_loss):
                raise TrainingError(
                    f"expert {k}: KD loss became {mean_loss} in epoch {epoch + 1}; lower "
                    f"--set experts.lr (now {experts.lr}) or check the targets for NaN"
                )
            losses[g].append(mean_loss)
        for g, theta in enumerate(snapshot()):
            snapshots[g].append(theta)
        if on_epoch is not None:
            on_epoch(epoch, means)
    return [(torch.stack(snapshots[g]), losses[g]) for g in range(len(ks))]
