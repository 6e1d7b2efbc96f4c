"""Model registry: the ConvNet student and CIFAR-stem ResNets."""

from ddkd.models.convnet import ConvNet, ConvNetConfig
from ddkd.models.resnet import ResNet, ResNetConfig

__all__ = ["ConvNet", "ConvNetConfig", "ResNet", "ResNetConfig"]
