"""The synthetic-set file: ``ddkd-synthset``, versions 1 and 2 (HDF5, readable with h5py
alone; specified in ``docs/formats.md``).

Layout::

    /                       attrs: format = "ddkd-synthset", format_version = 1 (2 for a set
                                   with views), lr (the learned step size alpha), objective
                                   (e.g. "mse"), provenance (JSON), config (JSON), ddkd_version,
                                   views (version 2 only: comma-separated view names)
    /images                 (n, C, H, W) float32, in the normalised (and, if /zca exists,
                            whitened) space the students were trained in
    /targets                (n, D) float32 learned target representations; version 2:
                            (n, V, D), [i, v] the target of view v of image i
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
A set without views is written as version 1, byte for byte as before views existed.
"""

from __future__ import annotations

import dataclasses
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
from ddkd.data.views import check_views_fit, expand_views, parse_views
from ddkd.errors import ConfigError, FileFormatError
from ddkd.io.atomic import write_bytes

FORMAT = "ddkd-synthset"
VERSION = 2  # the newest this ddkd reads and writes; a set without views is written as 1
_VERSION_VIEWS = 2


@dataclass
class SynthSet:
    """A synthetic set in memory.

    Attributes:
        images: ``(n, C, H, W)`` float32, normalised (model-input) space.
        targets: ``(n, D)`` float32 learned targets; with ``views``, ``(n, V, D)``: row
            ``[i, v]`` is the target of image ``i`` under view ``views[v]``.
        lr: the learned step size (the pre-training learning rate).
        mean, std: per-channel normalisation, ``(C,)``.
        objective: KD objective name; ``objective_state`` its fitted tensors.
        provenance, config: JSON-able dicts.
        init_indices: ``(n,)`` int64.
        history: per-iteration ``loss`` and ``lr``.
        views: the predefined views every image is used under (``ddkd.data.views``), e.g.
            ``("identity", "rot90")``; empty for a plain set (format version 1).
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
    views: tuple[str, ...] = ()

    def __len__(self) -> int:
        """The number of stored images (a viewed set pre-trains on ``len * V`` pairs)."""
        return self.images.shape[0]

    @property
    def target_dim(self) -> int:
        return self.targets.shape[-1]

    def pairs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """What pre-training regresses: ``(x (m, C, H, W), y (m, D))``, every (image, view)
        pair with its own target (``m = n * V``, image-major), or the images and targets
        themselves for a set without views."""
        if not self.views:
            return self.images, self.targets
        return expand_views(self.images, self.views), self.targets.flatten(0, 1)

    def dataset(self) -> TensorDataset:
        """A torch ``Dataset`` of ``(image, target)`` pairs (every view of a viewed set)."""
        return TensorDataset(*self.pairs())

    def select_views(self, views: tuple[str, ...], flag: str = "--views",
                     where: str = "the set") -> SynthSet:
        """The set restricted to some of its stored views (their targets only), in the order
        given; refuses views the set does not store, and a set without views."""
        if not self.views:
            raise ConfigError(f"{flag} {','.join(views)}: {where} has no per-view targets (made "
                              "without `ddkd synthesize --views`, format version 1); expected "
                              "a set made with --views, or leave out " + flag)
        missing = [v for v in views if v not in self.views]
        if missing:
            raise ConfigError(f"{flag} {','.join(views)}: {where} has no targets for the view "
                              f"{missing[0]!r}; it stores {','.join(self.views)}")
        columns = torch.tensor([self.views.index(v) for v in views])
        return dataclasses.replace(self, targets=self.targets[:, columns], views=tuple(views))

    def expanded(self) -> SynthSet:
        """The set as a plain one of its ``n * V`` (image, view) pairs, for tools that know no
        views (what pre-training sees is the same); a set without views is returned as is."""
        if not self.views:
            return self
        images, targets = self.pairs()
        v = len(self.views)
        return dataclasses.replace(self, images=images.contiguous(), targets=targets,
                                   init_indices=self.init_indices.repeat_interleave(v),
                                   views=())

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
        fh.attrs["format_version"] = _VERSION_VIEWS if s.views else 1
        fh.attrs["lr"] = float(s.lr)
        fh.attrs["objective"] = s.objective
        fh.attrs["provenance"] = json.dumps(s.provenance, sort_keys=True)
        fh.attrs["config"] = json.dumps(s.config, sort_keys=True)
        fh.attrs["ddkd_version"] = __version__
        if s.views:
            fh.attrs["views"] = ",".join(s.views)
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
    _check_targets(s, where, n)
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


def _check_targets(s: SynthSet, where: str, n: int) -> None:
    """/targets is (n, D), or (n, V, D) with one target per image and view of a viewed set."""
    if s.views:
        v = len(s.views)
        if s.targets.ndim != 3 or s.targets.shape[:2] != (n, v):
            raise FileFormatError(
                f"{where}: a set with {v} views ({','.join(s.views)}) needs targets (n={n}, "
                f"V={v}, D), one per image and view; got {tuple(s.targets.shape)}")
        try:
            check_views_fit(s.views, tuple(s.images.shape), flag="views",
                            where=f"{where}'s images")
        except ConfigError as err:
            raise FileFormatError(str(err)) from err
    elif s.targets.ndim != 2 or s.targets.shape[0] != n:
        raise FileFormatError(
            f"{where}: targets must be (n={n}, D), got {tuple(s.targets.shape)}")


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
    from ddkd.objectives import restore_objective

    dim = s.target_dim
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


_EXPECTED_VERSION = "the integer 1, or 2 for a set with views"


def _check_version(fh: h5py.File, path: Path) -> int:
    if "format_version" not in fh.attrs:
        raise FileFormatError(f"{path} lacks the attribute format_version (expected "
                              f"{_EXPECTED_VERSION})")
    version = fh.attrs["format_version"]
    if isinstance(version, (bool, np.bool_)) or not isinstance(version, (int, np.integer)):
        raise FileFormatError(f"{path}: the attribute format_version is {_describe(version)}, "
                              f"expected {_EXPECTED_VERSION}")
    if version > VERSION:
        raise FileFormatError(f"{path} is {FORMAT} version {version}; this ddkd reads up to "
                              f"version {VERSION}: upgrade ddkd")
    if version < 1:
        raise FileFormatError(f"{path}: the attribute format_version is {int(version)}, "
                              f"expected {_EXPECTED_VERSION}")
    return int(version)


def _views_attr(fh: h5py.File, version: int, path: Path) -> tuple[str, ...]:
    """Version 2's required attribute ``views`` -> the view names (version 1: none)."""
    if version < _VERSION_VIEWS:
        return ()
    if "views" not in fh.attrs:
        raise FileFormatError(f"{path} is {FORMAT} version {version} but lacks the attribute "
                              "views (expected the comma-separated view names, e.g. "
                              "'identity,rot90')")
    raw = fh.attrs["views"]
    text = raw.decode() if isinstance(raw, bytes) else raw
    if not isinstance(text, str):
        raise FileFormatError(f"{path}: the attribute views is {_describe(raw)}, expected a "
                              "string of comma-separated view names")
    try:
        views = parse_views(text, flag="the attribute views")
    except ConfigError as err:
        raise FileFormatError(f"{path}: {err}") from err
    if not views:
        raise FileFormatError(f"{path}: the attribute views is {text!r}; a version {version} "
                              "set names at least one view")
    return views


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
        version = _check_version(fh, path)
        views = _views_attr(fh, version, path)
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
                views=views,
            )
        except KeyError as err:
            missing = [k for k in ("images", "targets", "init_indices", "normalization/mean",
                                   "normalization/std", "objective", "history", "zca/mean",
                                   "zca/matrix", "zca/inverse") if k not in fh
                       and (not k.startswith("zca/") or "zca" in fh)]
            missing += [a for a in ("lr", "objective", "provenance", "config")
                        if a not in fh.attrs]
            raise FileFormatError(f"{path} lacks the field {(missing or [str(err)])[0]!r} of "
                                  f"{FORMAT} version {version}") from err
        except OSError as err:
            raise FileFormatError(f"{path} is damaged (truncated?): {err}") from err
    _validate(s, str(path), finite=finite)
    return s
