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

The loss of a student is computed from its parameters by :class:`StudentLoss`, which can run
under ``torch.compile`` (``experts.compile``): on 2 CPU cores a compiled step trains one student
1.2-1.3x as fast as eager PyTorch (GroupNorm, ReLU and pooling fuse; see docs/performance.md),
after 12-20 s of compilation per batch shape. Compiled and eager trajectories agree to float
tolerance, not bitwise; two compiled runs agree bitwise (static shapes: one graph per batch
size).
"""

from __future__ import annotations

import importlib.util
import math
import os
import shutil
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state, vmap

from ddkd.config import ExpertConfig
from ddkd.errors import ConfigError, TrainingError
from ddkd.models.convnet import ConvNet, ConvNetConfig
from ddkd.models.functional import flat_params
from ddkd.runtime import (
    Stream,
    autocast_dtype,
    global_cpu_rng_from,
    make_generator,
    maybe_autocast,
    separate_compile_cache,
)


def compile_available(device: torch.device) -> bool:
    """Whether ``torch.compile``'s default backend can build kernels here: a C++ compiler for
    the CPU, Triton for a GPU."""
    if device.type == "cuda":
        return importlib.util.find_spec("triton") is not None
    return any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "c++", "clang++") if c)


def resolve_compile(setting: str, device: torch.device) -> bool:
    """``experts.compile`` (auto | on | off) -> whether to compile on ``device``."""
    if setting == "off":
        return False
    available = compile_available(device)
    if setting == "on" and not available:
        need = "Triton" if device.type == "cuda" else "a C++ compiler (g++)"
        raise ConfigError(f"experts.compile = on needs {need} for torch.compile on {device.type}; "
                          "install it or set experts.compile=off")
    if available and device.type == "cpu":
        separate_compile_cache()
    return available


class StudentLoss:
    """A student's KD loss as a function of its parameters: ``(params, buffers, x, z) -> ()``
    for one student, ``group`` for stacked students (``vmap``).

    One instance serves every expert that a process trains, so that ``torch.compile`` builds
    its graphs once per run (per batch shape: ``dynamic=False``), not once per expert.
    """

    def __init__(self, config: ConvNetConfig,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.mse_loss,
                 compile: bool = False, amp_dtype: torch.dtype | None = None):
        template = ConvNet(config).to("meta")

        def one(p, b, x, z):  # (b, C, H, W), (b, D) -> ()
            with maybe_autocast(x.device.type, amp_dtype):  # experts.precision
                out = functional_call(template, (p, b), (x,))
            return loss_fn(out if amp_dtype is None else out.to(z.dtype), z)

        self._one = torch.compile(one, dynamic=False) if compile else one
        group = vmap(one)  # (G, b, C, H, W), (G, b, D) -> (G,)
        self._group = torch.compile(group, dynamic=False) if compile else group

    def __call__(self, params, buffers, x, z) -> torch.Tensor:
        return self._run(self._one, params, buffers, x, z)

    def group(self, params, buffers, x, z) -> torch.Tensor:
        return self._run(self._group, params, buffers, x, z)

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``: a compiled step's backward graph is compiled here, at its first
        call, so its failures get the same clear error as the forward's."""
        self._run(torch.Tensor.backward, loss)

    def _run(self, fn, *args) -> Any:
        try:
            return fn(*args)
        except torch._dynamo.exc.TorchDynamoException as err:  # a compiler problem, not ours
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise TrainingError(f"torch.compile of the experts' training step failed "
                                f"({type(err).__name__}: {first[:200]}); set "
                                "experts.compile=off") from err


def init_student(config: ConvNetConfig, seed: int, k: int) -> ConvNet:
    """Student ``k``'s initialisation, drawn from its own stream of ``seed`` (PyTorch's
    default initialisers, as the published code uses)."""
    gen = make_generator(seed, Stream.EXPERT_INIT, k)
    with global_cpu_rng_from(gen):
        return ConvNet(config)


def train_expert(
    config: ConvNetConfig,
    experts: ExpertConfig,
    x_train: torch.Tensor,
    z_train: torch.Tensor,
    seed: int,
    k: int,
    on_epoch: Callable[[int, float], None] | None = None,
    loss: StudentLoss | None = None,
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
        loss: the KD objective's loss of a student (default: MKDT's MSE, eager); pass one
            :class:`StudentLoss` for all the experts of a run.
        init: student ``k``'s starting network (default: :func:`init_student`; ``skd`` starts
            from its block stages' result).

    Returns:
        ``(epochs + 1, P)`` float32 snapshots on the CPU, and the per-epoch mean losses.
    """
    device = x_train.device
    student = (init(k) if init is not None else init_student(config, seed, k)).to(device)
    loss_of = loss or StudentLoss(config)
    params, buffers = dict(student.named_parameters()), dict(student.named_buffers())
    optimizer = _sgd(student.parameters(), experts)

    def step(idx: torch.Tensor) -> torch.Tensor:  # (1, b) -> (1,)
        value = loss_of(params, buffers, x_train[idx[0]], z_train[idx[0]])
        optimizer.zero_grad(set_to_none=True)
        loss_of.backward(value)
        optimizer.step()
        return value.detach().reshape(1)

    single = None if on_epoch is None else (lambda e, losses: on_epoch(e, losses[0]))
    (result,) = _record(experts, [k], x_train.shape[0], seed, device, step,
                        lambda: [flat_params(student).cpu()], single)
    return result


def _sgd(params, experts: ExpertConfig) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=experts.lr, momentum=experts.momentum,
                           weight_decay=experts.weight_decay)


def _record(experts: ExpertConfig, ks: list[int], n: int, seed: int, device: torch.device,
            step: Callable[[torch.Tensor], torch.Tensor],
            snapshot: Callable[[], list[torch.Tensor]],
            on_epoch: Callable[[int, list[float]], None] | None
            ) -> list[tuple[torch.Tensor, list[float]]]:
    """The epochs of students ``ks``, one or a group: each draws its data order from its own
    stream; ``step(idx)`` trains on the batch ``idx`` ``(G, b)`` and returns the students' losses
    ``(G,)``; ``snapshot()`` gives their flat parameters. -> per student, ``(epochs + 1, P)``
    snapshots and per-epoch mean losses (MKDT keeps the last partial batch)."""
    order_gens = [make_generator(seed, Stream.EXPERT_ORDER, k) for k in ks]
    snapshots = [[theta] for theta in snapshot()]
    losses: list[list[float]] = [[] for _ in ks]
    for epoch in range(experts.epochs):
        orders = torch.stack([torch.randperm(n, generator=g) for g in order_gens]).to(device)
        total = torch.zeros(len(ks), device=device)
        for start in range(0, n, experts.batch_size):  # every student has the same batch sizes
            idx = orders[:, start : start + experts.batch_size]  # (G, b)
            total += step(idx) * idx.shape[1]
        means = (total / n).tolist()  # one host sync per epoch, not per step
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


def experts_plan(experts: ExpertConfig, device: torch.device) -> tuple[int, torch.dtype | None]:
    """``(students per group, autocast dtype)`` of ``experts`` on ``device``.

    ``experts.per_batch`` 0 means the device's default: batched (8) on a GPU, where one small
    ConvNet leaves it mostly idle; one at a time on the CPU, where a single student already
    keeps the cores busy (measured by ``bench/``). ``experts.precision = bf16`` trains one at a
    time: ``vmap`` does not apply ``torch.autocast`` inside the batched forward (measured: the
    convolutions stay float32), so a group would silently train in float32.
    """
    amp_dtype = autocast_dtype(experts.precision, device, "experts.precision")
    if amp_dtype is None:
        return experts.per_batch or (8 if device.type == "cuda" else 1), None
    if experts.per_batch > 1:
        raise ConfigError(f"experts.precision = {experts.precision} trains one student at a "
                          f"time (vmap does not apply autocast), but --experts-per-batch is "
                          f"{experts.per_batch}; use --experts-per-batch 1 or "
                          "experts.precision=fp32")
    return 1, amp_dtype


def train_experts(
    config: ConvNetConfig,
    experts: ExpertConfig,
    x_train: torch.Tensor,
    z_train: torch.Tensor,
    seed: int,
    ks: list[int],
    on_epoch: Callable[[int, list[float]], None] | None = None,
    loss: StudentLoss | None = None,
    init: Callable[[int], ConvNet] | None = None,
) -> list[tuple[torch.Tensor, list[float]]]:
    """Train students ``ks`` together (see the module docstring); for each, what
    :func:`train_expert` returns for it: ``(epochs + 1, P)`` snapshots and per-epoch losses.

    ``on_epoch`` is called with ``(epoch, [mean loss of each student])``.
    """
    if len(ks) == 1:
        single = None if on_epoch is None else (lambda e, loss: on_epoch(e, [loss]))
        return [train_expert(config, experts, x_train, z_train, seed, ks[0], single, loss, init)]
    device = x_train.device
    init = init or (lambda k: init_student(config, seed, k))
    students = [init(k).to(device) for k in ks]
    params, buffers = stack_module_state(students)  # {name: (G, ...)} leaves
    names = [name for name, _ in students[0].named_parameters()]
    del students
    loss_of = loss or StudentLoss(config)
    optimizer = _sgd([params[name] for name in names], experts)

    def step(idx: torch.Tensor) -> torch.Tensor:  # (G, b) -> (G,)
        group_loss = loss_of.group(params, buffers, x_train[idx], z_train[idx])
        optimizer.zero_grad(set_to_none=True)
        loss_of.backward(group_loss.sum())
        optimizer.step()
        return group_loss.detach()

    def snapshot() -> list[torch.Tensor]:
        flat = torch.cat([params[name].detach().flatten(1) for name in names], dim=1).cpu()
        return list(flat)  # G x (P,)

    return _record(experts, ks, x_train.shape[0], seed, device, step, snapshot, on_epoch)
