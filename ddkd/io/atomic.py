"""Atomic file writes: a temp file in the same folder, fsync, then ``os.replace``.

A killed process leaves at most a ``.NAME.XXXXXXXX.tmp`` file behind, never a file under the
final name that looks complete; :func:`remove_stale_temps` clears such leftovers when a run
resumes or is overwritten.

A full disk becomes a :class:`~ddkd.errors.DiskFullError` (one line, nothing complete lost).
HDF5 written straight to a full disk fails inside h5py's object destructors (a hundred ignored
tracebacks, then a segfault at exit), so small HDF5 files (a synthetic set) are built in memory
and written with :func:`write_bytes`, and large ones (the experts) check for free space first
(``expected_bytes``).
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ddkd.errors import ConfigError, DiskFullError

_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
# tempfile.mkstemp's names: the prefix, 8 characters from this alphabet, the suffix
_TEMP_RANDOM = r"[a-z0-9_]{8}"
# a margin on top of the expected size (HDF5 metadata, chunk indices): 64 KiB + 5%
_FREE_MARGIN = 1 << 16


def _size(nbytes: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{int(nbytes)} bytes"


def is_disk_full(err: BaseException) -> bool:
    """Whether ``err`` says the disk or the quota is full (OSError, or h5py's wrapped text)."""
    if isinstance(err, OSError) and err.errno in _DISK_FULL:
        return True
    text = str(err)
    return "No space left on device" in text or "errno = 28" in text


def disk_full_error(path: Path, err: BaseException | None = None) -> DiskFullError:
    try:
        free = f"{_size(shutil.disk_usage(path.parent).free)} free"
    except OSError:
        free = "free space unknown"
    return DiskFullError(f"the disk is full: writing {path} failed (No space left on device; "
                         f"{free} in {path.parent})", str(path))


def _ensure_free(path: Path, expected_bytes: int) -> None:
    """Refuse a write of about ``expected_bytes`` that cannot fit, before it starts."""
    free = shutil.disk_usage(path.parent).free
    if free < expected_bytes + _FREE_MARGIN + expected_bytes // 20:
        raise DiskFullError(
            f"the disk is full: writing {path} needs about {_size(expected_bytes)} but only "
            f"{_size(free)} are free in {path.parent}", str(path))


@contextlib.contextmanager
def atomic_path(path: str | Path, expected_bytes: int | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed onto ``path``.

    ``expected_bytes``: the size about to be written, checked against the free space first.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as err:
        raise ConfigError(f"cannot write {path}: a part of its folder {path.parent} is a file, "
                          "not a directory") from err
    if expected_bytes is not None:
        _ensure_free(path, expected_bytes)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        if is_disk_full(err):
            raise disk_full_error(path, err) from err
        raise
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; shared files must be readable
        os.replace(tmp_path, path)
    except (OSError, RuntimeError) as err:
        if is_disk_full(err):
            raise disk_full_error(path, err) from err
        raise
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _write_all(fh: io.BufferedWriter, data: bytes) -> None:
    """The one place file bytes are written (a seam for tests that inject a full disk)."""
    fh.write(data)


def write_bytes(path: str | Path, data: bytes) -> None:
    """Atomically write ``data``; a full disk raises DiskFullError and leaves no file."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        _write_all(fh, data)


def save_torch(path: str | Path, obj: object) -> None:
    """``torch.save`` atomically, serialised in memory first: torch's own file writer reports a
    full disk as an opaque RuntimeError, a plain write as ``ENOSPC``."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes(path, buffer.getvalue())


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: str | Path, obj: object) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def append_jsonl(path: str | Path, record: dict) -> None:
    """Append one JSON line (metrics); a torn last line is skipped by :func:`read_jsonl`."""
    try:
        with open(path, "a") as fh:
            fh.write(json.dumps(record, sort_keys=True) + "\n")
            fh.flush()
    except OSError as err:
        if is_disk_full(err):
            raise disk_full_error(Path(path), err) from err
        raise


def read_jsonl(path: str | Path) -> list[dict]:
    out: list[dict] = []
    if not Path(path).exists():
        return out
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def remove_stale_temps(folder: str | Path, name: str | None = None) -> list[Path]:
    """Delete the temporary files that killed or failed writes of :func:`atomic_path` left in
    ``folder`` (of the file ``name`` only, or of any file): ``.NAME.XXXXXXXX.tmp``. Call it only
    where no other process is writing (a run directory being resumed, an output being
    replaced)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stem = re.escape(f".{name}.") if name is not None else r"\..+\."
    pattern = re.compile(f"{stem}{_TEMP_RANDOM}\\.tmp")
    removed = []
    for entry in folder.iterdir():
        if pattern.fullmatch(entry.name) and entry.is_file():
            entry.unlink()
            removed.append(entry)
    return removed


def check_writable(path: str | Path, flag: str, kind: str = "file") -> None:
    """Check, before any work, that ``path`` (a ``kind`` = "file" or "dir" output named by
    ``flag``) can be created: no part of its folder is a file, and the nearest existing folder
    accepts a new file (a real probe: permissions, read-only mounts and ACLs all count)."""
    path = Path(path)
    if path.exists():
        if kind == "file" and path.is_dir():
            raise ConfigError(f"{flag} {path} is a directory; give a file name")
        if kind == "dir" and not path.is_dir():
            raise ConfigError(f"{flag} {path} is a file, not a directory")
    folder = path if kind == "dir" and path.is_dir() else path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise ConfigError(f"{flag} {path} cannot be created: {folder} is a file, not a "
                          f"directory; choose another {flag}")
    try:
        fd, probe = tempfile.mkstemp(prefix=".ddkd-write-probe.", dir=folder)
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise ConfigError(f"{flag} {path} cannot be written: creating a file in {folder} failed "
                          f"({reason}); choose another {flag} or make {folder} writable") from err
    os.close(fd)
    os.unlink(probe)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
