import pickle

import numpy as np
import pytest
import torch

from conftest import requires_fmnist, requires_foolbox, requires_mnist, write_idx
from ddkd.data import Normalization, load_dataset
from ddkd.errors import DataError


def test_idx_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.array([0, 1, 2, 3, 4], dtype=np.uint8)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels)
    ds = load_dataset("mnist", "train", data_root=str(tmp_path))
    assert ds.images.shape == (5, 1, 28, 28) and ds.images.dtype == torch.uint8
    assert torch.equal(ds.images[:, 0], torch.from_numpy(images))
    assert ds.labels.tolist() == [0, 1, 2, 3, 4]


def test_truncated_idx_is_refused(tmp_path):
    images = np.zeros((5, 4, 4), dtype=np.uint8)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    import gzip

    data = gzip.open(tmp_path / "train-images-idx3-ubyte.gz").read()[:-3]
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "wb") as fh:
        fh.write(data)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(5, dtype=np.uint8))
    with pytest.raises(DataError, match="truncated"):
        load_dataset("mnist", "train", data_root=str(tmp_path))


def test_cifar_layout_on_tiny_files(tmp_path):
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (3, 3072), dtype=np.uint8),
                 b"labels": [1, 2, 3]}
        with open(base / name, "wb") as fh:
            pickle.dump(batch, fh)
    train = load_dataset("cifar10", "train", data_root=str(tmp_path))
    test = load_dataset("cifar10", "test", data_root=str(tmp_path))
    assert train.images.shape == (15, 3, 32, 32) and test.images.shape == (3, 3, 32, 32)
    assert train.num_classes == 10 and test.labels.tolist() == [1, 2, 3]


def test_missing_dataset_says_how_to_get_it(tmp_path):
    with pytest.raises(DataError, match="needs --data-root"):
        load_dataset("cifar10", "train")
    with pytest.raises(DataError, match="not present under --data-root.*torchvision layout"):
        load_dataset("cifar100", "train", data_root=str(tmp_path))
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(f"imagefolder:{tmp_path / 'nope'}")
    with pytest.raises(DataError, match="unknown dataset 'imagenet'"):
        load_dataset("imagenet")


def test_imagefolder(tiny_folder):
    ds = load_dataset(f"imagefolder:{tiny_folder}", "train")
    assert ds.images.shape == (24, 1, 8, 8) and ds.num_classes == 2
    assert ds.labels.tolist() == [0] * 12 + [1] * 12


def test_imagefolder_of_mixed_sizes_is_refused(tmp_path):
    from PIL import Image

    (tmp_path / "a").mkdir()
    Image.new("L", (8, 8)).save(tmp_path / "a" / "1.png")
    Image.new("L", (9, 8)).save(tmp_path / "a" / "2.png")
    with pytest.raises(DataError, match="resize the folder"):
        load_dataset(f"imagefolder:{tmp_path}")


def test_checksum_identifies_the_data(tiny_folder):
    a = load_dataset(f"imagefolder:{tiny_folder}")
    b = load_dataset(f"imagefolder:{tiny_folder}")
    assert a.checksum() == b.checksum()
    assert a.subset(torch.arange(3)).checksum() != a.checksum()


def test_normalization_round_trip():
    images = torch.randint(0, 256, (10, 3, 4, 4), dtype=torch.uint8)
    norm = Normalization.fit(images)
    x = norm(images)
    assert x.mean(dim=(0, 2, 3)).abs().max() < 1e-5
    assert torch.allclose(norm.denormalize(x), images.float() / 255, atol=1e-6)


@requires_fmnist
def test_fashion_mnist():
    train = load_dataset("fashion-mnist", "train")
    test = load_dataset("fashion-mnist", "test")
    assert train.images.shape == (60000, 1, 28, 28) and len(test) == 10000
    assert train.labels.bincount().tolist() == [6000] * 10


@requires_mnist
def test_mnist():
    assert load_dataset("mnist", "test").images.shape == (10000, 1, 28, 28)


@requires_foolbox
def test_cifar10_samples():
    ds = load_dataset("cifar10-samples")
    assert ds.images.shape == (20, 3, 32, 32) and ds.num_classes == 10


def test_zca_whitens_and_undoes():
    from ddkd.data.transforms import ZCA

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 1, 3, 3, generator=gen) @ torch.randn(3, 3, generator=gen)
    zca = ZCA.fit(x, eps=1e-6)
    white = zca(x).flatten(1).double()
    cov = white.T @ white / (len(white) - 1)
    assert torch.allclose(cov, torch.eye(9, dtype=torch.float64), atol=1e-2)
    assert torch.allclose(zca.undo(zca(x)), x, atol=1e-4)


def _tiny_imagenet(root, wnids=("n01", "n02"), per_class=3):
    """The tiny-imagenet-200 layout, with 64x64 images (one of them greyscale, as in the real
    set)."""
    from PIL import Image

    base = root / "tiny-imagenet-200"
    (base / "val" / "images").mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    rng = np.random.default_rng(0)
    lines = []
    for c, wnid in enumerate(wnids):
        folder = base / "train" / wnid / "images"
        folder.mkdir(parents=True)
        for i in range(per_class):
            mode = "L" if (c, i) == (0, 0) else "RGB"
            shape = (64, 64) if mode == "L" else (64, 64, 3)
            pixels = rng.integers(0, 256, shape, dtype=np.uint8)
            Image.fromarray(pixels, mode).save(folder / f"{wnid}_{i}.JPEG")
            Image.fromarray(pixels, mode).save(base / "val" / "images" / f"val_{c}_{i}.JPEG")
            lines.append(f"val_{c}_{i}.JPEG\t{wnid}\t0\t0\t63\t63")
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return root


def test_tiny_imagenet_layout(tmp_path):
    root = _tiny_imagenet(tmp_path)
    train = load_dataset("tiny-imagenet", "train", str(root))
    test = load_dataset("tiny-imagenet", "test", str(root))
    assert train.images.shape == (6, 3, 64, 64) and train.images.dtype == torch.uint8
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1] and train.num_classes == 2
    assert test.labels.tolist() == [0, 0, 0, 1, 1, 1]
    grey = train.images[0]
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])  # grey -> RGB


def test_tiny_imagenet_missing_says_where_to_put_it(tmp_path):
    with pytest.raises(DataError, match="unpack tiny-imagenet-200.zip"):
        load_dataset("tiny-imagenet", "train", str(tmp_path))
