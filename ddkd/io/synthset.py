"""The synthetic-set file: ``ddkd-synthset``, version 1 (HDF5, readable with h5py alone).

Layout (documented for users in ``synth_sets/README.md``)::

    /                       attrs: format = "ddkd-synthset", format_version = 1,
                                   lr (the learned step size alpha), objective (e.g. "mse"),
                                   provenance (JSON), config (JSON), ddkd_version
    /images                 (n, C, H, W) float32, in the normalised (and, if /zca exists,
                            whitened) space the students were trained in
    /targets                (n, D) float32 learned target representations
    /init_indices           (n,) int64 indices into the source training split of the images
                            the set was initialised from
    /normalization/mean     (C,) float64 per-channel mean in [0, 1] pixel units
    /normalization/std      (C,) float64 per-channel std
    /objective/...          the objective's fitted state (for "mse": empty, or the mean
                            and std of its standardised targets)
    /zca/mean, /zca/matrix, /zca/inverse   only for whitened sets: (d,), (d, d), (d, d)
                            with d = C*H*W; attr eps. Normalised images = images @ inverse + mean
    /history/loss           (iterations,) float32 matching loss per iteration
    /history/lr             (iterations,) float32 step size per iteration

Pixels in [0, 1] are ``images * std + mean`` (after undoing the ZCA transform, if any).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import TensorDataset

from ddkd.data.transforms import ZCA
from ddkd.errors import FileFormatError
from ddkd.io.atomic import atomic_path

FORMAT = "ddkd-synthset"
VERSION = 1


@dataclass
class SynthSet:
    """A synthetic set in memory.

    Attributes:
        images: ``(n, C, H, W)`` float32, normalised (model-input) space.
        targets: ``(n, D)`` float32 learned targets.
        lr: the learned step size (the pre-training learning rate).
        mean, std: per-channel normalisation, ``(C,)``.
        objective: KD objective name; ``objective_state`` its fitted tensors.
        provenance, config: JSON-able dicts.
        init_indices: ``(n,)`` int64.
        history: per-iteration ``loss`` and ``lr``.
    """

    images: torch.Tensor
    targets: torch.Tensor
    lr: float
    mean: torch.Tensor
    std: torch.Tensor
    objective: str
    provenance: dict
    config: dict
    init_indices: torch.Tensor
    objective_state: dict[str, torch.Tensor] = field(default_factory=dict)
    history: dict[str, np.ndarray] = field(default_factory=dict)
    zca: ZCA | None = None

    def __len__(self) -> int:
        return self.images.shape[0]

    def dataset(self) -> TensorDataset:
        """A torch ``Dataset`` of ``(image, target)`` pairs."""
        return TensorDataset(self.images, self.targets)

    def pixels(self) -> torch.Tensor:
        """Images in [0, 1] pixel units ``(n, C, H, W)`` (clamped), for viewing."""
        images = self.zca.undo(self.images) if self.zca is not None else self.images
        std = self.std.to(self.images.dtype).view(1, -1, 1, 1)
        mean = self.mean.to(self.images.dtype).view(1, -1, 1, 1)
        return (images * std + mean).clamp(0, 1)


def save_synthset(path: str | Path, s: SynthSet) -> None:
    """Write ``s`` atomically (a crash never leaves a file under ``path``)."""
    _validate(s, str(path))
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as fh:
            import ddkd

            fh.attrs["format"] = FORMAT
            fh.attrs["format_version"] = VERSION
            fh.attrs["lr"] = float(s.lr)
            fh.attrs["objective"] = s.objective
            fh.attrs["provenance"] = json.dumps(s.provenance, sort_keys=True)
            fh.attrs["config"] = json.dumps(s.config, sort_keys=True)
            fh.attrs["ddkd_version"] = ddkd.__version__
            fh.create_dataset("images", data=s.images.detach().cpu().numpy().astype(np.float32))
            fh.create_dataset("targets", data=s.targets.detach().cpu().numpy().astype(np.float32))
            fh.create_dataset("init_indices", data=s.init_indices.cpu().numpy().astype(np.int64))
            norm = fh.create_group("normalization")
            norm.create_dataset("mean", data=s.mean.cpu().numpy().astype(np.float64))
            norm.create_dataset("std", data=s.std.cpu().numpy().astype(np.float64))
            obj = fh.create_group("objective")
            for name, tensor in s.objective_state.items():
                obj.create_dataset(name, data=tensor.cpu().numpy())
            if s.zca is not None:
                zca = fh.create_group("zca")
                zca.attrs["eps"] = s.zca.eps
                for name, tensor in s.zca.tensors().items():
                    zca.create_dataset(name, data=tensor.cpu().numpy().astype(np.float32))
            hist = fh.create_group("history")
            for name, values in s.history.items():
                hist.create_dataset(name, data=np.asarray(values, dtype=np.float32))


def _validate(s: SynthSet, where: str) -> None:
    n = s.images.shape[0]
    if s.images.ndim != 4:
        raise FileFormatError(f"{where}: images must be (n, C, H, W), got {tuple(s.images.shape)}")
    if s.targets.ndim != 2 or s.targets.shape[0] != n:
        raise FileFormatError(
            f"{where}: targets must be (n={n}, D), got {tuple(s.targets.shape)}")
    if s.init_indices.shape != (n,):
        raise FileFormatError(f"{where}: init_indices must be ({n},), got "
                              f"{tuple(s.init_indices.shape)}")
    c = s.images.shape[1]
    if s.mean.shape != (c,) or s.std.shape != (c,):
        raise FileFormatError(f"{where}: normalization mean/std must have {c} entries")
    d = int(np.prod(s.images.shape[1:]))
    if s.zca is not None and (s.zca.mean.shape != (d,) or s.zca.matrix.shape != (d, d)
                              or s.zca.inverse.shape != (d, d)):
        raise FileFormatError(f"{where}: the ZCA transform must be ({d},) and ({d}, {d})")
    if not np.isfinite(s.lr) or s.lr <= 0:
        raise FileFormatError(f"{where}: the step size lr must be a positive number, got {s.lr}")


def load_synthset(path: str | Path) -> SynthSet:
    """Read a synthetic set; a foreign, newer, truncated or mis-shaped file gets a clear error.

    Example:
        >>> s = ddkd.load_synthset("synth_sets/fashion-mnist_ipc10.h5")   # doctest: +SKIP
        >>> loader = torch.utils.data.DataLoader(s.dataset(), batch_size=256, shuffle=True)
    """
    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"synthetic set {path} does not exist")
    try:
        fh = h5py.File(path, "r")
    except OSError as err:
        raise FileFormatError(f"{path} is not a readable HDF5 file (truncated or foreign): "
                              f"{err}") from err
    with fh:
        fmt = fh.attrs.get("format")
        if fmt != FORMAT:
            raise FileFormatError(f"{path} is not a ddkd synthetic set (format attribute {fmt!r}, "
                                  f"expected {FORMAT!r})")
        version = int(fh.attrs.get("format_version", -1))
        if version > VERSION:
            raise FileFormatError(f"{path} is {FORMAT} version {version}; this ddkd reads up to "
                                  f"version {VERSION}: upgrade ddkd")
        if version < 1:
            raise FileFormatError(f"{path} has an invalid format_version {version}")
        try:
            s = SynthSet(
                images=torch.from_numpy(fh["images"][()]),
                targets=torch.from_numpy(fh["targets"][()]),
                lr=float(fh.attrs["lr"]),
                mean=torch.from_numpy(fh["normalization/mean"][()]),
                std=torch.from_numpy(fh["normalization/std"][()]),
                objective=str(fh.attrs["objective"]),
                provenance=json.loads(fh.attrs["provenance"]),
                config=json.loads(fh.attrs["config"]),
                init_indices=torch.from_numpy(fh["init_indices"][()]),
                objective_state={k: torch.from_numpy(np.asarray(v[()]))
                                 for k, v in fh["objective"].items()},
                history={k: np.asarray(v[()]) for k, v in fh["history"].items()},
                zca=ZCA(**{k: torch.from_numpy(fh["zca"][k][()])
                           for k in ("mean", "matrix", "inverse")},
                        eps=float(fh["zca"].attrs["eps"])) if "zca" in fh else None,
            )
        except KeyError as err:
            missing = [k for k in ("images", "targets", "init_indices", "normalization/mean",
                                   "normalization/std", "objective", "history", "zca/mean",
                                   "zca/matrix", "zca/inverse") if k not in fh
                       and (not k.startswith("zca/") or "zca" in fh)]
            missing += [a for a in ("lr", "objective", "provenance", "config")
                        if a not in fh.attrs]
            raise FileFormatError(f"{path} lacks the field {(missing or [str(err)])[0]!r} of "
                                  f"{FORMAT} version {VERSION}") from err
        except OSError as err:
            raise FileFormatError(f"{path} is damaged (truncated?): {err}") from err
    _validate(s, str(path))
    return s
