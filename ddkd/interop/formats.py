"""``ddkd import FORMAT PATH... --out SET.h5``: a set written by a published code -> a ddkd set.

Layouts (each read from the code that writes it; docs/interop.md cites the lines):

- ``mkdt`` (``sjoshi804/mkdt-data-distill-ssl``, ``src/mkdt/distill.py``): ``images_{it}.pt``
  ``(n, C, H, W)`` float32, ``labels_{it}.pt`` ``(n, D)`` float32 (the learned target
  representations), ``synlr_{it}.pt`` (0-d float32, the learned step size), for several
  iterations ``it`` in one folder.
- ``krr-st`` (``db-Lee/selfsup_dd``, ``train.py`` through ``utils.Logger``): ``x_syn.pt``
  ``(n, C, H, W)``, ``y_syn.pt`` ``(n, D)`` float32 (representations); MKDT's ``eval.py`` reads
  them as ``x_syn_final.pt`` / ``y_syn_final.pt``. KRR-ST's shared baseline sets (``dm``,
  ``mtt``...) hold ``(n,)`` class labels in ``y_syn.pt`` instead. No step size is written.
- ``mtt`` / ``datm`` (``GeorgeCazenavette/mtt-distillation``, ``distill.py``;
  ``NUS-HPC-AI-Lab/DATM``, ``distill/DATM.py``): ``images_best.pt`` (or ``images_{it}.pt``),
  ``labels_best.pt`` (MTT: ``(n,)`` int64 class labels; DATM: ``(n, K)`` float32 learned
  logits), ``lr_best.pt`` (DATM only: MTT's ``distill.py`` never saves its learned step size).
- ``npz`` / ``safetensors``: what ``ddkd export`` writes (the set and its sidecar), read back
  exactly.

What we decided where the layouts say nothing:

- Supervised sets keep their labels: hard labels become one-hot rows with objective
  ``labels``, DATM's logits stay logits with objective ``soft-labels`` (ddkd.objectives.labels);
  ``ddkd evaluate`` pre-trains on them by cross-entropy.
- A missing step size where the format has one (``mkdt``'s ``synlr_{it}.pt``, ``mtt``'s
  ``lr_best.pt``) is refused unless ``--lr`` gives it; ``krr-st`` has none, so it takes
  KRR-ST's own pre-training rate (``--pre_lr``, 0.1) unless ``--lr`` says otherwise.
- The normalisation is the code's per-dataset values for ``--dataset`` (ddkd.interop.published)
  unless ``--normalization`` gives it; ``--zca`` (a set made with the codes' ``--zca``) refits
  their whitening (kornia ``ZCAWhitening``, eps 0.1, on [0, 1] pixels of the training split).
- ``init_indices`` are not recorded by any of these codes: they are stored as -1.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ddkd.config import DATASET_NAMES, is_dataset_name
from ddkd.errors import ConfigError, FileFormatError
from ddkd.interop import published
from ddkd.interop.torchfiles import load_tensor
from ddkd.io.synthset import SynthSet, save_synthset

log = logging.getLogger(__name__)

SET_FORMATS = ("mkdt", "krr-st", "mtt", "datm", "npz", "safetensors")

_REPO = {
    "mkdt": "sjoshi804/mkdt-data-distill-ssl (src/mkdt/distill.py)",
    "krr-st": "db-Lee/selfsup_dd (train.py)",
    "mtt": "GeorgeCazenavette/mtt-distillation (distill.py)",
    "datm": "NUS-HPC-AI-Lab/DATM (distill/DATM.py)",
}


@dataclass(frozen=True)
class Layout:
    """The file names of one published layout: a regular expression per role, whose one
    group is the tag (an iteration, ``best`` or ``final``) that ties a trio together."""

    name: str
    images: str
    targets: str
    lr: str | None
    shown: str  # the layout as users read it

    def role(self, filename: str) -> tuple[str, str] | None:
        for role, pattern in (("images", self.images), ("targets", self.targets),
                              ("lr", self.lr)):
            if pattern is not None:
                match = re.fullmatch(pattern, filename)
                if match:
                    return role, match.group(1)
        return None


LAYOUTS = {
    "mkdt": Layout("mkdt", r"images_(\d+)\.pt", r"labels_(\d+)\.pt", r"synlr_(\d+)\.pt",
                   "images_{it}.pt, labels_{it}.pt, synlr_{it}.pt"),
    "krr-st": Layout("krr-st", r"x_syn(|_final)\.pt", r"y_syn(|_final)\.pt", None,
                     "x_syn.pt, y_syn.pt (or x_syn_final.pt, y_syn_final.pt)"),
    "mtt": Layout("mtt", r"images_(best|\d+)\.pt", r"labels_(best|\d+)\.pt",
                  r"lr_(best|\d+)\.pt", "images_best.pt, labels_best.pt, lr_best.pt"),
}
LAYOUTS["datm"] = LAYOUTS["mtt"]


def _other_layouts(fmt: str, names: list[str]) -> list[str]:
    """The formats (other than ``fmt``) whose images and targets files are among ``names``."""
    found = []
    for other, layout in LAYOUTS.items():
        if other in (fmt, "datm") or (fmt == "datm" and other == "mtt"):
            continue
        roles = {r[0] for r in (layout.role(n) for n in names) if r is not None}
        if {"images", "targets"} <= roles:
            found.append(other)
    if fmt != "mkdt" and any(re.fullmatch(r"synlr_\d+\.pt", n) for n in names):
        found = ["mkdt"] + [f for f in found if f != "mkdt"]
    return found


def resolve_files(fmt: str, paths: list[Path], iteration: str | None
                  ) -> tuple[dict[str, Path], str, list[str]]:
    """PATHs (folders holding the files, or the files themselves) -> ({role: file}, the tag
    chosen, every tag with a complete set)."""
    found, seen = _files_by_tag(fmt, paths)
    complete = sorted((t for t, roles in found.items() if {"images", "targets"} <= set(roles)),
                      key=_tag_order)
    where = ", ".join(str(p) for p in paths)
    tag = _chosen_tag(fmt, complete, iteration, where, seen)
    if "lr" not in found[tag] and fmt != "krr-st":
        # MKDT and MTT both save images_{it}.pt / labels_{it}.pt: the step size's name tells
        # the two layouts apart
        theirs = {"mkdt": (f"lr_{tag}.pt", "mtt"), "mtt": (f"synlr_{tag}.pt", "mkdt"),
                  "datm": (f"synlr_{tag}.pt", "mkdt")}[fmt]
        if theirs[0] in seen:
            raise FileFormatError(f"{where}: {theirs[0]} beside images_{tag}.pt is the step size "
                                  f"of the {theirs[1]} layout, not {fmt}'s: use `ddkd import "
                                  f"{theirs[1]}`")
    return found[tag], tag, complete


def _files_by_tag(fmt: str, paths: list[Path]
                  ) -> tuple[dict[str, dict[str, Path]], list[str]]:
    """``({tag: {role: file}}, every file name seen)`` of the layout ``fmt`` in PATHs."""
    layout = LAYOUTS[fmt]
    found: dict[str, dict[str, Path]] = {}
    seen: list[str] = []
    for path in paths:
        if path.is_dir():
            candidates, named = sorted(path.glob("*.pt")), False
        elif path.is_file():
            candidates, named = [path], True
        else:
            raise FileFormatError(f"{path} does not exist")
        for file in candidates:
            seen.append(file.name)
            role = layout.role(file.name)
            if role is None:
                if named:
                    others = _other_layouts(fmt, [file.name] + [p.name for p in paths])
                    hint = (f"; it is named like the {others[0]} layout: use `ddkd import "
                            f"{others[0]}`" if others else "")
                    raise FileFormatError(f"{file} is not a file of the {fmt} layout "
                                          f"({layout.shown}){hint}")
                continue
            kind, tag = role
            previous = found.setdefault(tag, {}).get(kind)
            if previous is not None and previous.resolve() != file.resolve():
                raise FileFormatError(f"two {kind} files for the same set: {previous} and {file}")
            found[tag][kind] = file
    return found, seen


def _chosen_tag(fmt: str, complete: list[str], iteration: str | None, where: str,
                seen: list[str]) -> str:
    """The set to import among the ``complete`` ones: ``--iteration``'s, or the published
    codes' preferred one (MTT/DATM's best, otherwise the last iteration)."""
    if iteration is not None:
        tag = "" if (fmt == "krr-st" and iteration in ("", "none")) else str(iteration)
        if tag not in complete:
            have = ", ".join(t or "(no suffix)" for t in complete) or "none"
            raise FileFormatError(f"{where}: no complete {fmt} set for --iteration {iteration} "
                                  f"(images and targets of: {have})")
        return tag
    if not complete:
        others = _other_layouts(fmt, seen)
        hint = (f"; they are files of the {others[0]} layout: use `ddkd import {others[0]}`"
                if others else "")
        listing = (", ".join(seen[:6]) + (", ..." if len(seen) > 6 else "")
                   if seen else "no .pt files")
        raise FileFormatError(f"{where} holds no {fmt} set ({LAYOUTS[fmt].shown}): found "
                              f"{listing}{hint}")
    if fmt == "krr-st" and len(complete) > 1:
        raise FileFormatError(f"{where} holds both x_syn.pt/y_syn.pt and x_syn_final.pt/"
                              "y_syn_final.pt: name the two files to import, or pass "
                              "--iteration final (or --iteration none)")
    return "best" if "best" in complete else complete[-1]


def _tag_order(tag: str) -> tuple[int, int]:
    return (1, 0) if tag in ("best", "final") else (0, int(tag) if tag.isdigit() else -1)


@dataclass
class Targets:
    values: torch.Tensor  # (n, D) float32 as stored in the set
    objective: str  # mse | labels | soft-labels
    kind: str  # representations | class-labels | soft-labels
    num_classes: int | None = None


def read_targets(fmt: str, path: Path, raw: torch.Tensor, n: int, dataset: str | None
                 ) -> Targets:
    """The layout's targets tensor -> what the ddkd set stores, with the meaning checked."""
    name = path.name
    if raw.ndim == 2 and raw.is_floating_point():
        if raw.shape[0] != n:
            raise FileFormatError(f"{name} holds {raw.shape[0]} targets but the images file "
                                  f"{n} images: they are not one set")
        if fmt in ("mtt", "datm"):
            # DATM's learned soft labels: logits, trained against softmax(target)
            return Targets(raw.float(), "soft-labels", "soft-labels", raw.shape[1])
        return Targets(raw.float(), "mse", "representations")
    integral = raw.ndim == 1 and (not raw.is_floating_point()
                                  or bool((raw == raw.round()).all()))
    if integral and raw.dtype != torch.bool:
        if fmt == "mkdt":
            raise FileFormatError(f"{name} holds {tuple(raw.shape)} class labels, but MKDT's "
                                  "labels_{it}.pt are (n, D) learned representations: for a "
                                  "set of class labels use `ddkd import mtt`")
        if raw.shape[0] != n:
            raise FileFormatError(f"{name} holds {raw.shape[0]} labels but the images file {n} "
                                  "images: they are not one set")
        labels = raw.long()
        if n and int(labels.min()) < 0:
            raise FileFormatError(f"{name} holds negative class labels ({int(labels.min())})")
        k = max(int(labels.max()) + 1 if n else 1, published.NUM_CLASSES.get(
            (dataset or "").removesuffix("-samples"), 0))
        onehot = torch.nn.functional.one_hot(labels, k).float()
        return Targets(onehot, "labels", "class-labels", k)
    expected = ("(n,) class labels or (n, K) soft labels" if fmt in ("mtt", "datm") else
                "(n, D) float representations" if fmt == "mkdt" else
                "(n, D) float representations or (n,) class labels")
    raise FileFormatError(f"{name} holds a {raw.ndim}-d {str(raw.dtype).removeprefix('torch.')} "
                          f"tensor {tuple(raw.shape)}; the {fmt} layout has {expected} there")


def read_lr(fmt: str, files: dict[str, Path], lr: float | None, tag: str
            ) -> tuple[float, str]:
    """The step size and where it came from (a file, ``--lr``, or KRR-ST's stated default)."""
    if "lr" in files:
        raw = load_tensor(files["lr"], "a learned step size")
        if raw.numel() != 1 or raw.dtype.is_complex or raw.dtype == torch.bool:
            raise FileFormatError(f"{files['lr'].name} holds a {str(raw.dtype)[6:]} tensor "
                                  f"{tuple(raw.shape)}; the learned step size is one number")
        value = float(raw.reshape(()))
        if lr is not None:
            return lr, f"--lr (replacing {files['lr'].name}: {value!r})"
        if not (value > 0 and math.isfinite(value)):
            raise FileFormatError(f"{files['lr'].name} holds the step size {value}; it must be "
                                  "a positive number (pass --lr to give another)")
        return value, files["lr"].name
    if lr is not None:
        return lr, "--lr"
    if fmt == "krr-st":
        return published.KRR_ST_PRE_LR, ("KRR-ST's pre-training rate --pre_lr default 0.1 "
                                         "(db-Lee/selfsup_dd, train.py): the layout has no "
                                         "learned step size")
    if fmt == "mkdt":
        raise FileFormatError(
            f"no synlr_{tag}.pt beside images_{tag}.pt: MKDT's distill.py writes the learned "
            "step size there; pass --lr VALUE (MKDT's eval.py would fall back to its --pre_lr "
            "0.1)")
    raise FileFormatError(
        f"no lr_{tag}.pt beside images_{tag}.pt: DATM writes its learned step size there, MTT's "
        "distill.py never saves it (it logs Synthetic_LR to wandb): pass --lr VALUE")


def import_set(fmt: str, paths: list[str | Path], out: str | Path, dataset: str | None = None,
               normalization: str | None = None, lr: float | None = None, zca: bool = False,
               data_root: str | None = None, iteration: str | None = None,
               overwrite: bool = False, command: list[str] | None = None) -> dict:
    """Import a set written by a published code (or a ddkd export) into the ddkd set ``out``.

    Every check runs before anything is written; ``out`` is written atomically.

    Returns:
        a summary dict for the CLI (``out``, ``images``, ``targets``, ``lr``, sources).
    """
    if fmt not in SET_FORMATS:
        raise ConfigError(f"import format {fmt!r} is unknown; valid: {', '.join(SET_FORMATS)}, "
                          "replay-buffer")
    out = Path(out)
    if out.exists() and not overwrite:
        raise ConfigError(f"--out {out} already exists; pass --overwrite to replace it")
    if lr is not None and not (lr > 0 and math.isfinite(lr)):
        raise ConfigError(f"--lr must be a positive number, got {lr}")
    if dataset is not None and not is_dataset_name(dataset):
        raise ConfigError(f"--dataset {dataset!r} is unknown; valid: "
                          f"{', '.join(DATASET_NAMES)}")
    files_in = [Path(p) for p in paths]
    if fmt in ("npz", "safetensors"):
        synth, files = _read_export(fmt, files_in, dataset, normalization, lr, zca, iteration)
        provenance = {**synth.provenance, "read_from": _files_record(fmt, files)}
        synth.provenance = provenance
        save_synthset(out, synth)
        return _summary(out, synth, {"lr": "the export", "normalization": "the export"})

    files, tag, tags = resolve_files(fmt, files_in, iteration)
    images = _read_images(fmt, files["images"])
    n, c, h, w = images.shape
    targets = read_targets(fmt, files["targets"], load_tensor(files["targets"], "targets"), n,
                           dataset)
    if not bool(torch.isfinite(targets.values).all()):
        raise FileFormatError(f"{files['targets'].name} holds NaN or infinite values")
    step, lr_source = read_lr(fmt, files, lr, tag)
    code = published.CODE_OF_FORMAT[fmt]
    if zca:
        if normalization not in (None, "none"):
            raise ConfigError("--zca: the published codes whiten raw [0, 1] pixels (no "
                              "per-channel normalisation first): drop --normalization")
        normalization = "none"
    norm, norm_source = published.resolve_normalization(normalization, code, dataset, h, c)
    whitening = _fit_zca(dataset, data_root, (c, h, w)) if zca else None
    provenance = _provenance(fmt, files, tag, targets, lr_source, norm_source, zca, dataset,
                             h, command)
    synth = SynthSet(
        images=images, targets=targets.values, lr=step,
        mean=torch.tensor(norm.mean, dtype=torch.float64),
        std=torch.tensor(norm.std, dtype=torch.float64),
        objective=targets.objective, provenance=provenance,
        config={"import": {"format": fmt, "dataset": dataset, "normalization": normalization,
                           "lr": lr, "zca": zca, "iteration": iteration}},
        init_indices=torch.full((n,), -1, dtype=torch.int64),
        zca=whitening,
    )
    save_synthset(out, synth)
    return _summary(out, synth, {"lr": lr_source, "normalization": norm_source,
                                 "targets": targets.kind, "iteration": tag,
                                 "iterations": tags})


def _read_images(fmt: str, path: Path) -> torch.Tensor:
    """The ``(n, C, H, W)`` float32 images of a published set's file, checked."""
    images = load_tensor(path, f"the images of a {fmt} set")
    if images.ndim != 4 or not images.is_floating_point():
        raise FileFormatError(f"{path.name} holds a {images.ndim}-d "
                              f"{str(images.dtype).removeprefix('torch.')} tensor "
                              f"{tuple(images.shape)}; the {fmt} layout has (n, C, H, W) float "
                              "images there")
    images = images.float().contiguous()
    if not bool(torch.isfinite(images).all()):
        raise FileFormatError(f"{path.name} holds NaN or infinite pixels")
    return images


def _provenance(fmt: str, files: dict[str, Path], tag: str, targets, lr_source: str,
                norm_source: str, zca: bool, dataset: str | None, h: int,
                command: list[str] | None) -> dict:
    """What an imported set records of where it comes from."""
    return {
        "imported": {
            **_files_record(fmt, list(files.values()), roles=files),
            "code": _REPO[fmt],
            "iteration": tag,
            "targets": targets.kind,
            "lr_source": lr_source,
            "normalization_source": norm_source,
            "zca": ("refitted: kornia ZCAWhitening(eps=0.1) on the [0, 1] training pixels of "
                    f"{dataset}" if zca else None),
        },
        "source_dataset": dataset,
        "source_num_classes": targets.num_classes,
        "init": "unknown (imported)",
        "iterations": int(tag) if tag.isdigit() else None,
        # the codes' ConvNet (width 128, instance norm), of their depth at this resolution:
        # ddkd evaluate builds its encoder from this, as for a set ddkd distilled
        "student": {"depth": published.student_depth(h), "width": 128, "norm": "instancenorm"},
        "environment": _environment(command),
    }


def _read_export(fmt: str, paths: list[Path], dataset, normalization, lr, zca, iteration):
    from ddkd.interop.export import read_plain

    given = [name for name, value in (("--dataset", dataset), ("--normalization", normalization),
                                      ("--lr", lr), ("--zca", zca or None),
                                      ("--iteration", iteration)) if value is not None]
    if given:
        raise ConfigError(f"{', '.join(given)}: a ddkd {fmt} export carries its own metadata; "
                          "import it without these options")
    if len(paths) != 1:
        raise ConfigError(f"import {fmt}: give the one .{fmt} file written by ddkd export")
    return read_plain(paths[0], fmt)


def _fit_zca(dataset: str | None, data_root: str | None, shape: tuple[int, int, int]):
    from ddkd.data.datasets import load_dataset
    from ddkd.data.transforms import ZCA

    if dataset is None:
        raise ConfigError("--zca refits the whitening on the training split of --dataset: give "
                          "--dataset (and --data-root)")
    train = load_dataset(dataset, "train", data_root)
    if tuple(train.shape) != shape:
        raise ConfigError(f"--zca: {dataset}'s training images are {tuple(train.shape)}, the "
                          f"set's {shape}")
    log.info("fitting the ZCA whitening on %d training images of %s", len(train), dataset)
    # MTT/MKDT whiten ToTensor() pixels, i.e. [0, 1] with no per-channel normalisation
    return ZCA.fit(train.images.float() / 255.0, eps=0.1)


def _files_record(fmt: str, files: list[Path], roles: dict[str, Path] | None = None) -> dict:
    from ddkd.runtime import sha256_file

    names = {str(p): role for role, p in (roles or {}).items()}
    return {"format": fmt,
            "files": [{"path": str(p.resolve()), "sha256": sha256_file(p),
                       **({"role": names[str(p)]} if str(p) in names else {})} for p in files]}


def _environment(command: list[str] | None) -> dict:
    from ddkd.runtime import environment_record

    return {**environment_record(None), "command": command}


def _summary(out: Path, synth: SynthSet, sources: dict) -> dict:
    return {"out": str(out), "images": tuple(synth.images.shape),
            "targets": tuple(synth.targets.shape), "objective": synth.objective,
            "lr": synth.lr, "mean": synth.mean.tolist(), "std": synth.std.tolist(),
            "zca": synth.zca is not None, "sources": sources}
