"""Opening the published codes' ``.pt`` files without running them.

The research codes save with plain ``torch.save`` (a pickle). A pickle can name any function to
call when it is read, so ddkd opens these files only with ``torch.load(weights_only=True)``,
whose unpickler accepts tensors and plain containers (lists, tuples, dicts, numbers) and
refuses everything else. A file that needs more is refused with one line, never retried with
``weights_only=False``.
"""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path

import torch

from ddkd.errors import FileFormatError


def load_pt(path: Path) -> object:
    """The object in a ``.pt`` file, read with ``torch.load(weights_only=True)`` onto the CPU.

    Raises:
        FileFormatError: the file is missing, not a PyTorch file, or needs pickled code.
    """
    if not path.is_file():
        raise FileFormatError(f"{path} does not exist")
    try:
        with warnings.catch_warnings():
            # torch warns on stderr about unusual pickle protocols; the error below says it all
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        named = re.search(r"GLOBAL ([\w.]+)", str(err))
        what = f" (it names {named.group(1)})" if named else ""
        raise FileFormatError(
            f"{path}: refused: reading it needs pickled code or objects beyond tensors{what}; "
            "ddkd opens .pt files with torch.load(weights_only=True) only and never runs a "
            "file's code: re-save its tensors with torch.save(tensor) where you trust it"
        ) from None
    except Exception as err:  # truncated, zero bytes, another format altogether
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise FileFormatError(f"{path} is not a readable PyTorch file (truncated or another "
                              f"format: {type(err).__name__} {first[:100]})") from None


def load_tensor(path: Path, what: str) -> torch.Tensor:
    """A ``.pt`` file that must hold one tensor (``what`` names it in errors), detached."""
    obj = load_pt(path)
    if isinstance(obj, int | float) and not isinstance(obj, bool):
        return torch.tensor(obj)
    if not isinstance(obj, torch.Tensor):
        raise FileFormatError(f"{path} holds a {type(obj).__name__}, not a tensor: it is not "
                              f"{what}")
    return obj.detach()
