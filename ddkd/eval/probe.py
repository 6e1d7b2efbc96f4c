"""Linear probes of frozen features.

The default follows MKDT (Joshi et al., ICLR 2025): full-batch L-BFGS on the cross-entropy of a
linear classifier plus ``1e-3 ||W||^2``. Features are standardised with the labelled subset's
mean and standard deviation first (without it L-BFGS on raw ConvNet features converges badly
and a random network looks far worse than it is). ``linear_probe_sgd`` minimises the same
objective with mini-batch SGD, for label sets too large for a full-batch method.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ddkd.runtime import Stream, make_generator


def _standardise(train_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of the labelled features (float64), std clamped."""
    x = train_x.double()
    mean = x.mean(0)
    std = x.std(0).clamp_min(1e-6) if x.shape[0] > 1 else torch.ones_like(mean)
    return mean, std


def linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    num_classes: int,
    weight_decay: float = 1e-3,
    max_iter: int = 500,
) -> float:
    """Fit on ``(n, D)`` features, return top-1 test accuracy in [0, 1].

    Example:
        >>> x = torch.randn(100, 5); y = (x[:, 0] > 0).long()
        >>> linear_probe(x, y, x, y, 2) > 0.95
        True
    """
    mean, std = _standardise(train_x)
    x = (train_x.double() - mean) / std
    weight = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-9,
                            tolerance_change=1e-12)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ weight.T + bias, train_y) + weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        logits = ((test_x.double() - mean) / std) @ weight.T + bias
        return (logits.argmax(1) == test_y).double().mean().item()


def linear_probe_sgd(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    num_classes: int,
    weight_decay: float = 1e-3,
    epochs: int = 100,
    batch_size: int = 256,
    lr: float = 0.1,
    seed: int = 0,
) -> float:
    """The objective of :func:`linear_probe`, minimised by mini-batch SGD (momentum 0.9,
    cosine-decayed ``lr``, ``epochs`` passes in an order drawn from ``seed``); float32.

    Example:
        >>> x = torch.randn(200, 5); y = (x[:, 0] > 0).long()
        >>> linear_probe_sgd(x, y, x, y, 2) > 0.95
        True
    """
    mean, std = _standardise(train_x)
    x = ((train_x.double() - mean) / std).float()
    weight = torch.zeros(num_classes, x.shape[1], requires_grad=True)
    bias = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.SGD([weight, bias], lr=lr, momentum=0.9)
    gen = make_generator(seed, Stream.SGD_PROBE)
    n = x.shape[0]
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    for epoch in range(epochs):
        order = torch.randperm(n, generator=gen)
        for i in range(steps_per_epoch):
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * (epoch * steps_per_epoch + i)
                                                       / total))
            idx = order[i * batch_size : (i + 1) * batch_size]
            loss = F.cross_entropy(x[idx] @ weight.T + bias, train_y[idx]) \
                + weight_decay * weight.pow(2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        logits = ((test_x.double() - mean) / std).float() @ weight.T + bias
        return (logits.argmax(1) == test_y).double().mean().item()
