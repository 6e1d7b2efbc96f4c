"""Few-label subsets for linear probing, fixed per seed and identical across methods.

MKDT (Joshi et al., ICLR 2025) draws a uniform random fraction of the labelled training set.
ddkd's default is class-stratified (the same fraction of every class, rounded), which removes
the class-imbalance noise that a uniform draw adds at 1% and below; ``uniform`` reproduces
MKDT's draw.
"""

from __future__ import annotations

import torch

from ddkd.errors import ConfigError
from ddkd.runtime import Stream, make_generator


def label_subset(labels: torch.Tensor, fraction: float, seed: int, num_classes: int,
                 stratified: bool = True) -> torch.Tensor:
    """Indices of a ``fraction`` of the labelled examples -> sorted ``(k,)`` int64.

    Stratified: ``round(fraction * n_c)`` examples of every class c (at least one required).
    Uniform: ``round(fraction * N)`` examples drawn without regard to class (every class must
    still appear, or the probe could not predict it). Depends only on ``(labels, fraction,
    seed)``, so every method of a table sees the same labels.
    """
    if not 0 < fraction <= 1:
        raise ConfigError(f"--fractions: {fraction} is not in (0, 1]")
    gen = make_generator(seed, Stream.LABELS, round(fraction * 1e9))
    if stratified:
        chosen = []
        for c in range(num_classes):
            members = (labels == c).nonzero().flatten()
            k = round(fraction * len(members))
            if k < 1:
                raise ConfigError(
                    f"--fractions {fraction:g} leaves {fraction * len(members):.2f} labels for "
                    f"class {c} ({len(members)} examples): at least one per class is needed; "
                    f"the smallest usable fraction is {0.5 / max(1, len(members)):.2g}"
                )
            chosen.append(members[torch.randperm(len(members), generator=gen)[:k]])
        return torch.cat(chosen).sort().values
    k = round(fraction * len(labels))
    idx = torch.randperm(len(labels), generator=gen)[:k].sort().values
    missing = num_classes - int(labels[idx].unique().numel())
    if missing:
        raise ConfigError(f"--fractions {fraction:g} (uniform) drew {k} labels that miss "
                          f"{missing} of {num_classes} classes; use a larger fraction or the "
                          "stratified default")
    return idx
