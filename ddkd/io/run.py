"""The run directory written by ``ddkd teach`` and read by the later stages.

Layout::

    RUN/
      config.json         {"stage": "teach", "config": resolved TeachConfig}
      environment.json    library versions, git revision, command line, input checksums
      teacher.h5          the teacher (ddkd weights file: state, architecture, normalisation)
      targets.h5          /targets (N, D) float32, /indices (N,) into the train split
      experts.h5          the trajectories (see ddkd.io.experts)
      metrics.jsonl       one JSON line per epoch of every phase
      summary.json        written last: its presence means the run is complete
      checkpoints/        resumable state of unfinished phases (removed when done)
      experts.partial/    finished experts of an unfinished run (removed when assembled)
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from ddkd.config import TeachConfig, build_config
from ddkd.data.transforms import ZCA, Normalization
from ddkd.errors import ConfigError, FileFormatError
from ddkd.io.atomic import atomic_path, remove_stale_temps, write_json
from ddkd.objectives import Objective, restore_objective

TARGETS_FORMAT = "ddkd-targets"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def environment(self) -> Path:
        return self.root / "environment.json"

    @property
    def teacher(self) -> Path:
        return self.root / "teacher.h5"

    @property
    def targets(self) -> Path:
        return self.root / "targets.h5"

    @property
    def experts(self) -> Path:
        return self.root / "experts.h5"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def expert_shards(self) -> Path:
        return self.root / "experts.partial"

    def is_complete(self) -> bool:
        return self.summary.is_file()


def prepare_run_dir(root: str | Path, config_dict: dict, resume: bool, overwrite: bool,
                    complete: Callable[[dict], dict] | None = None) -> RunDir:
    """Create ``root`` for a new run, or check it for ``--resume``.

    A new run refuses an existing non-empty directory unless ``overwrite`` (which deletes it,
    but only if it is a ddkd run directory). ``--resume`` requires the same configuration.
    ``complete`` fills in the settings that an older ddkd did not record with their defaults,
    so that a run started before a setting existed resumes when that setting is left at its
    default (config.json is then rewritten with the complete configuration).
    """
    run = RunDir(Path(root))
    if run.root.exists() and not run.root.is_dir():
        raise ConfigError(f"--out {run.root} is a file, not a directory")
    record = {"stage": "teach", "config": config_dict}
    exists = run.root.exists() and any(run.root.iterdir())
    if resume:
        if not run.config.is_file():
            raise ConfigError(
                f"--resume: {run.root} holds no ddkd run (no config.json); drop --resume to "
                "start a new run there"
            )
        previous = read_teach_record(run.config, "--resume")
        if previous != record and complete is not None:
            try:
                upgraded = {**previous, "config": complete(previous["config"])}
            except ConfigError as err:
                raise ConfigError(f"--resume: {run.config} does not describe a run this "
                                  f"version of ddkd can continue ({err})") from err
            if upgraded == record:
                write_json(run.config, record)
                previous = record
        if previous != record:
            diffs = config_diff(previous["config"], config_dict) or [
                f"its record has other top-level entries {sorted(previous)}"]
            raise ConfigError(
                f"--resume: the configuration differs from the run in {run.root} "
                f"({'; '.join(diffs[:5])}); resume with the same options or use a new --out"
            )
        _remove_stale_temps(run)
        return run
    if exists:
        if not overwrite:
            raise ConfigError(
                f"--out {run.root} already exists; pass --resume to continue it or --overwrite "
                "to replace it"
            )
        if not run.config.is_file():
            raise ConfigError(
                f"--overwrite: {run.root} is not a ddkd run directory (no config.json); "
                "refusing to delete it, choose another --out"
            )
        shutil.rmtree(run.root)
    run.root.mkdir(parents=True, exist_ok=True)
    write_json(run.config, record)
    return run


def _remove_stale_temps(run: RunDir) -> None:
    """A resumed run is the only writer of its directory: the temporary files of writes that
    were killed are its own leftovers."""
    removed = [p for folder in (run.root, run.checkpoints, run.expert_shards)
               for p in remove_stale_temps(folder)]
    if removed:
        log.info("removed %d temporary files of interrupted writes in %s", len(removed),
                 run.root)


def config_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """``"key: run has A, now B"`` for every setting that differs (nested keys dotted)."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: run has {a!r}, now {b!r}")
    return out


def read_json_object(path: Path, flag: str) -> dict:
    """A JSON file that must hold an object; damage is reported as a ConfigError naming it."""
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{flag}: {path} is damaged ({err}); it must be the JSON object "
                          "ddkd wrote there") from err
    if not isinstance(value, dict):
        raise ConfigError(f"{flag}: {path} holds JSON {type(value).__name__}, not the JSON "
                          "object ddkd writes there")
    return value


def read_teach_record(path: Path, flag: str) -> dict:
    """A run's config.json: ``{"stage": "teach", "config": {...}}``."""
    record = read_json_object(path, flag)
    if record.get("stage") != "teach":
        raise ConfigError(f"{flag}: {path} is not the record of a ddkd teach run (stage "
                          f"{record.get('stage')!r}, expected 'teach')")
    if not isinstance(record.get("config"), dict):
        raise ConfigError(f"{flag}: {path} lacks the teach configuration (its 'config' entry "
                          f"is {record.get('config')!r}, expected a JSON object)")
    return record


def read_environment(path: Path, flag: str) -> dict:
    """A run's environment.json; the later stages rely on ``inputs.train_checksum``."""
    env = read_json_object(path, flag)
    inputs = env.get("inputs")
    if not isinstance(inputs, dict) or not isinstance(inputs.get("train_checksum"), str):
        raise ConfigError(f"{flag}: {path} lacks inputs.train_checksum (the checksum of the "
                          "run's training images); it is damaged: make the run again with "
                          "`ddkd teach --overwrite`")
    return env


def save_targets(path: Path, targets: torch.Tensor, indices: torch.Tensor, meta: dict,
                 zca: dict[str, torch.Tensor] | None = None, objective: str = "mse",
                 objective_state: dict[str, torch.Tensor] | None = None) -> None:
    """Atomically write the ``(N, D)`` teacher features (``/targets``: the raw representations,
    whatever the objective), the train-split indices they cover, the KD objective's name and
    fitted state (group ``/objective``; its ``targets`` map the features into the objective's
    target space) and, when the experts train on whitened images, the ZCA transform
    (group ``/zca``)."""
    nbytes = targets.numel() * 4 + indices.numel() * 8 + sum(
        t.numel() * t.element_size() for t in (objective_state or {}).values())
    with atomic_path(path, expected_bytes=nbytes) as tmp:  # HDF5 on a full disk: see atomic
        with h5py.File(tmp, "w") as fh:
            fh.attrs["format"] = TARGETS_FORMAT
            fh.attrs["format_version"] = 1
            fh.attrs["meta"] = json.dumps(meta, sort_keys=True)
            fh.create_dataset("targets", data=targets.numpy().astype(np.float32))
            fh.create_dataset("indices", data=indices.numpy().astype(np.int64))
            group = fh.create_group("objective")
            group.attrs["name"] = objective
            for name, tensor in (objective_state or {}).items():
                group.create_dataset(name, data=tensor.numpy())
            if zca is not None:
                group = fh.create_group("zca")
                for name, tensor in zca.items():
                    group.create_dataset(name, data=tensor.numpy())


def load_objective_state(path: Path) -> tuple[str, dict[str, torch.Tensor]]:
    """The KD objective's name and fitted state stored with the targets (``mse`` and no state
    for files written before objectives existed)."""
    with h5py.File(path, "r") as fh:
        if "objective" not in fh:
            return "mse", {}
        group = fh["objective"]
        state = {k: torch.from_numpy(np.asarray(v[()])) for k, v in group.items()}
        return str(group.attrs["name"]), state


def load_zca(path: Path) -> dict[str, torch.Tensor] | None:
    """The ZCA tensors stored with the targets, or None when the run does not whiten."""
    with h5py.File(path, "r") as fh:
        if "zca" not in fh:
            return None
        return {name: torch.from_numpy(ds[()]) for name, ds in fh["zca"].items()}


def load_targets(path: Path) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """-> ``(targets (N, D) float32, indices (N,) int64, meta)``."""
    try:
        with h5py.File(path, "r") as fh:
            if fh.attrs.get("format") != TARGETS_FORMAT:
                raise FileFormatError(f"{path} is not a ddkd targets file")
            targets = torch.from_numpy(fh["targets"][()])
            indices = torch.from_numpy(fh["indices"][()])
            meta = json.loads(fh.attrs["meta"])
    except OSError as err:
        raise FileFormatError(f"{path} is not a readable HDF5 file: {err}") from err
    if targets.shape[0] != indices.shape[0]:
        raise FileFormatError(f"{path}: {targets.shape[0]} targets but {indices.shape[0]} indices")
    return targets, indices, meta


@dataclass
class OpenedRun:
    """A complete ``ddkd teach`` run, loaded for the later stages, with the objects each of
    them needs built once, here: the input space (normalisation, ZCA) and the fitted objective.
    """

    run: RunDir
    config: TeachConfig  # the run's configuration, validated as the command line's
    teach_config: dict  # as written in config.json (recorded as is in a set's provenance)
    environment: dict
    images: torch.Tensor  # (N, C, H, W) uint8: the run's training images
    labels: torch.Tensor  # (N,) (evaluation only)
    num_classes: int
    indices: torch.Tensor  # (N,) into the dataset's training split
    targets: torch.Tensor  # (N, D) float32: the teacher's raw features
    normalization: Normalization  # the teacher's (and the experts') input normalisation
    zca: ZCA | None  # the experts' whitening (data.zca); None without
    objective: Objective  # the experts' KD objective, fitted (on the CPU)

    @property
    def dataset(self) -> str:
        return self.config.data.dataset


def open_run(root: str | Path) -> OpenedRun:
    """Check that ``root`` is a complete teach run and load its data, targets and objective."""
    from ddkd.data.datasets import load_dataset

    run = RunDir(Path(root))
    _check_complete(run)
    flag = f"--run {run.root}"
    record = read_teach_record(run.config, flag)
    env = read_environment(run.environment, flag)
    try:  # the same rules as the command line's (types, ranges, known keys)
        teach = build_config(TeachConfig, record["config"])
    except ConfigError as err:
        raise ConfigError(f"{flag}: {run.config} holds an invalid teach configuration: "
                          f"{err}") from err
    targets, indices, meta = load_targets(run.targets)
    data = teach.data
    train = load_dataset(data.dataset, "train", data.data_root).subset(indices)
    if train.checksum() != env["inputs"]["train_checksum"]:
        raise ConfigError(f"the training images of {data.dataset} differ from those the run "
                          f"{run.root} was made from (checksum mismatch): the dataset changed")
    norm = meta["normalization"]
    zca = load_zca(run.targets)
    name, state = load_objective_state(run.targets)
    return OpenedRun(
        run, teach, record["config"], env, train.images, train.labels, train.num_classes,
        indices, targets,
        normalization=Normalization(tuple(norm["mean"]), tuple(norm["std"])),
        zca=ZCA(**zca, eps=data.zca_eps) if zca is not None else None,
        objective=restore_objective(name, state, targets.shape[1]),
    )


def _check_complete(run: RunDir) -> None:
    if run.root.exists() and not run.root.is_dir():
        raise ConfigError(f"--run {run.root} is a file; give the run directory that `ddkd "
                          "teach --out DIR` wrote")
    if not run.root.is_dir():
        raise ConfigError(f"--run {run.root} does not exist; create it with `ddkd teach --out "
                          f"{run.root}`")
    missing = [p.name for p in (run.config, run.environment, run.teacher, run.targets,
                                run.experts, run.summary) if not p.is_file()]
    if missing == ["experts.h5"] and run.summary.is_file():
        raise ConfigError(f"--run {run.root} recorded no experts (experts.num_experts = 0, e.g. "
                          "a teacher-only run): make a run with experts to distil from")
    if missing:
        raise ConfigError(f"--run {run.root} is incomplete (missing {', '.join(missing)}); "
                          "finish it with `ddkd teach --out DIR --resume`")
