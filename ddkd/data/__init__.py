"""Datasets (in-memory uint8 tensors) and transforms."""

from ddkd.data.datasets import DATASET_NAMES, ImageTensors, load_dataset
from ddkd.data.transforms import Normalization, ssl_augmentation

__all__ = ["DATASET_NAMES", "ImageTensors", "Normalization", "load_dataset", "ssl_augmentation"]
