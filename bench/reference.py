"""The reference: a plain re-implementation of the published loops, for the benchmark only.

What MTT (Cazenavette et al., CVPR 2022; github.com/GeorgeCazenavette/mtt-distillation) and
MKDT (Joshi et al., ICLR 2025), which builds on its code, do, written from their papers and
their code's structure, without ddkd's machinery:

* ``train_expert_reference``: ``buffer.py``. One student at a time, an ``nn.Module`` and
  ``torch.optim.SGD``, a Python loop over mini-batches, the loss read back with ``.item()``
  after every step (the published loop accumulates ``loss.item()``, a host sync per step).
* ``matching_iteration_reference``: ``distill.py``. The student is re-parametrised by one flat
  vector (its ``ReparamModule``; here a hand-written functional ConvNet that slices the vector
  per layer), the N inner steps keep the whole graph (``create_graph=True``), the parameter list
  grows by one vector per step, and the normalised parameter distance is backpropagated to the
  images, targets and learning rate at the end. MKDT's change is the inner loss: MSE to the
  learned target representations instead of cross-entropy to labels.

Not part of the package: it exists so that ``bench/run.py`` can report ratios against it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class FlatConvNet:
    """The MTT ConvNet (conv3x3 -> instance norm -> ReLU -> avgpool, ``depth`` times, then a
    linear layer) evaluated from one flat parameter vector, as ``ReparamModule`` does."""

    def __init__(self, in_channels: int, image_size: int, depth: int, width: int, out_dim: int):
        self.shapes: list[tuple[int, ...]] = []
        channels, size = in_channels, image_size
        for _ in range(depth):
            self.shapes += [(width, channels, 3, 3), (width,), (width,), (width,)]
            channels, size = width, size // 2
        self.shapes += [(out_dim, channels * size * size), (out_dim,)]
        self.depth, self.width = depth, width

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    def init(self, generator: torch.Generator) -> torch.Tensor:
        """A flat initial vector (PyTorch's default conv/linear initialisation ranges)."""
        parts = []
        for shape in self.shapes:
            if len(shape) > 1:  # weight: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
                bound = 1 / math.sqrt(math.prod(shape[1:]))
                parts.append((torch.rand(shape, generator=generator) * 2 - 1) * bound)
            else:
                parts.append(torch.zeros(shape))
        flat = torch.cat([p.flatten() for p in parts])
        # norm weights start at one (the 3rd of every 4 conv-block entries)
        offset = 0
        for i, shape in enumerate(self.shapes):
            if i < 4 * self.depth and i % 4 == 2:
                flat[offset : offset + shape[0]] = 1
            offset += math.prod(shape)
        return flat

    def __call__(self, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        params, offset = [], 0
        for shape in self.shapes:
            size = math.prod(shape)
            params.append(flat[offset : offset + size].view(shape))
            offset += size
        h = x
        for d in range(self.depth):
            w, b, gamma, beta = params[4 * d : 4 * d + 4]
            h = F.conv2d(h, w, b, padding=1)
            h = F.group_norm(h, self.width, gamma, beta)
            h = F.avg_pool2d(F.relu(h), 2)
        return F.linear(h.flatten(1), params[-2], params[-1])


def train_expert_reference(net: torch.nn.Module, x: torch.Tensor, z: torch.Tensor, epochs: int,
                           batch_size: int = 256, lr: float = 0.1, momentum: float = 0.9,
                           weight_decay: float = 1e-4, seed: int = 0) -> float:
    """One expert, the published way; returns the last epoch's mean loss."""
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    n, mean = x.shape[0], float("nan")
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        total = 0.0
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size].to(x.device)
            loss = F.mse_loss(net(x[idx]), z[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)  # a host sync per step, as published
        mean = total / n
    return mean


def matching_iteration_reference(model: FlatConvNet, theta_start: torch.Tensor,
                                 theta_target: torch.Tensor, x_syn: torch.Tensor,
                                 y_syn: torch.Tensor, syn_lr: torch.Tensor,
                                 batches: list[torch.Tensor]) -> tuple[float, torch.Tensor]:
    """One outer iteration's meta-gradient, the published way -> (loss, grad of x_syn)."""
    x_syn = x_syn.detach().requires_grad_(True)
    y_syn = y_syn.detach().requires_grad_(True)
    syn_lr = syn_lr.detach().requires_grad_(True)
    student_params = [theta_start.detach().clone().requires_grad_(True)]
    for idx in batches:
        out = model(student_params[-1], x_syn[idx])
        loss = F.mse_loss(out, y_syn[idx])
        grad = torch.autograd.grad(loss, student_params[-1], create_graph=True)[0]
        student_params.append(student_params[-1] - syn_lr * grad)
    param_loss = F.mse_loss(student_params[-1], theta_target, reduction="sum")
    param_dist = F.mse_loss(theta_start, theta_target, reduction="sum")
    grand_loss = param_loss / param_dist
    grand_loss.backward()
    return grand_loss.item(), x_syn.grad
