"""Reading a Hugging Face model directory's weights one tensor at a time, safely.

safetensors first (a single file, or shards with ``model.safetensors.index.json``): only the
headers are read up front; each tensor is read when it is asked for, from a file opened for
that read and closed after it, so neither the tensors nor the mapped pages of the files stay
in memory. A legacy ``pytorch_model.bin`` is read only through
``torch.load(weights_only=True, mmap=True)``, which refuses anything but tensors and plain
containers. Nothing in the directory is ever executed.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from sci_scale.convert.hf_config import ModelFileError, UnsupportedModelError, read_json

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
READ_BLOCK_BYTES = 64 << 20  # rows of a large tensor read per opening of its file


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    """A legacy torch file, memory-mapped when it is a zip file (torch >= 1.6 wrote those), so
    its tensors are read as they are used; read whole otherwise."""
    mmap = zipfile.is_zipfile(path)
    return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def _unreadable(path: Path, exc: Exception) -> ModelFileError:
    return ModelFileError(
        f"{path}: not a readable safetensors file ({exc}); {path.stat().st_size} bytes, "
        "perhaps an interrupted download"
    )


class HFWeights:
    """The tensors of an HF model directory by name, read on demand."""

    def __init__(self, hf_dir: Path) -> None:
        self.hf_dir = hf_dir
        self.files: dict[str, Path] = {}  # tensor name -> the file that holds it
        self._loaded: dict[str, torch.Tensor] | None = None  # legacy .bin weights
        if (hf_dir / SAFETENSORS).is_file():
            self._index_file(hf_dir / SAFETENSORS)
        elif (hf_dir / SAFETENSORS_INDEX).is_file():
            for path in self._shards(SAFETENSORS_INDEX):
                self._index_file(path)
        elif (hf_dir / BIN).is_file() or (hf_dir / BIN_INDEX).is_file():
            paths = [hf_dir / BIN] if (hf_dir / BIN).is_file() else self._shards(BIN_INDEX)
            self._loaded = {}
            for path in paths:
                loaded = _load_bin(path)
                self._loaded.update(loaded)
                self.files.update(dict.fromkeys(loaded, path))
        else:
            raise UnsupportedModelError(
                f"{hf_dir} has no weights: expected {SAFETENSORS}, {SAFETENSORS_INDEX}, {BIN} "
                f"or {BIN_INDEX}"
            )

    def _shards(self, index_name: str) -> list[Path]:
        index = read_json(self.hf_dir / index_name)
        if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
            raise ModelFileError(f"{self.hf_dir / index_name}: no 'weight_map' object")
        paths = []
        for name in sorted(set(index["weight_map"].values())):
            path = self.hf_dir / name
            if not path.is_file():
                raise UnsupportedModelError(f"{index_name} names {name}, which is missing")
            paths.append(path)
        return paths

    def _index_file(self, path: Path) -> None:
        try:
            with safe_open(path, framework="pt") as f:
                self.files.update(dict.fromkeys(f.keys(), path))
        except SafetensorError as exc:
            raise _unreadable(path, exc) from None

    def names(self) -> set[str]:
        return set(self.files)

    def largest_file_bytes(self) -> int:
        return max(p.stat().st_size for p in set(self.files.values()))

    def get(self, name: str) -> torch.Tensor:
        """One tensor, read in blocks of rows: the file's mapped pages count as this process's
        memory until the file is closed, so a large tensor (an embedding of 128k rows) is read
        a block at a time, each block from the file opened for it, and is held once."""
        if self._loaded is not None:
            return self._loaded[name].clone()
        path = self.files[name]
        try:
            with safe_open(path, framework="pt") as f:
                part = f.get_slice(name)
                shape = part.get_shape()
                rows = shape[0] if shape else 0
                row_bytes = part[0:1].nbytes if rows else 0
                if rows * row_bytes <= READ_BLOCK_BYTES:
                    return f.get_tensor(name)
                step = max(1, READ_BLOCK_BYTES // max(1, row_bytes))
                first = part[0:step]
            out = torch.empty(shape, dtype=first.dtype)
            out[:step] = first
            del first
            for start in range(step, rows, step):
                with safe_open(path, framework="pt") as f:
                    out[start : start + step] = f.get_slice(name)[start : start + step]
            return out
        except SafetensorError as exc:
            raise _unreadable(path, exc) from None
