"""Flat parameter vectors: the representation of a student inside trajectories and matching.

MTT/MKDT store and match a network as one flat vector theta. :class:`ParamSpec` records the
names and shapes that turn such a vector back into a ``{name: tensor}`` dict, and
:func:`functional_forward` runs a module with a flat vector via ``torch.func.functional_call``
(replacing the research code's hand-written re-parametrisation module).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call


@dataclass(frozen=True)
class ParamSpec:
    """Names and shapes of a module's parameters, in ``named_parameters()`` order."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, module: nn.Module) -> ParamSpec:
        named = list(module.named_parameters())
        return cls(tuple(n for n, _ in named), tuple(tuple(p.shape) for _, p in named))

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    def flatten(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """``{name: tensor}`` -> ``(P,)``."""
        return torch.cat([params[n].reshape(-1) for n in self.names])

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """``(P,)`` -> ``{name: view}`` (views keep the autograd graph to ``flat``)."""
        out, offset = {}, 0
        for name, shape in zip(self.names, self.shapes, strict=True):
            size = math.prod(shape)
            out[name] = flat[offset : offset + size].view(shape)
            offset += size
        return out

    def to_json(self) -> dict:
        return {"names": list(self.names), "shapes": [list(s) for s in self.shapes]}

    @classmethod
    def from_json(cls, obj: dict) -> ParamSpec:
        return cls(tuple(obj["names"]), tuple(tuple(s) for s in obj["shapes"]))


def flat_params(module: nn.Module) -> torch.Tensor:
    """The module's parameters as one detached ``(P,)`` vector."""
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def functional_forward(
    module: nn.Module, spec: ParamSpec, flat: torch.Tensor, x: torch.Tensor
) -> torch.Tensor:
    """``module(x)`` with its parameters replaced by the flat vector ``flat``."""
    return functional_call(module, spec.unflatten(flat), (x,))
