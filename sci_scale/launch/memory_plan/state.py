"""The per-rank model state of a layout: weights, their gradients and the optimizer state.

These terms scale with the parameters a rank holds, so they are counted from the block shapes
(tensor-parallel shards, replicated norms) and the ZeRO stage alone, independent of the batch.

Optimizer state under ZeRO is DeepSpeed's: its ZeRO optimizer keeps an fp32 copy of the rank's
partition of the weights (a clone even when the weights are fp32: DeepSpeed 0.19's
``single_partition_of_fp32_groups``) and the fp32 Adam moments of that partition, 12 bytes per
parameter over the data-parallel size; at the step it also builds the partition's fp32 gradient
(4 bytes per parameter over data parallel), counted with the gradients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sci_scale.config.schema import Config
from sci_scale.train.flops import _layer_matmul_weights

# DeepSpeed: fp32 master copy + two fp32 Adam moments per parameter of the rank's partition
ZERO_STATE_BYTES = 12
# DeepSpeed's default reduce_bucket_size (elements): ZeRO-2/3 reduce gradients through it
ZERO_BUCKET_ELEMENTS = 500_000_000


@dataclass(frozen=True)
class Terms:
    parameters: int = 0
    gradients: int = 0
    optimizer: int = 0
    activations: int = 0

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.activations


@dataclass(frozen=True)
class Block:
    """One transformer stack's shape: the backbone's or the SCI branch's."""

    hidden: int
    heads: int
    groups: int
    head_dim: int
    ffn: int
    qkv_bias: bool = False

    def params(self, tp: int) -> int:
        """One layer's parameters on a tensor-parallel rank (norms are replicated)."""
        h, a, g, d = self.hidden, self.heads, self.groups, self.head_dim
        sharded = _layer_matmul_weights(h, a, g, d, self.ffn)
        if self.qkv_bias:
            sharded += (a + 2 * g) * d
        return math.ceil(sharded / tp) + 2 * h

    @property
    def tensors(self) -> int:
        """Parameter tensors per layer: two norms, qkv (+bias), proj, fc1, fc2."""
        return 6 + int(self.qkv_bias)


def backbone_block(cfg: Config) -> Block:
    from sci_scale.model.shapes import llama_ffn_size

    m = cfg.model
    return Block(
        m.hidden_size,
        m.num_attention_heads,
        m.num_query_groups,
        m.head_dim or m.hidden_size // m.num_attention_heads,
        m.ffn_hidden_size or llama_ffn_size(m.hidden_size),
        m.qkv_bias,
    )


def sci_block(cfg: Config) -> Block:
    s = cfg.sci
    heads = s.num_attention_heads
    return Block(
        s.hidden_size, heads, heads, s.hidden_size // heads, s.ffn_hidden_size or 4 * s.hidden_size
    )


def padded_vocab(cfg: Config) -> int:
    """The embedding's rows as megatron pads them for ``parallel.tensor``."""
    from sci_scale.model.shapes import padded_vocab_size

    m = cfg.model
    rows = m.vocab_size if m.vocab_size is not None else cfg.data.tokenizer_vocab_size
    return padded_vocab_size(rows, m.make_vocab_size_divisible_by, cfg.parallel.tensor)


def sci_params(cfg: Config, tp: int) -> tuple[int, int, int]:
    """SCI branch per rank: (parameters, trainable parameters, trainable tensors).

    The blocks are tensor-parallel; proj_in, proj_out, the gate and the head are plain torch
    modules, whole on every rank. ``sci.mode=frozen`` fixes all but proj_out and the gate."""
    s, h, hs = cfg.sci, cfg.model.hidden_size, cfg.sci.hidden_size
    blk = sci_block(cfg)
    attention_pool = s.pooling == "attention"
    # proj_in, the blocks and their final norm, the head's two linears, the pooling query, tau
    fixed = h * hs + s.num_layers * blk.params(tp) + hs + hs * hs + hs + hs * s.embed_dim
    fixed += s.embed_dim + hs * attention_pool + s.learnable_tau
    fixed_tensors = 1 + s.num_layers * blk.tensors + 1 + 4 + attention_pool + s.learnable_tau
    fusion = hs * h + h  # proj_out, gate: trained in every mode
    if s.mode == "frozen":
        return fixed + fusion, fusion, 2
    return fixed + fusion, fixed + fusion, fixed_tensors + 2


def state_terms(
    params: int,
    trainable: int,
    tensors: int,
    pbytes: int,
    zero: int,
    dp: int,
    largest_module: int = 0,
) -> Terms:
    """Weights, gradients and optimizer state of ``params`` weights (``trainable`` of them
    in ``tensors`` tensors) under ZeRO stage ``zero`` over ``dp`` ranks.

    ZeRO-0: torch AdamW, two moments in the weights' dtype and a 4-byte step per tensor.
    ZeRO >= 1: 12 bytes per trainable parameter over DP, plus DeepSpeed's fp32 gradient
    partition at the step (4 over DP); ZeRO-2/3 keep the gradients' partition (plus one reduce
    bucket) instead of the whole gradient; ZeRO-3 keeps the weights' partition and gathers one
    module at a time (``largest_module`` parameters: the embedding's or fc1's shard).
    """
    if zero == 0:
        return Terms(params * pbytes, trainable * pbytes, 2 * trainable * pbytes + 4 * tensors)
    shard = math.ceil(trainable / dp)
    optimizer = ZERO_STATE_BYTES * shard
    if zero == 1:
        return Terms(params * pbytes, trainable * pbytes + 4 * shard, optimizer)
    bucket = min(ZERO_BUCKET_ELEMENTS, trainable) * pbytes
    gradients = shard * pbytes + 4 * shard + bucket
    if zero == 2:
        return Terms(params * pbytes, gradients, optimizer)
    return Terms((math.ceil(params / dp) + largest_module) * pbytes, gradients, optimizer)
