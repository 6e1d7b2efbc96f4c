"""Trajectory matching with knowledge-distillation targets: pure functions, no I/O.

Follows MTT (Cazenavette et al., "Dataset Distillation by Matching Training Trajectories",
CVPR 2022) as adapted by MKDT (Joshi et al., ICLR 2025): starting from an expert's snapshot
theta*_t, take N plain-SGD steps on synthetic mini-batches with the KD loss,

    theta_{n+1} = theta_n - alpha * grad_theta L(f_{theta_n}(X_b), Y_b),

keeping the graph, and score the end point against the expert M epochs later,

    loss = ||theta_N - theta*_{t+M}||^2 / ||theta*_t - theta*_{t+M}||^2.

The gradient of that loss flows to the synthetic images X, their targets Y and the step size
alpha. The student is run functionally on a flat parameter vector
(``torch.func.functional_call``), so one module serves every segment.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ddkd.models.functional import ParamSpec, functional_forward
from ddkd.runtime import maybe_autocast

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Augment = Callable[[torch.Tensor, int], torch.Tensor]  # (images, step) -> augmented images


def mse_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MKDT's KD loss: mean squared error over batch and dimensions."""
    return F.mse_loss(output, target)


@dataclass(frozen=True)
class Segment:
    """One sampled piece of an expert trajectory and the synthetic batches to unroll on.

    Attributes:
        expert: index of the expert.
        start_epoch: t; the student starts at theta*_t.
        theta_start: ``(P,)`` theta*_t.
        theta_target: ``(P,)`` theta*_{t+M}.
        batches: N index tensors into the synthetic set, one per inner step.
    """

    expert: int
    start_epoch: int
    theta_start: torch.Tensor
    theta_target: torch.Tensor
    batches: tuple[torch.Tensor, ...]


def student_loss(model: nn.Module, spec: ParamSpec, theta: torch.Tensor, x: torch.Tensor,
                 y: torch.Tensor, loss_fn: LossFn = mse_loss,
                 amp_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The KD loss of the student at ``theta`` on one batch. With ``amp_dtype`` (e.g.
    ``torch.bfloat16``) the network's forward runs under ``torch.autocast`` (mixed precision:
    convolutions and matrix products in that dtype, parameters and the loss in float32)."""
    with maybe_autocast(x.device.type, amp_dtype):
        out = functional_forward(model, spec, theta, x)
    return loss_fn(out if amp_dtype is None else out.to(y.dtype), y)


def sample_batches(n_syn: int, syn_steps: int, batch_syn: int,
                   generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Index tensors of the N inner steps, as the published code draws them: a fresh random
    permutation split into chunks of ``batch_syn``, taken last chunk first, redrawn when used
    up. With ``batch_syn >= n_syn`` every step sees the whole set."""
    batches: list[torch.Tensor] = []
    chunks: list[torch.Tensor] = []
    for _ in range(syn_steps):
        if not chunks:
            chunks = list(torch.split(torch.randperm(n_syn, generator=generator), batch_syn))
        batches.append(chunks.pop())
    return tuple(batches)


def unroll(
    model: nn.Module,
    spec: ParamSpec,
    theta_start: torch.Tensor,
    x_syn: torch.Tensor,
    y_syn: torch.Tensor,
    alpha: torch.Tensor,
    batches: Sequence[torch.Tensor],
    loss_fn: LossFn = mse_loss,
    augment: Augment | None = None,
    create_graph: bool = True,
    amp_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """N inner SGD steps from ``theta_start``; returns theta_N ``(P,)``.

    With ``create_graph`` the result keeps the graph to ``x_syn``, ``y_syn`` and ``alpha``
    (memory grows linearly with N); without it nothing is kept (a forward-only unroll).
    """
    theta = theta_start.detach().requires_grad_(True)
    for step, idx in enumerate(batches):
        x = x_syn[idx]  # (b, C, H, W)
        if augment is not None:
            x = augment(x, step)
        loss = student_loss(model, spec, theta, x, y_syn[idx], loss_fn, amp_dtype)
        (grad,) = torch.autograd.grad(loss, theta, create_graph=create_graph)
        theta = theta - alpha * grad
        if not create_graph:
            theta = theta.detach().requires_grad_(True)
    return theta


def matching_loss(theta_end: torch.Tensor, theta_start: torch.Tensor,
                  theta_target: torch.Tensor) -> torch.Tensor:
    """||theta_end - target||^2 / ||theta_start - target||^2 (MTT's normalised distance)."""
    return (theta_end - theta_target).pow(2).sum() / (theta_start - theta_target).pow(2).sum()


@dataclass(frozen=True)
class MetaGradient:
    """The matching loss of one segment and its gradients."""

    loss: torch.Tensor  # scalar, detached
    grad_x: torch.Tensor  # like x_syn
    grad_y: torch.Tensor  # like y_syn
    grad_alpha: torch.Tensor  # scalar


def meta_gradient(
    model: nn.Module,
    spec: ParamSpec,
    segment: Segment,
    x_syn: torch.Tensor,
    y_syn: torch.Tensor,
    alpha: torch.Tensor,
    loss_fn: LossFn = mse_loss,
    augment: Augment | None = None,
    amp_dtype: torch.dtype | None = None,
) -> MetaGradient:
    """Matching loss and its gradient w.r.t. images, targets and step size, by backpropagating
    through the fully unrolled graph (MTT's method; memory linear in N). ``amp_dtype``: see
    :func:`student_loss`."""
    x = x_syn.detach().requires_grad_(True)
    y = y_syn.detach().requires_grad_(True)
    a = alpha.detach().requires_grad_(True)
    theta_end = unroll(model, spec, segment.theta_start, x, y, a, segment.batches, loss_fn,
                       augment, amp_dtype=amp_dtype)
    loss = matching_loss(theta_end, segment.theta_start, segment.theta_target)
    grad_x, grad_y, grad_alpha = torch.autograd.grad(loss, (x, y, a))
    return MetaGradient(loss.detach(), grad_x, grad_y, grad_alpha)


def meta_gradient_constant_memory(
    model: nn.Module,
    spec: ParamSpec,
    segment: Segment,
    x_syn: torch.Tensor,
    y_syn: torch.Tensor,
    alpha: torch.Tensor,
    loss_fn: LossFn = mse_loss,
    augment: Augment | None = None,
    amp_dtype: torch.dtype | None = None,
) -> MetaGradient:
    """The same gradient as :func:`meta_gradient`, with activation memory flat in N.

    After TESLA (Cui et al., "Scaling Up Dataset Distillation to ImageNet-1K with Constant
    Memory", ICML 2023): a forward unroll without a graph keeps only the parameter vectors
    theta_0..theta_{N-1} (N x P numbers, small next to activations); the backward pass then
    walks the steps in reverse, rebuilding one step's graph at a time. With the adjoint
    lambda_{n+1} = dloss/dtheta_{n+1} and theta_{n+1} = theta_n - alpha g_n:

        dloss/dalpha += -<g_n, lambda_{n+1}>
        dloss/dX, dY += d<g_n, -alpha lambda_{n+1}>/dX, /dY
        lambda_n      = lambda_{n+1} - alpha H_n lambda_{n+1}

    (H_n the Hessian of step n's loss; the vector-Jacobian product of ``g_n`` gives all three
    terms at once). Exact up to floating-point reassociation.
    """
    x = x_syn.detach()
    y = y_syn.detach()
    a = alpha.detach()
    # One buffer for theta_0..theta_{N-1}, allocated before any step's activations (as N
    # separate vectors, interleaved with them, they cost about 35 MiB more at N = 40 on the
    # CPU at the Fashion-MNIST shape).
    thetas = torch.empty((len(segment.batches), segment.theta_start.numel()),
                         dtype=segment.theta_start.dtype, device=segment.theta_start.device)
    thetas[0] = segment.theta_start.detach()
    for step, idx in enumerate(segment.batches[:-1]):  # theta_N itself comes from the last step
        theta = thetas[step].detach().requires_grad_(True)
        xb = augment(x[idx], step) if augment is not None else x[idx]
        loss = student_loss(model, spec, theta, xb, y[idx], loss_fn, amp_dtype)
        (grad,) = torch.autograd.grad(loss, theta)
        thetas[step + 1] = theta.detach() - a * grad
    grad_x = torch.zeros_like(x)
    grad_y = torch.zeros_like(y)
    grad_alpha = torch.zeros_like(a)
    lam = None
    theta_end = None
    denom = (segment.theta_start - segment.theta_target).pow(2).sum()
    for step in reversed(range(len(segment.batches))):
        idx = segment.batches[step]
        theta = thetas[step].detach().requires_grad_(True)
        xb_leaf = x[idx].detach().requires_grad_(True)
        yb_leaf = y[idx].detach().requires_grad_(True)
        xb = augment(xb_leaf, step) if augment is not None else xb_leaf
        loss = student_loss(model, spec, theta, xb, yb_leaf, loss_fn, amp_dtype)
        (grad,) = torch.autograd.grad(loss, theta, create_graph=True)
        if lam is None:  # the last step: theta_N and the adjoint of the matching loss
            theta_end = (theta - a * grad).detach()
            lam = 2.0 * (theta_end - segment.theta_target) / denom
        grad_alpha -= (grad.detach() * lam).sum()
        h_lam, g_xb, g_yb = torch.autograd.grad(grad, (theta, xb_leaf, yb_leaf),
                                                grad_outputs=-a * lam)
        grad_x.index_add_(0, idx, g_xb)
        grad_y.index_add_(0, idx, g_yb)
        lam = lam + h_lam
    assert theta_end is not None
    loss_value = matching_loss(theta_end, segment.theta_start, segment.theta_target)
    return MetaGradient(loss_value.detach(), grad_x, grad_y, grad_alpha)
