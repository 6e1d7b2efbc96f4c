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

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch.utils.data import TensorDataset

from ddkd.data.transforms import ZCA
from ddkd.errors import FileFormatError
from ddkd.io.atomic import write_bytes

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
    """Write ``s`` atomically (a crash never leaves a file under ``path``).

    The HDF5 file is built in memory and written in one plain write: h5py writing straight to
    a disk that fills up fails in its destructors and crashes the interpreter, a plain write
    raises ``ENOSPC`` (-> :class:`~ddkd.errors.DiskFullError`). A set is small (MBs).
    """
    _validate(s, str(path))
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as fh:
        from ddkd.version import __version__

        fh.attrs["format"] = FORMAT
        fh.attrs["format_version"] = VERSION
        fh.attrs["lr"] = float(s.lr)
        fh.attrs["objective"] = s.objective
        fh.attrs["provenance"] = json.dumps(s.provenance, sort_keys=True)
        fh.attrs["config"] = json.dumps(s.config, sort_keys=True)
        fh.attrs["ddkd_version"] = __version__
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
    write_bytes(path, buffer.getvalue())


def _validate(s: SynthSet, where: str, finite: bool = True) -> None:
    """Check every member against the format; each message names the member and what was
    expected. ``finite``: also refuse non-finite images, targets and state (such a set cannot
    be pre-trained on; ``ddkd inspect`` reads it anyway to say so)."""
    n = s.images.shape[0] if s.images.ndim else 0
    c = s.mean.shape[0] if s.mean.ndim == 1 else None
    if s.images.ndim != 4:
        raise FileFormatError(f"{where}: /images must be (n, C, H, W), got "
                              f"{tuple(s.images.shape)}")
    if c is not None and s.images.shape[1] != c:
        if s.images.shape[3] == c:
            raise FileFormatError(
                f"{where}: /images {tuple(s.images.shape)} is stored channels-last (n, H, W, C); "
                f"the format stores (n, C, H, W) with C = {c} (the entries of "
                "/normalization/mean): transpose it with images.permute(0, 3, 1, 2)")
        raise FileFormatError(f"{where}: /images has {s.images.shape[1]} channels but "
                              f"/normalization/mean has {c} entries (one per channel)")
    c = s.images.shape[1]
    if s.targets.ndim != 2 or s.targets.shape[0] != n:
        raise FileFormatError(
            f"{where}: targets must be (n={n}, D), got {tuple(s.targets.shape)}")
    if s.init_indices.shape != (n,):
        raise FileFormatError(f"{where}: init_indices must be ({n},), got "
                              f"{tuple(s.init_indices.shape)}")
    if s.mean.shape != (c,) or s.std.shape != (c,):
        raise FileFormatError(f"{where}: normalization mean/std must have {c} entries, got "
                              f"{tuple(s.mean.shape)} and {tuple(s.std.shape)}")
    d = int(np.prod(s.images.shape[1:]))
    if s.zca is not None and (s.zca.mean.shape != (d,) or s.zca.matrix.shape != (d, d)
                              or s.zca.inverse.shape != (d, d)):
        raise FileFormatError(f"{where}: the ZCA transform must be ({d},) and ({d}, {d})")
    if not np.isfinite(s.lr) or s.lr <= 0:
        raise FileFormatError(f"{where}: the step size lr must be a positive number, got {s.lr}")
    lengths = {name: np.asarray(values).size for name, values in s.history.items()}
    if len(set(lengths.values())) > 1:
        listed = ", ".join(f"/history/{k} {v}" for k, v in sorted(lengths.items()))
        raise FileFormatError(f"{where}: the history arrays differ in length ({listed} "
                              "entries); expected one entry per iteration in each")
    _check_objective_state(s, where)
    if finite:
        bad = non_finite_members(s)
        if bad:
            raise FileFormatError(f"{where}: {bad[0]}; the set is damaged (a diverged run?) and "
                                  "cannot be pre-trained on")


def non_finite_members(s: SynthSet) -> list[str]:
    """One description per member holding NaN or inf (images, targets, normalisation,
    objective state, ZCA), naming the member and where its first bad value is."""
    members: dict[str, torch.Tensor] = {"/images": s.images, "/targets": s.targets,
                                        "/normalization/mean": s.mean,
                                        "/normalization/std": s.std}
    members.update({f"/objective/{k}": v for k, v in s.objective_state.items()})
    if s.zca is not None:
        members.update({f"/zca/{k}": v for k, v in s.zca.tensors().items()})
    out = []
    for name, tensor in members.items():
        if not (tensor.is_floating_point() or tensor.is_complex()):
            continue
        bad = ~torch.isfinite(tensor)
        if bool(bad.any()):
            where = ""
            if name in ("/images", "/targets") and tensor.ndim > 1:
                row = int(bad.flatten(1).any(1).nonzero()[0])
                where = f", the first in {'image' if name == '/images' else 'row'} {row}"
            out.append(f"{name} holds {int(bad.sum())} non-finite values (NaN or inf){where}")
    return out


def _check_objective_state(s: SynthSet, where: str) -> None:
    """The objective's state must map teacher features into the targets' space: restore the
    objective from it and compare the width it produces with /targets'."""
    from ddkd.errors import ConfigError
    from ddkd.objectives import restore_objective

    dim = s.targets.shape[1]
    shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in sorted(s.objective_state.items()))
    state = f"/objective ({shapes or 'empty'})"
    try:
        objective = restore_objective(s.objective, s.objective_state, dim)
        width = objective.targets(torch.zeros(1, objective.teacher_dim)).shape[1]
    except (ConfigError, KeyError, RuntimeError, IndexError, ValueError, TypeError) as err:
        raise FileFormatError(f"{where}: the state of objective {s.objective!r} in {state} is "
                              f"not one it can be restored from ({str(err).splitlines()[0]})"
                              ) from err
    if width != dim:
        raise FileFormatError(f"{where}: the state of objective {s.objective!r} in {state} "
                              f"gives targets of dimension {width}, but /targets has {dim}; "
                              f"expected the state fitted for {dim}-dimensional targets")


def _describe(value: Any) -> str:
    if isinstance(value, (str, bytes)):
        return f"the string {value!r}"
    if isinstance(value, (float, np.floating)):
        return f"the float {float(value)!r}"
    return f"{value!r} ({type(value).__name__})"


def _check_version(fh: h5py.File, path: Path) -> None:
    if "format_version" not in fh.attrs:
        raise FileFormatError(f"{path} lacks the attribute format_version (expected the integer "
                              f"{VERSION})")
    version = fh.attrs["format_version"]
    if isinstance(version, (bool, np.bool_)) or not isinstance(version, (int, np.integer)):
        raise FileFormatError(f"{path}: the attribute format_version is {_describe(version)}, "
                              f"expected the integer {VERSION}")
    if version > VERSION:
        raise FileFormatError(f"{path} is {FORMAT} version {version}; this ddkd reads up to "
                              f"version {VERSION}: upgrade ddkd")
    if version < 1:
        raise FileFormatError(f"{path}: the attribute format_version is {int(version)}, "
                              f"expected the integer {VERSION}")


def _array(fh: h5py.File | h5py.Group, name: str, path: Path) -> np.ndarray:
    """A numeric dataset's values (KeyError when missing: reported as a missing field)."""
    member = fh[name]
    where = f"/{member.name.lstrip('/')}"
    if not isinstance(member, h5py.Dataset):
        raise FileFormatError(f"{path}: {where} is a group, expected a dataset")
    values = np.asarray(member[()])
    if not (np.issubdtype(values.dtype, np.number) or values.dtype == np.bool_):
        raise FileFormatError(f"{path}: {where} has dtype {values.dtype}, expected numbers")
    return values


def _json_attr(fh: h5py.File, name: str, path: Path) -> dict:
    raw = fh.attrs[name]
    try:
        value = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
    except (TypeError, ValueError) as err:
        raise FileFormatError(f"{path}: the attribute {name} is not JSON ({err}); expected a "
                              "JSON object") from err
    if not isinstance(value, dict):
        raise FileFormatError(f"{path}: the attribute {name} is JSON {type(value).__name__}, "
                              "expected a JSON object")
    return value


def _number_attr(fh: h5py.File | h5py.Group, name: str, path: Path) -> float:
    raw = fh.attrs[name]
    try:
        return float(raw)
    except (TypeError, ValueError) as err:
        raise FileFormatError(f"{path}: the attribute {name} is {_describe(raw)}, expected a "
                              "number") from err


def load_synthset(path: str | Path, finite: bool = True) -> SynthSet:
    """Read a synthetic set; a foreign, newer, truncated or mis-shaped file gets a clear error.

    ``finite``: refuse a set whose images, targets or state hold NaN or inf (False: read it
    anyway, e.g. to inspect it; :func:`non_finite_members` lists them).

    Example:
        >>> s = ddkd.load_synthset("synth_sets/fashion-mnist_ipc10.h5")   # doctest: +SKIP
        >>> loader = torch.utils.data.DataLoader(s.dataset(), batch_size=256, shuffle=True)
    """
    path = Path(path)
    if path.is_dir():
        raise FileFormatError(f"{path} is a directory, not a synthetic set (.h5 file)")
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
        _check_version(fh, path)
        try:
            s = SynthSet(
                images=torch.from_numpy(_array(fh, "images", path)),
                targets=torch.from_numpy(_array(fh, "targets", path)),
                lr=_number_attr(fh, "lr", path),
                mean=torch.from_numpy(_array(fh, "normalization/mean", path)),
                std=torch.from_numpy(_array(fh, "normalization/std", path)),
                objective=str(fh.attrs["objective"]),
                provenance=_json_attr(fh, "provenance", path),
                config=_json_attr(fh, "config", path),
                init_indices=torch.from_numpy(_array(fh, "init_indices", path)),
                objective_state={k: torch.from_numpy(_array(fh["objective"], k, path))
                                 for k in fh["objective"]},
                history={k: _array(fh["history"], k, path) for k in fh["history"]},
                zca=ZCA(**{k: torch.from_numpy(_array(fh["zca"], k, path))
                           for k in ("mean", "matrix", "inverse")},
                        eps=_number_attr(fh["zca"], "eps", path)) if "zca" in fh else None,
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
    _validate(s, str(path), finite=finite)
    return s
