"""Model FLOPs per token, for TFLOP/s and MFU.

The convention (stated next to every figure): a training step costs 3 x the forward matmuls,
6 FLOPs per matmul weight per token, plus the attention score and value products,
12 x layers x (heads x head_dim) x seq per token (not halved for the causal mask, as
Megatron-LM and PaLM count). Embedding lookups, norms and activations are not counted; the
output layer is, tied or not. The SCI branch adds its own matmuls and attention.
MFU = model FLOP/s per GPU / the GPU's dense bf16 peak (989 TFLOP/s for an H100 SXM).
The SCI pooling head runs once per example, not per token, and is left out.
"""

from __future__ import annotations

from dataclasses import dataclass

from sci_scale.config.schema import Config

H100_BF16_DENSE_TFLOPS = 989.0
FORMULA = (
    "FLOPs/token = 6 x matmul weights + 12 x layers x heads x head_dim x seq (backbone and SCI "
    "branch; causal mask not halved); MFU = FLOP/s per GPU / 989 TFLOP/s (H100 SXM dense bf16)"
)


@dataclass(frozen=True)
class FlopCount:
    matmul_weights: int  # backbone incl. output layer
    sci_matmul_weights: int
    attention_flops: int  # per token, backbone + SCI
    flops_per_token: int


def _layer_matmul_weights(hidden: int, heads: int, groups: int, head_dim: int, ffn: int) -> int:
    qkv = hidden * (heads + 2 * groups) * head_dim
    proj = heads * head_dim * hidden
    mlp = hidden * 2 * ffn + ffn * hidden  # SwiGLU: gate and up, then down
    return qkv + proj + mlp


def count_flops(cfg: Config, vocab: int) -> FlopCount:
    from sci_scale.model.shapes import llama_ffn_size

    m, s, seq = cfg.model, cfg.sci, cfg.model.seq_length
    head_dim = m.head_dim or m.hidden_size // m.num_attention_heads
    ffn = m.ffn_hidden_size or llama_ffn_size(m.hidden_size)
    per_layer = _layer_matmul_weights(
        m.hidden_size, m.num_attention_heads, m.num_query_groups, head_dim, ffn
    )
    weights = m.num_layers * per_layer + m.hidden_size * vocab
    attention = 12 * m.num_layers * m.num_attention_heads * head_dim * seq
    sci_weights = 0
    if s.mode != "off":
        sci_head_dim = s.hidden_size // s.num_attention_heads
        sci_layer = _layer_matmul_weights(
            s.hidden_size,
            s.num_attention_heads,
            s.num_attention_heads,
            sci_head_dim,
            s.ffn_hidden_size or 4 * s.hidden_size,
        )
        sci_weights = s.num_layers * sci_layer + m.hidden_size * s.hidden_size  # proj_in
        if s.fuse:
            sci_weights += s.hidden_size * m.hidden_size  # proj_out
        attention += 12 * s.num_layers * s.num_attention_heads * sci_head_dim * seq
    return FlopCount(weights, sci_weights, attention, 6 * (weights + sci_weights) + attention)
