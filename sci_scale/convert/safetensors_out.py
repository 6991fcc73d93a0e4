"""Writing a model as sharded safetensors, one tensor at a time.

The shard plan is huggingface_hub's own (``split_torch_state_dict_into_shards``, what
``transformers``' ``save_pretrained`` uses): the same file names
(``model-00001-of-00004.safetensors``, or ``model.safetensors`` when one file holds it all), the
same ``--max-shard-size`` semantics, the same ``model.safetensors.index.json``. It is made from
shapes and dtypes alone (meta tensors), before any weight is read.

The files are written here rather than by ``safetensors.torch.save_file``: that function takes
the whole shard as a dict and copies every tensor to ``bytes`` before it writes, so a 5 GB shard
would need 10 GB of memory. The safetensors format is a little-endian u64 header length, a JSON
header (dtype, shape, byte offsets of every tensor; padded to 8 bytes) and the raw tensor bytes;
since the header is known from the plan, each tensor is written the moment it is produced and
dropped. The files are read back by ``safetensors.safe_open`` in the tests and by transformers.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import BinaryIO

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from huggingface_hub.serialization._base import parse_size_to_int

from sci_scale.errors import UserError

SAFETENSORS_INDEX = "model.safetensors.index.json"
WRITE_BLOCK_BYTES = 64 << 20  # elements cast and written at a time
DTYPE_NAMES = {
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
}


class ExportOptionError(UserError, ValueError):
    """An export option that is not valid (a shard size, a dtype)."""


def parse_shard_size(size: str) -> int:
    """'5GB', '500MB', '2GiB' (transformers' units) or a number of bytes -> bytes; a clear
    error otherwise."""
    try:
        value = int(size) if size.strip().isdigit() else parse_size_to_int(size)
    except ValueError as exc:
        raise ExportOptionError(f"--max-shard-size {size!r}: {exc}") from None
    if value <= 0:
        raise ExportOptionError(f"--max-shard-size {size!r} must be positive")
    return value


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


class ShardedSafetensorsWriter:
    """Writes the tensors of ``layout`` (name -> (shape, dtype), in production order) to
    ``directory`` as they arrive through :meth:`write`, in exactly that order."""

    def __init__(
        self,
        directory: Path,
        layout: dict[str, tuple[tuple[int, ...], torch.dtype]],
        max_bytes: int,
    ) -> None:
        self.directory = directory
        meta = {n: torch.empty(s, dtype=d, device="meta") for n, (s, d) in layout.items()}
        split = split_torch_state_dict_into_shards(meta, max_shard_size=max_bytes)
        self.split = split
        self.layout = layout
        self.order = list(layout)
        self.position = {name: i for i, name in enumerate(self.order)}
        self.file_of = split.tensor_to_filename
        self.remaining = {f: len(names) for f, names in split.filename_to_tensors.items()}
        self.headers = {f: self._header(names) for f, names in split.filename_to_tensors.items()}
        self.open: dict[str, BinaryIO] = {}
        self.next = 0
        self.total_bytes = sum(_nbytes(s, d) for s, d in layout.values())
        self.total_parameters = sum(t.numel() for t in meta.values())

    def _header(self, names: list[str]) -> bytes:
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name in sorted(
            names, key=self.position.__getitem__
        ):  # the file's bytes in production order
            shape, dtype = self.layout[name]
            size = _nbytes(shape, dtype)
            header[name] = {
                "dtype": DTYPE_NAMES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + size],
            }
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors aligns the data to 8 bytes
        return struct.pack("<Q", len(raw)) + raw

    @property
    def files(self) -> list[str]:
        return list(self.split.filename_to_tensors)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next tensor, cast to its planned dtype a block at a time (a full-size
        copy in the new dtype is never made)."""
        expected = self.order[self.next] if self.next < len(self.order) else None
        shape, dtype = self.layout.get(name, ((), None))
        if name != expected or tuple(tensor.shape) != shape:
            raise RuntimeError(
                f"export produced {name} {tuple(tensor.shape)}; the shard plan expected "
                f"{expected} {shape} next"
            )
        self.next += 1
        file = self.file_of[name]
        if file not in self.open:
            self.open[file] = open(self.directory / file, "wb")  # noqa: SIM115 (closed below)
            self.open[file].write(self.headers[file])
        flat = tensor.detach().contiguous().reshape(-1)
        step = max(1, WRITE_BLOCK_BYTES // flat.element_size())
        for start in range(0, flat.numel(), step):
            block = flat[start : start + step].to(dtype).view(torch.uint8)
            self.open[file].write(memoryview(block.numpy()))
        self.remaining[file] -= 1
        if self.remaining[file] == 0:
            handle = self.open.pop(file)
            handle.flush()
            os.fsync(handle.fileno())
            handle.close()

    def finish(self) -> list[str]:
        """Check every planned tensor was written; write the index when sharded. Returns the
        files written."""
        if self.next != len(self.order) or self.open:
            raise RuntimeError(f"export wrote {self.next} of {len(self.order)} planned tensors")
        if self.split.is_sharded:
            index = {
                "metadata": {
                    "total_parameters": self.total_parameters,
                    "total_size": self.total_bytes,
                },
                "weight_map": dict(sorted(self.file_of.items())),
            }
            (self.directory / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return self.files
