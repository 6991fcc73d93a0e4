"""Initial weights that do not depend on the parallel layout.

megatron draws initial weights from a running generator: what a pipeline stage or a
tensor-parallel shard gets depends on what was drawn before it on that rank, so the same seed
gives other weights at PP 2 than at PP 1 (and, with GPU initialization, at TP 2 than at TP 1).
Here every weight matrix is drawn anew from its *global* identity instead: the checkpoint key
megatron gives it (layer numbers are global, virtual-pipeline offsets included), the layer
index, and a fixed block of global rows, each block from its own seeded generator. A rank draws
only the row blocks that its shard touches and keeps the slice it owns, so a rank's work and
memory are bounded by its shard's rows times a block, whatever the model size.

The distributions are megatron's own: normal(0, ``init_method_std``) for embeddings and input
projections, and megatron's scaled output init, std / sqrt(2 x layers), for the attention and
MLP output projections (``linear_proj``, ``linear_fc2``). Vectors (norm gains, biases, the SCI
gate, the temperature) keep their constant initial values, which no layout can change.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator

import torch
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

# Rows per generator block: a fixed function of a row's width (never of the row count), small
# enough that a tiny model draws little more than its weights, large enough for few calls.
BLOCK_ROWS = 256
BLOCK_ELEMENTS = 1 << 22
OUTPUT_PROJECTIONS = ("linear_proj.weight", "linear_fc2.weight")


def _sharded_tensors(state: dict) -> Iterator[ShardedTensor]:
    for value in state.values():
        if isinstance(value, dict):
            yield from _sharded_tensors(value)
        elif isinstance(value, ShardedTensor):
            yield value
        elif isinstance(value, ShardedTensorFactory):
            built = value.build()
            parts = built if isinstance(built, (list, tuple)) else [built]
            yield from (p for p in parts if isinstance(p, ShardedTensor))


def _seed(seed: int, key: str, prefix: tuple[int, ...], block: int) -> int:
    text = f"{seed}|{key}|{','.join(map(str, prefix))}|{block}".encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") & ((1 << 63) - 1)


def fill_global_normal(tensor: ShardedTensor, seed: int, std: float) -> None:
    """Write this shard's slice of the global normal(0, std) tensor into ``tensor.data``."""
    prepend = tensor.prepend_axis_num
    shape = tuple(tensor.global_shape[prepend:])
    offset = tuple(tensor.global_offset[prepend:])
    prefix = tuple(tensor.global_offset[:prepend])
    local = tensor.data
    if local.dim() < 2:
        raise ValueError(f"{tensor.key}: only matrices are drawn, got shape {tuple(local.shape)}")
    row_numel = math.prod(shape[1:])
    rows_per_block = max(1, min(BLOCK_ROWS, BLOCK_ELEMENTS // row_numel))
    first, last = offset[0], offset[0] + local.shape[0]  # the global rows this shard holds
    cols = tuple(slice(o, o + n) for o, n in zip(offset[1:], local.shape[1:], strict=True))
    device = local.device
    generator = torch.Generator(device=device)
    with torch.no_grad():
        for block in range(first // rows_per_block, (last - 1) // rows_per_block + 1):
            start = block * rows_per_block
            stop = min(start + rows_per_block, shape[0])
            generator.manual_seed(_seed(seed, tensor.key, prefix, block))
            # Always a whole block: a generator's values at an index can depend on how many
            # it draws (CUDA's kernels split the work by size), so the size must not depend
            # on the tensor's total rows (e.g. a vocabulary padded for another TP size).
            values = torch.randn(
                (rows_per_block, *shape[1:]), generator=generator, device=device,
                dtype=torch.float32,
            )  # fmt: skip
            lo, hi = max(first, start), min(last, stop)
            piece = values[(slice(lo - start, hi - start), *cols)]
            local[lo - first : hi - first].copy_(piece.mul_(std))


def initialize_layout_independent(
    model: torch.nn.Module, seed: int, std: float, layers: dict[str, int]
) -> int:
    """Redraw every weight matrix of ``model`` (a megatron module with ``sharded_state_dict``)
    from its global identity; returns how many shards were drawn.

    ``layers`` maps a key prefix to the layer count of the block it belongs to (for the scaled
    output init), longest prefix first wins, e.g. ``{"sci.": 2, "": 24}``."""
    count = 0
    prefixes = sorted(layers, key=len, reverse=True)
    for tensor in _sharded_tensors(model.sharded_state_dict()):
        data = tensor.data
        if not isinstance(data, torch.Tensor) or not data.is_floating_point():
            continue
        if data.dim() < 2:
            continue  # constants (norm gains, biases, gate): layout-independent already
        scaled = tensor.key.endswith(OUTPUT_PROJECTIONS)
        block_layers = layers[next(p for p in prefixes if tensor.key.startswith(p))]
        fill_global_normal(tensor, seed, std / math.sqrt(2.0 * block_layers) if scaled else std)
        count += 1
    return count


def check_constant_vectors(model: torch.nn.Module) -> None:
    """Every vector parameter must start constant (else it would need a layout-independent
    draw of its own): a new parameter type fails here instead of silently differing by layout."""
    for name, param in model.named_parameters():
        if param.dim() < 2 and param.numel() > 1 and not bool((param == param.flatten()[0]).all()):
            raise ValueError(f"{name} starts non-constant; give it a layout-independent init")
