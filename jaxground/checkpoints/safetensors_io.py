"""Streaming safetensors reader/writer on plain file reads.

Why not `safetensors.safe_open`: it memory-maps the file, and every page it touches stays
in the process's resident set while the file is open, so converting a 14 GB checkpoint would
hold the checkpoint *and* the converted model in RSS. Reading each tensor with `readinto`
keeps one tensor in flight. numpy has no bfloat16; ml_dtypes provides it (JAX's own).
Format: u64 little-endian header length, JSON header {name: {dtype, shape, data_offsets}},
then the raw little-endian bytes.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Iterator

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
NAMES = {v: k for k, v in DTYPES.items()}
# Grounding heads exported beside an HF checkpoint; not part of the HF model's weights.
HEADS_FILE = "grounding_heads.safetensors"


class SafetensorsFile:
    """Header of one .safetensors file; `read(name)` loads one tensor."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            with open(self.path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
        except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{self.path}: not a readable safetensors file ({e})") from e
        self.metadata = header.pop("__metadata__", {})
        self.entries = header
        self.data_start = 8 + n

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        code = self.entries[name]["dtype"]
        if code not in DTYPES:
            raise ValueError(f"{self.path}: tensor {name!r} has unsupported dtype {code}")
        return DTYPES[code]

    def read(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """One tensor, or only rows [start, stop) of its first axis (contiguous in the file)."""
        entry = self.entries[name]
        begin, end = entry["data_offsets"]
        shape, dtype = self.shape(name), self.dtype(name)
        if int(np.prod(shape)) * dtype.itemsize != end - begin:
            raise ValueError(f"{self.path}: tensor {name!r} has {end - begin} bytes for shape "
                             f"{shape} {dtype}")
        if rows is not None:
            start, stop = rows
            if not shape or not 0 <= start <= stop <= shape[0]:
                raise ValueError(f"{self.path}: rows {rows} out of range for {name!r} {shape}")
            row_bytes = (end - begin) // shape[0]
            begin, shape = begin + start * row_bytes, (stop - start,) + shape[1:]
        out = np.empty(shape, dtype)
        with open(self.path, "rb") as f:
            f.seek(self.data_start + begin)
            if f.readinto(memoryview(out.reshape(-1).view(np.uint8))) != out.nbytes:
                raise ValueError(f"{self.path}: truncated while reading {name!r}")
        return out


def write_safetensors(path: str | os.PathLike, tensors: Iterable[tuple[str, np.ndarray]],
                      metadata: dict[str, str] | None = None) -> int:
    """Writes (name, array) pairs. Arrays may be views (a transposed slice of a stacked
    parameter); each is made contiguous only while it is written. Returns bytes written."""
    tensors = list(tensors)  # names and offsets must be known before the data
    header, offset = {}, 0
    for name, arr in tensors:
        if arr.dtype not in NAMES:
            raise ValueError(f"tensor {name!r}: dtype {arr.dtype} cannot be saved")
        header[name] = {"dtype": NAMES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    header["__metadata__"] = metadata or {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the spec aligns the data to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, arr in tensors:
            f.write(np.ascontiguousarray(arr).reshape(-1).view(np.uint8).data)
    return offset


def iter_checkpoint_files(hf_dir: str | os.PathLike) -> Iterator[SafetensorsFile]:
    """The safetensors files of an HF checkpoint dir, sharded (index.json) or single."""
    hf_dir = os.fspath(hf_dir)
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not os.path.exists(os.path.join(hf_dir, n))]
        if missing:
            raise FileNotFoundError(f"{index} names shard(s) {missing} that are not in {hf_dir}")
    else:
        names = sorted(n for n in os.listdir(hf_dir)
                       if n.endswith(".safetensors") and n != HEADS_FILE)
    for n in names:
        yield SafetensorsFile(os.path.join(hf_dir, n))
