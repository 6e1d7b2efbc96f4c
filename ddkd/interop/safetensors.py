"""A small reader and writer of the safetensors format, so that ddkd needs no extra package.

The format (https://huggingface.co/docs/safetensors, "Format"): an unsigned little-endian
64-bit integer N, then N bytes of a UTF-8 JSON header, then the tensors' bytes. The header maps
every tensor name to ``{"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}``
(offsets into the byte buffer after the header; the tensors fill it without gaps), and may hold
a ``"__metadata__"`` map of strings to strings. Data are little-endian, C order. The header may
be padded with spaces; we pad it to a multiple of 8 bytes so that every buffer starts aligned.
Files written here load with the ``safetensors`` package (``safetensors.numpy.load_file``) and
files it writes load here.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np

from ddkd.errors import FileFormatError
from ddkd.io.atomic import atomic_path

_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
_MAX_HEADER = 100_000_000  # the reference implementation's limit


def save_file(path: str | Path, arrays: dict[str, np.ndarray],
              metadata: dict[str, str] | None = None) -> None:
    """Write ``arrays`` (names -> numpy arrays) and string ``metadata`` atomically."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blobs, offset = [], 0
    for name, array in arrays.items():
        array = np.asarray(array)  # (not ascontiguousarray: it turns a 0-d array into 1-d)
        key = _NAMES.get(array.dtype.newbyteorder("<"))  # a big-endian array is swapped below
        if key is None:
            raise FileFormatError(f"safetensors: array {name!r} has dtype {array.dtype}, which "
                                  "the format cannot hold")
        data = array.astype(_DTYPES[key], copy=False).tobytes(order="C")
        header[name] = {"dtype": key, "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(struct.pack("<Q", len(text)))
            fh.write(text)
            for data in blobs:
                fh.write(data)


def load_file(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """-> (names -> arrays, metadata); a malformed file raises :class:`FileFormatError`."""
    path = Path(path)
    raw = path.read_bytes()
    if len(raw) < 8:
        raise FileFormatError(f"{path} is not a safetensors file (shorter than its 8-byte header "
                              "length)")
    (n,) = struct.unpack("<Q", raw[:8])
    if n > min(_MAX_HEADER, len(raw) - 8):
        raise FileFormatError(f"{path} is not a safetensors file (header length {n} exceeds the "
                              "file)")
    try:
        header = json.loads(raw[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FileFormatError(f"{path} is not a safetensors file (its header is not JSON: "
                              f"{err})") from None
    if not isinstance(header, dict):
        raise FileFormatError(f"{path} is not a safetensors file (its header is not an object)")
    buffer = memoryview(raw)[8 + n :]
    metadata = header.pop("__metadata__", None) or {}
    arrays, ends = {}, []
    for name, info in header.items():
        try:
            dtype = _DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(v) for v in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise FileFormatError(f"{path}: tensor {name!r} has a malformed header entry "
                                  f"{info!r}") from None
        if not 0 <= begin <= end <= len(buffer) or end - begin != math.prod(shape) * dtype.itemsize:
            raise FileFormatError(f"{path}: tensor {name!r}'s offsets {begin}..{end} do not fit "
                                  f"its shape {shape} and dtype {info['dtype']} in the file")
        arrays[name] = np.frombuffer(buffer[begin:end], dtype=dtype).reshape(shape).copy()
        ends.append((begin, end))
    covered = 0
    for begin, end in sorted(ends):
        if begin != covered:
            raise FileFormatError(f"{path}: the tensors' byte ranges overlap or leave gaps")
        covered = end
    if covered != len(buffer):
        raise FileFormatError(f"{path}: {len(buffer) - covered} bytes after the last tensor")
    return arrays, {str(k): str(v) for k, v in metadata.items()}
