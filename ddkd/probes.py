"""Label-using probes of frozen features, shared by ``teach`` (reports) and ``evaluate``.

``knn_accuracy`` is the weighted cosine kNN of Wu et al. (CVPR 2018, "Unsupervised Feature
Learning via Non-Parametric Instance Discrimination"), the monitor used by DINO and lightly's
benchmarks: k = 20 neighbours, weights exp(sim / 0.07).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> float:
    """Top-1 accuracy (in [0, 1]) of a weighted cosine kNN classifier.

    Args:
        train_features: ``(N, D)`` memory bank.
        train_labels: ``(N,)`` int64.
        test_features: ``(M, D)`` queries, on the memory bank's device (a GPU's or the CPU).
        test_labels: ``(M,)`` int64.
    """
    bank = F.normalize(train_features.float(), dim=1)
    train_labels = train_labels.to(bank.device)  # features may live on a GPU, labels not
    k = min(k, bank.shape[0])
    correct = 0.0
    for start in range(0, test_features.shape[0], chunk):
        queries = F.normalize(test_features[start : start + chunk].float(), dim=1)
        sim, idx = (queries @ bank.T).topk(k, dim=1)  # (m, k)
        weights = (sim / temperature).exp()
        votes = torch.zeros(queries.shape[0], num_classes, dtype=weights.dtype,
                            device=weights.device)
        votes.scatter_add_(1, train_labels[idx], weights)
        truth = test_labels[start : start + chunk].to(votes.device)
        correct += (votes.argmax(1) == truth).sum().item()
    return correct / test_features.shape[0]


@torch.no_grad()
def extract_features(
    encoder: torch.nn.Module,
    images: torch.Tensor,
    normalize,
    device: torch.device,
    batch_size: int = 1024,
) -> torch.Tensor:
    """Run ``encoder`` (in eval mode) over uint8 ``(N, C, H, W)`` images -> ``(N, D)`` on CPU."""
    was_training = encoder.training
    encoder.eval()
    out = []
    for start in range(0, images.shape[0], batch_size):
        batch = normalize(images[start : start + batch_size].to(device))
        out.append(encoder(batch).float().cpu())
    encoder.train(was_training)
    return torch.cat(out)
