"""The experts file: every KD student's parameter trajectory, in HDF5.

Format ``ddkd-experts``, version 1 (readable with h5py alone)::

    /                   attrs: format, format_version, num_experts, epochs, n_params, dtype,
                               student (JSON: ConvNetConfig), param_spec (JSON: names, shapes),
                               experts_config (JSON), objective, seed, ddkd_version
    /experts/<k:04d>    (epochs + 1, n_params) snapshots of expert k: row 0 is the
                        initialisation, row e the parameters after epoch e. Chunked one row per
                        chunk, so reading snapshot e of expert k reads only that row.
                        attrs: seed (the run's seed; expert k's init and data order come from
                        the sub-streams (seed, k)), losses (per-epoch mean KD loss)

The on-disk dtype is float32 by default: trajectory matching starts from and aims at these
snapshots and divides by ||theta_t - theta_{t+M}||^2, a difference between nearby snapshots; in
float16 (11-bit mantissa) that difference would carry relative errors of ~1e-3 of the weights
themselves, comparable to one epoch's movement late in training. float16 is offered
(``experts.dtype = "float16"``) to halve storage where that is acceptable; reading always
returns float32.

During a run each expert is written as its own small file under ``experts.partial/`` (atomic),
so that a killed run loses at most the expert in progress; :func:`assemble_experts` writes the
final file atomically and removes the shards.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from ddkd.errors import FileFormatError
from ddkd.io.atomic import atomic_path
from ddkd.models.functional import ParamSpec
from ddkd.version import __version__

FORMAT = "ddkd-experts"
VERSION = 1


@dataclass
class ExpertsHeader:
    """What an experts file says about itself (everything but the snapshots)."""

    num_experts: int
    epochs: int
    n_params: int
    dtype: str
    student: dict
    param_spec: ParamSpec
    experts_config: dict
    objective: str
    seed: int


def write_expert_shard(
    path: Path, trajectory: torch.Tensor, losses: list[float], seed: int, dtype: str
) -> None:
    """Atomically write one expert's ``(epochs + 1, P)`` trajectory as a shard file."""
    nbytes = trajectory.numel() * np.dtype(dtype).itemsize
    with atomic_path(path, expected_bytes=nbytes) as tmp:
        with h5py.File(tmp, "w") as fh:
            fh.attrs["format"] = FORMAT + "-shard"
            fh.create_dataset("trajectory", data=trajectory.cpu().numpy().astype(dtype))
            fh.attrs["losses"] = np.asarray(losses, dtype=np.float64)
            fh.attrs["seed"] = seed


def read_expert_shard(path: Path) -> tuple[np.ndarray, np.ndarray, int]:
    with h5py.File(path, "r") as fh:
        if fh.attrs.get("format") != FORMAT + "-shard":
            raise FileFormatError(f"{path} is not a ddkd expert shard")
        return fh["trajectory"][()], np.asarray(fh.attrs["losses"]), int(fh.attrs["seed"])


def assemble_experts(path: Path, shard_dir: Path, header: ExpertsHeader) -> None:
    """Write the experts file from ``shard_dir/expert_<k>.h5`` shards, then drop the shards.

    The free space is checked first (the file is about the shards' size): HDF5 written onto a
    full disk crashes the interpreter instead of raising (see ddkd.io.atomic)."""
    nbytes = sum(p.stat().st_size for p in shard_dir.glob("expert_*.h5"))
    with atomic_path(path, expected_bytes=nbytes) as tmp:
        with h5py.File(tmp, "w") as fh:
            fh.attrs["format"] = FORMAT
            fh.attrs["format_version"] = VERSION
            fh.attrs["num_experts"] = header.num_experts
            fh.attrs["epochs"] = header.epochs
            fh.attrs["n_params"] = header.n_params
            fh.attrs["dtype"] = header.dtype
            fh.attrs["student"] = json.dumps(header.student, sort_keys=True)
            fh.attrs["param_spec"] = json.dumps(header.param_spec.to_json())
            fh.attrs["experts_config"] = json.dumps(header.experts_config, sort_keys=True)
            fh.attrs["objective"] = header.objective
            fh.attrs["seed"] = header.seed
            fh.attrs["ddkd_version"] = __version__
            group = fh.create_group("experts")
            for k in range(header.num_experts):
                trajectory, losses, seed = read_expert_shard(shard_dir / f"expert_{k:04d}.h5")
                ds = group.create_dataset(
                    f"{k:04d}", data=trajectory, chunks=(1, trajectory.shape[1])
                )
                ds.attrs["losses"] = losses
                ds.attrs["seed"] = seed
    shutil.rmtree(shard_dir)


class ExpertsFile:
    """Read-only access to an experts file; snapshots are read by slicing, on demand.

    Example:
        >>> with ExpertsFile("run/experts.h5") as experts:          # doctest: +SKIP
        ...     theta_start = experts.snapshot(k=3, epoch=1)         # (P,) float32
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileFormatError(f"experts file {self.path} does not exist")
        try:
            self._fh = h5py.File(self.path, "r")
        except OSError as err:
            raise FileFormatError(f"{self.path} is not a readable HDF5 file: {err}") from err
        try:
            self.header = self._read_header()
        except Exception:
            self._fh.close()
            raise

    def _read_header(self) -> ExpertsHeader:
        attrs = self._fh.attrs
        if attrs.get("format") != FORMAT:
            raise FileFormatError(
                f"{self.path} is not a ddkd experts file (format {attrs.get('format')!r})"
            )
        version = int(attrs.get("format_version", -1))
        if version > VERSION or version < 1:
            raise FileFormatError(
                f"{self.path} is {FORMAT} version {version}; this ddkd reads version {VERSION}"
            )
        try:
            header = ExpertsHeader(
                num_experts=int(attrs["num_experts"]),
                epochs=int(attrs["epochs"]),
                n_params=int(attrs["n_params"]),
                dtype=str(attrs["dtype"]),
                student=json.loads(attrs["student"]),
                param_spec=ParamSpec.from_json(json.loads(attrs["param_spec"])),
                experts_config=json.loads(attrs["experts_config"]),
                objective=str(attrs["objective"]),
                seed=int(attrs["seed"]),
            )
        except KeyError as err:
            raise FileFormatError(f"{self.path} lacks the attribute {err}") from err
        expected = (header.epochs + 1, header.n_params)
        for k in range(header.num_experts):
            name = f"experts/{k:04d}"
            if name not in self._fh:
                raise FileFormatError(f"{self.path} lacks expert {k} ({name})")
            if self._fh[name].shape != expected:
                raise FileFormatError(
                    f"{self.path}: {name} has shape {self._fh[name].shape}, expected {expected}"
                )
        return header

    def __enter__(self) -> ExpertsFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._fh.close()

    def __len__(self) -> int:
        return self.header.num_experts

    def snapshot(self, k: int, epoch: int) -> torch.Tensor:
        """Parameters of expert ``k`` after ``epoch`` epochs (0 = init) -> ``(P,)`` float32."""
        row = self._fh[f"experts/{k:04d}"][epoch]
        return torch.from_numpy(np.asarray(row, dtype=np.float32))

    def trajectory(self, k: int) -> torch.Tensor:
        """All snapshots of expert ``k`` -> ``(epochs + 1, P)`` float32."""
        return torch.from_numpy(np.asarray(self._fh[f"experts/{k:04d}"][()], dtype=np.float32))

    def check_finite(self, last_epoch: int) -> None:
        """Refuse snapshots 0..``last_epoch`` of any expert that hold NaN or inf, naming the
        expert and the epoch (matching would otherwise fail later as a diverged run). Reads
        those rows once: a fraction of a synthesize run's cost."""
        for k in range(self.header.num_experts):
            rows = np.asarray(self._fh[f"experts/{k:04d}"][: last_epoch + 1])
            bad = ~np.isfinite(rows)
            if bad.any():
                epoch = int(np.flatnonzero(bad.any(axis=1))[0])
                raise FileFormatError(
                    f"{self.path}: expert {k} (experts/{k:04d}) holds {int(bad.sum())} non-finite "
                    f"parameters (NaN or inf), the first at epoch {epoch}: the file is damaged; "
                    "record the experts again with `ddkd teach --out RUN --overwrite`")

    def losses(self, k: int) -> np.ndarray:
        return np.asarray(self._fh[f"experts/{k:04d}"].attrs["losses"])
