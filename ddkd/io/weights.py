"""Weights-only HDF5 checkpoints: a state dict plus the JSON configuration that rebuilds the
network. Loading never unpickles anything (h5py reads plain arrays and strings), so a shared
teacher file cannot run code.

Layout (format ``ddkd-weights``, version 1)::

    /                      attrs: format, format_version, kind, config (JSON), meta (JSON)
    /state/<param.name>    one dataset per state-dict entry, in its own dtype
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import torch

from ddkd.errors import FileFormatError
from ddkd.io.atomic import atomic_path

FORMAT = "ddkd-weights"
VERSION = 1


# The teachers ddkd ships (trained by ddkd itself; each with a JSON record of how), by dataset.
ASSETS = Path(__file__).resolve().parent.parent / "assets"
SHIPPED_TEACHERS = {"fashion-mnist": "fashion-mnist-teacher.h5"}


def save_weights(
    path: str | Path, state: dict[str, torch.Tensor], kind: str, config: dict, meta: dict
) -> None:
    """Atomically write ``state`` with its ``kind`` (e.g. ``resnet``), config and metadata."""
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    with atomic_path(path, expected_bytes=nbytes) as tmp:  # HDF5 on a full disk: see atomic
        with h5py.File(tmp, "w") as fh:
            fh.attrs["format"] = FORMAT
            fh.attrs["format_version"] = VERSION
            fh.attrs["kind"] = kind
            fh.attrs["config"] = json.dumps(config, sort_keys=True)
            fh.attrs["meta"] = json.dumps(meta, sort_keys=True)
            group = fh.create_group("state")
            for name, tensor in state.items():
                group.create_dataset(name, data=tensor.detach().cpu().numpy())


def load_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], str, dict, dict]:
    """Read a file written by :func:`save_weights` -> ``(state, kind, config, meta)``."""
    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"{path} does not exist")
    try:
        with h5py.File(path, "r") as fh:
            if fh.attrs.get("format") != FORMAT:
                raise FileFormatError(
                    f"{path} is not a ddkd weights file (format attribute "
                    f"{fh.attrs.get('format')!r}, expected {FORMAT!r})"
                )
            version = int(fh.attrs["format_version"])
            if version > VERSION:
                raise FileFormatError(
                    f"{path} is {FORMAT} version {version}; this ddkd reads up to {VERSION}: "
                    "upgrade ddkd"
                )
            state: dict[str, torch.Tensor] = {}
            fh["state"].visititems(
                lambda name, obj: state.__setitem__(name.replace("/", "."), obj)
                if isinstance(obj, h5py.Dataset)
                else None
            )
            state = {k: torch.from_numpy(np.array(v[()])) for k, v in state.items()}
            kind = str(fh.attrs["kind"])
            config = json.loads(fh.attrs["config"])
            meta = json.loads(fh.attrs["meta"])
    except OSError as err:
        raise FileFormatError(f"{path} is not a readable HDF5 file: {err}") from err
    except (KeyError, ValueError) as err:
        raise FileFormatError(f"{path} is a damaged {FORMAT} file (missing or invalid "
                              f"{err})") from err
    return state, kind, config, meta
