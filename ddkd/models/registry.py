"""The model registry, in timm's manner: ``build_model(name, **overrides)``.

A name fixes the architecture (``resnet18``: the CIFAR-stem ResNet of depth 18); the overrides
are the fields of its configuration dataclass (``in_channels``, ``base_width``, ...), which is
stored with every checkpoint so that the model can always be rebuilt.

Example:
    >>> build_model("resnet18", in_channels=1, base_width=16)(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 128])
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch  # noqa: F401 (the docstring's example)
from torch import nn

from ddkd.models.convnet import ConvNet, ConvNetConfig
from ddkd.models.resnet import ResNet, ResNetConfig

# name -> (config class, the fields the name fixes, the module built from the config)
_MODELS: dict[str, tuple[type, dict[str, Any], Callable[[Any], nn.Module]]] = {
    "convnet": (ConvNetConfig, {}, ConvNet),
    "resnet10": (ResNetConfig, {"depth": 10}, ResNet),
    "resnet18": (ResNetConfig, {"depth": 18}, ResNet),
    "resnet34": (ResNetConfig, {"depth": 34}, ResNet),
}
MODEL_NAMES = tuple(_MODELS)


def model_config(name: str, **overrides: Any) -> ConvNetConfig | ResNetConfig:
    """The configuration of model ``name`` with ``overrides`` (its dataclass's fields)."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(MODEL_NAMES)}")
    cls, fixed, _ = _MODELS[name]
    return cls(**{**overrides, **fixed})


def build_model(name: str, **overrides: Any) -> nn.Module:
    """A freshly initialised model ``name`` (PyTorch's initialisers: seed the global RNG
    first, e.g. with ``ddkd.runtime.global_cpu_rng_from``)."""
    return _MODELS[name][2](model_config(name, **overrides))
