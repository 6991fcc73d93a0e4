"""Tensor layouts: Hugging Face Llama-family names and shapes <-> megatron-core's GPTModel.

Both sides use RoPE on the rotate-half layout, so query and key rows are copied as they are. The
differences are packing:
- megatron fuses Q, K and V into one ``linear_qkv`` whose rows are grouped per key/value head:
  ``[q rows of the group's query heads, k rows, v rows]`` for each group in turn (this is where
  grouped-query conversions usually go wrong: a plain ``cat(q, k, v)`` is only right for one
  group);
- megatron fuses SwiGLU's gate and up projections into ``linear_fc1`` as ``[gate; up]``;
- megatron's embedding and output layer have the vocabulary padded to a multiple that divides
  evenly over tensor-parallel ranks; the padding rows are zero on import and dropped on export.

These are whole (TP=1) tensors; megatron's distributed checkpointing shards them to any layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sci_scale.config.schema import ModelSection, SciSection
from sci_scale.errors import UserError

HF_PREFIX = "model."
MEGATRON_PREFIX = "gpt."


class WeightMappingError(UserError, ValueError):
    """The weights of a model directory or checkpoint do not fit the model its config
    describes (a tensor missing, left over or of another vocabulary size)."""


def head_dim(m: ModelSection) -> int:
    return m.head_dim or m.hidden_size // m.num_attention_heads


@dataclass(frozen=True)
class AttentionShape:
    heads: int
    groups: int  # key/value heads
    head_dim: int

    @classmethod
    def of(cls, m: ModelSection) -> AttentionShape:
        return cls(m.num_attention_heads, m.num_query_groups, head_dim(m))


def pack_qkv(q: Tensor, k: Tensor, v: Tensor, shape: AttentionShape) -> Tensor:
    """[q; k; v] as HF stores them -> megatron's per-group interleaved rows (weights or biases)."""
    d, groups = shape.head_dim, shape.groups
    per_group = shape.heads // groups
    rest = q.shape[1:]
    q = q.reshape(groups, per_group * d, *rest)
    k = k.reshape(groups, d, *rest)
    v = v.reshape(groups, d, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def unpack_qkv(qkv: Tensor, shape: AttentionShape) -> tuple[Tensor, Tensor, Tensor]:
    """The inverse of ``pack_qkv``."""
    d, groups = shape.head_dim, shape.groups
    per_group = shape.heads // groups
    rest = qkv.shape[1:]
    grouped = qkv.reshape(groups, (per_group + 2) * d, *rest)
    q, k, v = torch.split(grouped, [per_group * d, d, d], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def _pad_rows(weight: Tensor, rows: int) -> Tensor:
    if weight.shape[0] > rows:
        raise WeightMappingError(f"vocabulary of {weight.shape[0]} rows exceeds {rows}")
    padded = weight.new_zeros(rows, *weight.shape[1:])
    padded[: weight.shape[0]] = weight
    return padded


def _take(sd: dict[str, Tensor], key: str) -> Tensor:
    try:
        return sd.pop(key)
    except KeyError:
        raise WeightMappingError(f"the checkpoint has no tensor {key!r}") from None


def hf_to_megatron(hf: dict[str, Tensor], m: ModelSection, padded_vocab: int) -> dict[str, Tensor]:
    """HF state dict -> SCIGPTModel state dict (backbone keys). Every HF tensor must be used."""
    hf = dict(hf)
    out: dict[str, Tensor] = {}
    mp, hp = MEGATRON_PREFIX, HF_PREFIX
    shape = AttentionShape.of(m)
    embed = _take(hf, f"{hp}embed_tokens.weight")
    out[f"{mp}embedding.word_embeddings.weight"] = _pad_rows(embed, padded_vocab)
    for i in range(m.num_layers):
        src, dst = f"{hp}layers.{i}.", f"{mp}decoder.layers.{i}."
        attn = f"{src}self_attn."
        out[f"{dst}input_layernorm.weight"] = _take(hf, f"{src}input_layernorm.weight")
        out[f"{dst}self_attention.linear_qkv.weight"] = pack_qkv(
            _take(hf, f"{attn}q_proj.weight"),
            _take(hf, f"{attn}k_proj.weight"),
            _take(hf, f"{attn}v_proj.weight"),
            shape,
        )
        if m.qkv_bias:
            out[f"{dst}self_attention.linear_qkv.bias"] = pack_qkv(
                _take(hf, f"{attn}q_proj.bias"),
                _take(hf, f"{attn}k_proj.bias"),
                _take(hf, f"{attn}v_proj.bias"),
                shape,
            )
        out[f"{dst}self_attention.linear_proj.weight"] = _take(hf, f"{attn}o_proj.weight")
        out[f"{dst}pre_mlp_layernorm.weight"] = _take(hf, f"{src}post_attention_layernorm.weight")
        out[f"{dst}mlp.linear_fc1.weight"] = torch.cat(
            [_take(hf, f"{src}mlp.gate_proj.weight"), _take(hf, f"{src}mlp.up_proj.weight")]
        )
        out[f"{dst}mlp.linear_fc2.weight"] = _take(hf, f"{src}mlp.down_proj.weight")
    out[f"{mp}decoder.final_layernorm.weight"] = _take(hf, f"{hp}norm.weight")
    lm_head = hf.pop("lm_head.weight", None)
    if not m.tie_embeddings:
        if lm_head is None:
            raise WeightMappingError("the checkpoint has no tensor 'lm_head.weight'")
        out[f"{mp}output_layer.weight"] = _pad_rows(lm_head, padded_vocab)
    elif lm_head is not None and not torch.equal(lm_head, embed):
        raise WeightMappingError(
            "tie_word_embeddings is true but lm_head.weight differs from embed_tokens.weight"
        )
    # Non-persistent buffers some exports carry (rotary inv_freq) are derived, not weights.
    leftover = sorted(k for k in hf if not k.endswith("rotary_emb.inv_freq"))
    if leftover:
        raise WeightMappingError(
            f"{len(leftover)} tensor(s) have no place in a {m.num_layers}-layer sci-scale "
            f"model: {', '.join(leftover[:5])}{' ...' if len(leftover) > 5 else ''}"
        )
    return out


def layer_to_hf(
    sd: dict[str, Tensor], src: str, dst: str, shape: AttentionShape, qkv_bias: bool
) -> dict[str, Tensor]:
    """One megatron transformer layer (keys under ``src``) as HF Llama-layer tensors."""
    out: dict[str, Tensor] = {}
    attn = f"{dst}self_attn."
    out[f"{dst}input_layernorm.weight"] = sd[f"{src}input_layernorm.weight"]
    q, k, v = unpack_qkv(sd[f"{src}self_attention.linear_qkv.weight"], shape)
    out[f"{attn}q_proj.weight"], out[f"{attn}k_proj.weight"] = q, k
    out[f"{attn}v_proj.weight"] = v
    if qkv_bias:
        qb, kb, vb = unpack_qkv(sd[f"{src}self_attention.linear_qkv.bias"], shape)
        out[f"{attn}q_proj.bias"], out[f"{attn}k_proj.bias"] = qb, kb
        out[f"{attn}v_proj.bias"] = vb
    out[f"{attn}o_proj.weight"] = sd[f"{src}self_attention.linear_proj.weight"]
    out[f"{dst}post_attention_layernorm.weight"] = sd[f"{src}pre_mlp_layernorm.weight"]
    gate, up = torch.chunk(sd[f"{src}mlp.linear_fc1.weight"], 2, dim=0)
    out[f"{dst}mlp.gate_proj.weight"], out[f"{dst}mlp.up_proj.weight"] = gate, up
    out[f"{dst}mlp.down_proj.weight"] = sd[f"{src}mlp.linear_fc2.weight"]
    return out


def megatron_to_hf(sd: dict[str, Tensor], m: ModelSection, vocab: int) -> dict[str, Tensor]:
    """SCIGPTModel state dict (backbone keys) -> HF state dict, vocabulary padding removed."""
    mp, hp = MEGATRON_PREFIX, HF_PREFIX
    shape = AttentionShape.of(m)
    out: dict[str, Tensor] = {}
    out[f"{hp}embed_tokens.weight"] = sd[f"{mp}embedding.word_embeddings.weight"][:vocab]
    for i in range(m.num_layers):
        out.update(
            layer_to_hf(sd, f"{mp}decoder.layers.{i}.", f"{hp}layers.{i}.", shape, m.qkv_bias)
        )
    out[f"{hp}norm.weight"] = sd[f"{mp}decoder.final_layernorm.weight"]
    if not m.tie_embeddings:
        out["lm_head.weight"] = sd[f"{mp}output_layer.weight"][:vocab]
    return {k: v.contiguous() for k, v in out.items()}


def sci_branch_to_hf(sd: dict[str, Tensor], sci: SciSection) -> dict[str, Tensor]:
    """The SCI branch's fusion path (what changes logits) as ``modeling_sci_scale`` names it.

    Its layers are multi-head (one key/value head per query head) and bias-free."""
    shape = AttentionShape(
        sci.num_attention_heads, sci.num_attention_heads, sci.hidden_size // sci.num_attention_heads
    )
    out = {
        "sci.proj_in.weight": sd["sci.proj_in.weight"],
        "sci.proj_out.weight": sd["sci.proj_out.weight"],
        "sci.gate": sd["sci.gate"],
        "sci.norm.weight": sd["sci.encoder.final_layernorm.weight"],
    }
    for i in range(sci.num_layers):
        out.update(layer_to_hf(sd, f"sci.encoder.layers.{i}.", f"sci.layers.{i}.", shape, False))
    return {k: v.contiguous() for k, v in out.items()}
