"""Shape arithmetic of the model, free of torch and megatron so that planning and conversion
tools (``sci-scale plan``, ``submit``'s memory check) answer without importing them."""

from __future__ import annotations

import math


def llama_ffn_size(hidden: int, multiple_of: int = 64) -> int:
    """Llama's SwiGLU width: 2/3 of 4h, rounded up to a multiple."""
    size = int(8 * hidden / 3)
    return multiple_of * math.ceil(size / multiple_of)


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_parallel: int) -> int:
    """Megatron pads the vocabulary so every tensor-parallel shard has the same width."""
    multiple = divisible_by * tensor_parallel
    return multiple * math.ceil(vocab_size / multiple)
