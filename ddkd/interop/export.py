"""``ddkd export``: a synthetic set in plain forms that need neither ddkd nor HDF5.

Formats (``--format``):

- ``npz``: ``OUT.npz`` (numpy arrays) + ``OUT.json`` (the metadata sidecar). Lossless.
- ``safetensors``: ``OUT.safetensors`` (written by :mod:`ddkd.interop.safetensors`, no package
  needed; the sidecar is also embedded as ``__metadata__["ddkd"]``) + ``OUT.json``. Lossless.
- ``png-folder``: ``OUT/images/00000.png ...`` (the images in [0, 1] pixel units: un-whitened,
  de-normalised, *clipped to [0, 1] and quantised to 8 bits*, which the sidecar says), plus
  ``OUT/targets.npy`` (and ``OUT/labels.npy`` for a set of hard labels) and
  ``OUT/metadata.json``. Lossy in the images.
- ``pt``: the trio of ``.pt`` files the published evaluators read, in ``OUT/``, plus
  ``OUT/metadata.json``: MKDT's ``images_{it}.pt``, ``labels_{it}.pt``, ``synlr_{it}.pt``
  (``--layout mkdt``, the default for a set of representations), MTT/DATM's
  ``images_best.pt``, ``labels_best.pt``, ``lr_best.pt`` (``--layout mtt``, the default for a
  supervised set; what DD-Ranking reads), or KRR-ST's ``x_syn.pt``, ``y_syn.pt`` (``--layout
  krr-st``: that layout has no step size). The images stay in the set's (normalised, possibly
  whitened) space, as those codes keep theirs; the step size is a 0-d float32 tensor as they
  save it, and the normalisation is only in the sidecar.

Array names (npz and safetensors): ``images`` ``(n, C, H, W)`` float32, ``targets``
``(n, D)`` float32, ``lr`` ``()`` float64, ``init_indices`` ``(n,)`` int64,
``normalization.mean`` / ``normalization.std`` ``(C,)`` float64, ``objective.<name>``,
``history.<name>`` and, for a whitened set, ``zca.mean``, ``zca.matrix``, ``zca.inverse``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from ddkd.errors import ConfigError, FileFormatError
from ddkd.interop.published import format_values
from ddkd.io.atomic import atomic_path, write_json
from ddkd.io.synthset import SynthSet, load_synthset
from ddkd.version import __version__

EXPORT_FORMATS = ("npz", "safetensors", "png-folder", "pt")
PT_LAYOUTS = ("mkdt", "mtt", "krr-st")
SIDECAR_FORMAT = "ddkd-synthset-export"
SIDECAR_VERSION = 1

_SPACE = ("images are in the model-input space the set was made in: (pixels - mean) / std per "
          "channel, pixels in [0, 1]; for a whitened set (zca.* present) that space is then "
          "ZCA-whitened: whitened = (x.flatten() - zca.mean) @ zca.matrix")
_TARGETS = {
    "labels": "one-hot class labels (n, K): cross-entropy to them (objective 'labels')",
    "soft-labels": "learned logits (n, K), DATM's soft labels: cross-entropy to softmax(target) "
                   "(objective 'soft-labels')",
}


def target_kind(s: SynthSet) -> str:
    """``representations`` (a KD set), ``class-labels`` or ``soft-labels`` (supervised sets)."""
    return {"labels": "class-labels", "soft-labels": "soft-labels"}.get(s.objective,
                                                                        "representations")


def set_arrays(s: SynthSet) -> dict[str, np.ndarray]:
    """Every array of the set under its plain name, in the dtypes of the ddkd file."""
    arrays = {
        "images": s.images.detach().cpu().numpy().astype(np.float32, copy=False),
        "targets": s.targets.detach().cpu().numpy().astype(np.float32, copy=False),
        "lr": np.asarray(s.lr, dtype=np.float64),
        "init_indices": s.init_indices.cpu().numpy().astype(np.int64, copy=False),
        "normalization.mean": s.mean.cpu().numpy().astype(np.float64, copy=False),
        "normalization.std": s.std.cpu().numpy().astype(np.float64, copy=False),
    }
    for name, tensor in s.objective_state.items():
        arrays[f"objective.{name}"] = tensor.cpu().numpy()
    for name, values in s.history.items():
        arrays[f"history.{name}"] = np.asarray(values, dtype=np.float32)
    if s.zca is not None:
        for name, tensor in s.zca.tensors().items():
            arrays[f"zca.{name}"] = tensor.cpu().numpy().astype(np.float32, copy=False)
    return arrays


def sidecar(s: SynthSet, source: Path, fmt: str, arrays: dict[str, np.ndarray] | None,
            extra: dict | None = None) -> dict:
    """The JSON metadata written beside every export."""
    from ddkd.runtime import sha256_file

    meta = {
        "format": SIDECAR_FORMAT,
        "format_version": SIDECAR_VERSION,
        "export_format": fmt,
        "exported_from": {"path": str(source), "sha256": sha256_file(source)},
        "ddkd_version": __version__,
        "lr": float(s.lr),
        "objective": s.objective,
        "targets": target_kind(s),
        "targets_meaning": _TARGETS.get(s.objective, f"learned target representations (n, D) "
                                        f"of KD objective {s.objective!r}"),
        "num_images": len(s),
        "image_shape": list(s.images.shape[1:]),
        "normalization": {"mean": s.mean.tolist(), "std": s.std.tolist()},
        "space": _SPACE,
        "zca_eps": s.zca.eps if s.zca is not None else None,
        "provenance": s.provenance,
        "config": s.config,
    }
    if arrays is not None:
        meta["arrays"] = {k: {"dtype": str(v.dtype), "shape": list(v.shape)}
                          for k, v in arrays.items()}
    return {**meta, **(extra or {})}


def export_set(set_path: str | Path, fmt: str, out: str | Path, layout: str | None = None,
               overwrite: bool = False) -> dict:
    """Write the set at ``set_path`` as ``fmt`` under ``out``; -> a summary for the CLI."""
    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"--format {fmt!r} is unknown; valid: {', '.join(EXPORT_FORMATS)}")
    if layout is not None and fmt != "pt":
        raise ConfigError(f"--layout is for --format pt (the published codes' .pt trio), not "
                          f"{fmt}")
    if layout is not None and layout not in PT_LAYOUTS:
        raise ConfigError(f"--layout {layout!r} is unknown; valid: {', '.join(PT_LAYOUTS)}")
    source = Path(set_path)
    # A set with predefined views leaves as its (image, view) pairs: the published layouts
    # know no views, and the pairs are exactly what pre-training on the set sees.
    s = load_synthset(source).expanded()
    out = Path(out)
    if fmt in ("npz", "safetensors"):
        data = out if out.suffix == f".{fmt}" else out.with_name(out.name + f".{fmt}")
        meta_path = data.with_suffix(".json")
        _refuse_existing([data, meta_path], overwrite)
        arrays = set_arrays(s)
        meta = sidecar(s, source, fmt, arrays)
        if fmt == "npz":
            with atomic_path(data) as tmp:
                with open(tmp, "wb") as fh:  # a file object: savez would append .npz to a path
                    np.savez(fh, **arrays)
        else:
            from ddkd.interop.safetensors import save_file

            save_file(data, arrays, {"ddkd": json.dumps(meta, sort_keys=True)})
        write_json(meta_path, meta)
        return {"out": str(data), "files": [str(data), str(meta_path)], "lossless": True}
    _refuse_existing([out], overwrite)
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    try:
        if fmt == "png-folder":
            files, meta = _png_folder(s, source, partial)
        else:
            files, meta = _pt_trio(s, source, partial, layout, out)
        write_json(partial / "metadata.json", meta)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(partial, out)  # the folder appears whole or not at all
    finally:
        if partial.exists():
            shutil.rmtree(partial)
    return {"out": str(out), "files": [str(out / f) for f in [*files, "metadata.json"]],
            "lossless": fmt == "pt"}


def _refuse_existing(paths: list[Path], overwrite: bool) -> None:
    for path in paths:
        if not path.exists():
            continue
        if not overwrite:
            raise ConfigError(f"--out: {path} already exists; pass --overwrite to replace it")
        if path.is_dir() and any(path.iterdir()) and not (path / "metadata.json").is_file():
            # --overwrite deletes the folder: only one that ddkd export wrote
            raise ConfigError(f"--overwrite: {path} is a folder that ddkd export did not write "
                              "(no metadata.json); refusing to replace it, choose another --out")


def _png_folder(s: SynthSet, source: Path, folder: Path) -> tuple[list[str], dict]:
    from PIL import Image

    channels = s.images.shape[1]
    if channels not in (1, 3):
        raise ConfigError(f"png-folder: the images have {channels} channels; PNG holds 1 (grey) "
                          "or 3 (RGB): export as npz or safetensors")
    images = s.zca.undo(s.images) if s.zca is not None else s.images
    std = s.std.to(images.dtype).view(1, -1, 1, 1)
    mean = s.mean.to(images.dtype).view(1, -1, 1, 1)
    pixels = images * std + mean  # (n, C, H, W) in [0, 1] where representable
    clipped = float(((pixels < 0) | (pixels > 1)).float().mean())
    quantised = (pixels.clamp(0, 1) * 255).round().to(torch.uint8)
    (folder / "images").mkdir()
    names = []
    for i, image in enumerate(quantised):
        name = f"images/{i:05d}.png"
        array = image.permute(1, 2, 0).numpy()
        Image.fromarray(array[..., 0] if channels == 1 else array,
                        mode="L" if channels == 1 else "RGB").save(folder / name)
        names.append(name)
    np.save(folder / "targets.npy", s.targets.numpy().astype(np.float32))
    files = ["targets.npy"]
    extra: dict = {
        "pixels": ("lossy: pixels = images (un-whitened if zca) * std + mean, clipped to [0, 1] "
                   "and quantised to 8 bits as round(255 * p); the exact set is the .h5 (or "
                   "--format npz / safetensors)"),
        "clipped_fraction": clipped,
        "images": names[:3] + (["..."] if len(names) > 3 else []),
        "targets_file": "targets.npy",
    }
    if s.objective == "labels":
        np.save(folder / "labels.npy", s.targets.argmax(1).numpy().astype(np.int64))
        files.append("labels.npy")
        extra["labels_file"] = "labels.npy (int64 class indices, the argmax of the one-hot rows)"
    return names + files, sidecar(s, source, "png-folder", None, extra)


def _pt_trio(s: SynthSet, source: Path, folder: Path, layout: str | None, out: Path
             ) -> tuple[list[str], dict]:
    supervised = s.objective in ("labels", "soft-labels")
    layout = layout or ("mtt" if supervised else "mkdt")
    images = s.images.detach().cpu().float().contiguous()
    if s.objective == "labels":
        # MTT's labels_best.pt holds int64 class indices; the one-hot rows are exactly these
        labels = s.targets.argmax(1).to(torch.int64)
    else:
        labels = s.targets.detach().cpu().float().contiguous()
    lr = torch.tensor(s.lr, dtype=torch.float32)  # the codes save their step size as float32
    if layout == "mkdt":
        it = int(len(s.history.get("loss", [])) or s.provenance.get("iterations") or 0)
        names = {"images": f"images_{it}.pt", "labels": f"labels_{it}.pt",
                 "lr": f"synlr_{it}.pt"}
    elif layout == "mtt":
        names = {"images": "images_best.pt", "labels": "labels_best.pt", "lr": "lr_best.pt"}
    else:
        names = {"images": "x_syn.pt", "labels": "y_syn.pt"}
    torch.save(images, folder / names["images"])
    torch.save(labels, folder / names["labels"])
    if "lr" in names:
        torch.save(lr, folder / names["lr"])
    fmt = {"mkdt": "mkdt", "mtt": "mtt", "krr-st": "krr-st"}[layout]
    norm = format_values(_norm(s))
    reimport = (f"ddkd import {fmt} {out} --out SET.h5 --normalization {norm}"
                + (f" --lr {s.lr!r}" if "lr" not in names else "")
                if s.zca is None else
                "the .pt files cannot carry this set's ZCA transform: export as npz or "
                "safetensors to keep it")
    extra = {
        "layout": layout,
        "files": names,
        "lr_float32": float(lr),
        "note": ("the .pt files hold tensors only: the normalisation, objective state, "
                 "provenance and history are in this file"),
        "reimport": reimport,
    }
    return list(names.values()), sidecar(s, source, "pt", None, extra)


def _norm(s: SynthSet):
    from ddkd.data.transforms import Normalization

    return Normalization(tuple(s.mean.tolist()), tuple(s.std.tolist()))


def read_plain(path: Path, fmt: str) -> tuple[SynthSet, list[Path]]:
    """Read back an ``npz`` or ``safetensors`` export (with its JSON sidecar) -> (set, files).

    The inverse of :func:`export_set` for the lossless formats: every array and every piece of
    metadata comes back as it was written.
    """
    from ddkd.data.transforms import ZCA

    if path.is_dir():
        raise FileFormatError(f"{path} is a folder; give the .{fmt} file written by ddkd export")
    meta_path = path.with_suffix(".json")
    if not meta_path.is_file():
        raise FileFormatError(f"{path}: its sidecar {meta_path.name} (written by ddkd export) "
                              "is missing; it holds the set's step size, objective and "
                              "normalisation")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise FileFormatError(f"{meta_path} is not JSON ({err})") from None
    if meta.get("format") != SIDECAR_FORMAT or int(meta.get("format_version", -1)) > \
            SIDECAR_VERSION:
        raise FileFormatError(f"{meta_path} is not a ddkd export sidecar (format "
                              f"{meta.get('format')!r} version {meta.get('format_version')})")
    if fmt == "npz":
        try:
            with np.load(path, allow_pickle=False) as npz:  # no pickled objects either
                arrays = {k: npz[k] for k in npz.files}
        except (OSError, ValueError) as err:
            raise FileFormatError(f"{path} is not a readable .npz file ({err})") from None
    else:
        from ddkd.interop.safetensors import load_file

        arrays, _ = load_file(path)
    missing = [k for k in ("images", "targets", "lr", "init_indices", "normalization.mean",
                           "normalization.std") if k not in arrays]
    if missing:
        raise FileFormatError(f"{path} lacks the array {missing[0]!r} of a ddkd export")

    def group(prefix: str) -> dict[str, np.ndarray]:
        return {k[len(prefix) + 1 :]: v for k, v in arrays.items() if k.startswith(prefix + ".")}

    zca = group("zca")
    s = SynthSet(
        images=torch.from_numpy(arrays["images"]),
        targets=torch.from_numpy(arrays["targets"]),
        lr=float(arrays["lr"]),
        mean=torch.from_numpy(arrays["normalization.mean"]),
        std=torch.from_numpy(arrays["normalization.std"]),
        objective=str(meta["objective"]),
        provenance=meta.get("provenance", {}),
        config=meta.get("config", {}),
        init_indices=torch.from_numpy(arrays["init_indices"]),
        objective_state={k: torch.from_numpy(v) for k, v in group("objective").items()},
        history=dict(group("history")),
        zca=ZCA(**{k: torch.from_numpy(zca[k]) for k in ("mean", "matrix", "inverse")},
                eps=float(meta["zca_eps"])) if zca else None,
    )
    return s, [path, meta_path]
