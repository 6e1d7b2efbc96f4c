"""Linear probes of frozen features.

The default follows MKDT (Joshi et al., ICLR 2025): full-batch L-BFGS on the cross-entropy of a
linear classifier plus ``1e-3 ||W||^2``. Features are standardised with the labelled subset's
mean and standard deviation first (without it L-BFGS on raw ConvNet features converges badly
and a random network looks far worse than it is).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
    x = train_x.double()
    mean = x.mean(0)
    std = x.std(0).clamp_min(1e-6) if x.shape[0] > 1 else torch.ones_like(mean)
    x = (x - mean) / std
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
