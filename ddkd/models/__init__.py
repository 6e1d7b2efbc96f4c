"""Model registry: the ConvNet student and CIFAR-stem ResNets."""

from ddkd.models.convnet import ConvNet, ConvNetConfig
from ddkd.models.registry import MODEL_NAMES, build_model, model_config
from ddkd.models.resnet import ResNet, ResNetConfig

__all__ = ["MODEL_NAMES", "ConvNet", "ConvNetConfig", "ResNet", "ResNetConfig", "build_model",
           "model_config"]
