"""Reading a Hugging Face model directory's weights, safely.

safetensors first (single file or sharded with an index); a legacy ``pytorch_model.bin`` only
through ``torch.load(weights_only=True)``, which refuses anything but tensors and plain
containers. Nothing in the directory is ever executed.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from sci_scale.convert.hf_config import ModelFileError, UnsupportedModelError, read_json

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"


def _safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except SafetensorError as exc:
        raise ModelFileError(
            f"{path}: not a readable safetensors file ({exc}); {path.stat().st_size} bytes, "
            "perhaps an interrupted download"
        ) from None


def read_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    if (hf_dir / SAFETENSORS).is_file():
        return _safetensors(hf_dir / SAFETENSORS)
    if (hf_dir / SAFETENSORS_INDEX).is_file():
        return _sharded(hf_dir, SAFETENSORS_INDEX, _safetensors)
    if (hf_dir / BIN).is_file():
        return torch.load(hf_dir / BIN, map_location="cpu", weights_only=True)
    if (hf_dir / BIN_INDEX).is_file():
        return _sharded(
            hf_dir, BIN_INDEX, lambda p: torch.load(p, map_location="cpu", weights_only=True)
        )
    raise UnsupportedModelError(
        f"{hf_dir} has no weights: expected {SAFETENSORS}, {SAFETENSORS_INDEX}, {BIN} or "
        f"{BIN_INDEX}"
    )


def _sharded(hf_dir: Path, index_name: str, load) -> dict[str, torch.Tensor]:
    index = read_json(hf_dir / index_name)
    if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
        raise ModelFileError(f"{hf_dir / index_name}: no 'weight_map' object")
    files = sorted(set(index["weight_map"].values()))
    out: dict[str, torch.Tensor] = {}
    for name in files:
        path = hf_dir / name
        if not path.is_file():
            raise UnsupportedModelError(f"{index_name} names {name}, which is missing")
        out.update(load(path))
    return out
