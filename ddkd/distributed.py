"""Several processes (devices, nodes) on PyTorch's distributed stack through Lightning Fabric.

ddkd does not launch processes itself. :func:`join` asks Fabric (which lightly already brings)
for a data-parallel group: Fabric starts the other local processes for a plain command
(``ddkd synthesize --devices 2``), or joins the group that ``torchrun`` or SLURM's ``srun``
started (it reads their environment variables). The stages only see a
:class:`ddkd.runtime.Ranks`: rank, world size, a summing all-reduce and a barrier. On the CPU
the backend is gloo, on GPUs NCCL.
"""

from __future__ import annotations

import typing

import torch

from ddkd.errors import ConfigError
from ddkd.runtime import Ranks


def join(devices: int, num_nodes: int, device: torch.device,
         strategy: str = "ddp") -> tuple[Ranks, torch.device]:
    """Join (or launch) a group of ``devices`` processes on each of ``num_nodes`` nodes ->
    (this process's ranks, its device). One device on one node needs no group."""
    if devices < 1 or num_nodes < 1:
        raise ConfigError(f"--devices and --num-nodes must be >= 1, got {devices} and "
                          f"{num_nodes}")
    if devices == 1 and num_nodes == 1:
        return Ranks(), device
    from lightning_fabric import Fabric

    accelerator = "cuda" if device.type == "cuda" else "cpu"
    if accelerator == "cuda" and devices > torch.cuda.device_count():
        raise ConfigError(f"--devices {devices}: this node has {torch.cuda.device_count()} "
                          "CUDA devices")
    fabric = Fabric(accelerator=accelerator, devices=devices, num_nodes=num_nodes,
                    strategy=strategy)
    fabric.launch()

    def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
        return typing.cast(torch.Tensor, fabric.all_reduce(tensor, reduce_op="sum"))

    def all_gather(obj: object) -> list:  # Fabric gathers tensors only; rows are dicts
        gathered: list = [None] * fabric.world_size
        torch.distributed.all_gather_object(gathered, obj)
        return gathered

    return Ranks(fabric.global_rank, fabric.world_size, all_reduce_sum, fabric.barrier,
                 all_gather), fabric.device
