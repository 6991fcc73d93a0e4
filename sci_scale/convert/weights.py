"""Tensor layouts: Hugging Face Llama-family names and shapes <-> megatron-core's GPTModel.

One table (:func:`model_recipes`) says, for every megatron tensor of a model, which HF tensors
it is made of and how (``merge``), and how to take it apart again (``split``); import and
export both read it, so the two directions cannot drift. The table is per tensor, so a
conversion can produce one tensor at a time and never hold the model.

Both sides use RoPE on the rotate-half layout, so query and key rows are copied as they are. The
differences are packing:
- megatron fuses Q, K and V into one ``linear_qkv`` whose rows are grouped per key/value head:
  ``[q rows of the group's query heads, k rows, v rows]`` for each group in turn (this is where
  grouped-query conversions usually go wrong: a plain ``cat(q, k, v)`` is only right for one
  group);
- megatron fuses SwiGLU's gate and up projections into ``linear_fc1`` as ``[gate; up]``;
- megatron's embedding and output layer have the vocabulary padded to a multiple that divides
  evenly over tensor-parallel ranks; the padding rows are zero on import and dropped on export.

Tensors are whole (TP=1); megatron's distributed checkpointing shards them to any layout.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from sci_scale.config.schema import ModelSection, SciSection
from sci_scale.errors import UserError

HF_PREFIX = "model."
MEGATRON_PREFIX = "gpt."
SCI_PREFIX = "sci."
# Buffers some exports carry that are derived from the config, not weights.
DERIVED_SUFFIXES = ("rotary_emb.inv_freq",)


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


@dataclass(frozen=True)
class Recipe:
    """One megatron tensor: the HF tensors it is made of, ``merge`` (HF -> megatron) and
    ``split`` (megatron -> HF, in the order of ``hf``)."""

    hf: tuple[str, ...]
    merge: Callable[[list[Tensor]], Tensor]
    split: Callable[[Tensor], list[Tensor]]


def _copy(name: str) -> Recipe:
    return Recipe((name,), lambda ts: ts[0], lambda t: [t])


def _vocab(name: str, padded: int, vocab: int) -> Recipe:
    def pad(ts: list[Tensor]) -> Tensor:
        weight = ts[0]
        if weight.shape[0] != vocab:
            raise WeightMappingError(
                f"{name} has {weight.shape[0]} rows; the config's vocab_size is {vocab}"
            )
        if padded == vocab:  # imports keep the vocabulary unpadded: no copy
            return weight
        out = weight.new_zeros(padded, *weight.shape[1:])
        out[:vocab] = weight
        return out

    return Recipe((name,), pad, lambda t: [t[:vocab]])


def _layer_recipes(
    src: str, dst: str, shape: AttentionShape, qkv_bias: bool, qk_norm: bool
) -> dict[str, Recipe]:
    """One transformer layer: megatron names under ``src`` <- HF names under ``dst``."""
    attn = f"{dst}self_attn."

    def qkv(kind: str) -> Recipe:
        names = tuple(f"{attn}{p}_proj.{kind}" for p in "qkv")
        return Recipe(names, lambda ts: pack_qkv(*ts, shape), lambda t: list(unpack_qkv(t, shape)))

    out = {
        f"{src}input_layernorm.weight": _copy(f"{dst}input_layernorm.weight"),
        f"{src}self_attention.linear_qkv.weight": qkv("weight"),
        f"{src}self_attention.linear_proj.weight": _copy(f"{attn}o_proj.weight"),
        f"{src}pre_mlp_layernorm.weight": _copy(f"{dst}post_attention_layernorm.weight"),
        f"{src}mlp.linear_fc1.weight": Recipe(
            (f"{dst}mlp.gate_proj.weight", f"{dst}mlp.up_proj.weight"),
            torch.cat,
            lambda t: list(torch.chunk(t, 2)),
        ),
        f"{src}mlp.linear_fc2.weight": _copy(f"{dst}mlp.down_proj.weight"),
    }
    if qkv_bias:
        out[f"{src}self_attention.linear_qkv.bias"] = qkv("bias")
    if qk_norm:  # Qwen3: RMSNorm over each head's queries and keys
        out[f"{src}self_attention.q_layernorm.weight"] = _copy(f"{attn}q_norm.weight")
        out[f"{src}self_attention.k_layernorm.weight"] = _copy(f"{attn}k_norm.weight")
    return out


def model_recipes(m: ModelSection, vocab: int, padded_vocab: int) -> dict[str, Recipe]:
    """Every backbone tensor of a SCIGPTModel (state-dict names), in the model's order."""
    mp, hp = MEGATRON_PREFIX, HF_PREFIX
    shape = AttentionShape.of(m)
    out = {
        f"{mp}embedding.word_embeddings.weight": _vocab(
            f"{hp}embed_tokens.weight", padded_vocab, vocab
        )
    }
    for i in range(m.num_layers):
        out.update(
            _layer_recipes(
                f"{mp}decoder.layers.{i}.", f"{hp}layers.{i}.", shape, m.qkv_bias, m.qk_layernorm
            )
        )
    out[f"{mp}decoder.final_layernorm.weight"] = _copy(f"{hp}norm.weight")
    if not m.tie_embeddings:
        out[f"{mp}output_layer.weight"] = _vocab("lm_head.weight", padded_vocab, vocab)
    return out


def sci_branch_recipes(sci: SciSection) -> dict[str, Recipe]:
    """The SCI branch's fusion path (what changes logits) as ``modeling_sci_scale`` names it.

    Its layers are multi-head (one key/value head per query head) and bias-free."""
    shape = AttentionShape(
        sci.num_attention_heads, sci.num_attention_heads, sci.hidden_size // sci.num_attention_heads
    )
    out = {
        "sci.proj_in.weight": _copy("sci.proj_in.weight"),
        "sci.proj_out.weight": _copy("sci.proj_out.weight"),
        "sci.gate": _copy("sci.gate"),
        "sci.encoder.final_layernorm.weight": _copy("sci.norm.weight"),
    }
    for i in range(sci.num_layers):
        out.update(
            _layer_recipes(f"sci.encoder.layers.{i}.", f"sci.layers.{i}.", shape, False, False)
        )
    return out


def check_hf_names(recipes: dict[str, Recipe], available: set[str], where: str) -> None:
    """Every tensor the model needs is there and every tensor there has a place: an import
    never leaves a weight random or drops one silently."""
    needed = {name for r in recipes.values() for name in r.hf}
    missing = sorted(needed - available)
    if missing:
        raise WeightMappingError(
            f"{where} has no tensor {missing[0]!r}"
            + (f" (and {len(missing) - 1} more missing)" if len(missing) > 1 else "")
        )
    leftover = sorted(
        n for n in available - needed if not n.endswith(DERIVED_SUFFIXES) and n != "lm_head.weight"
    )
    if leftover:
        raise WeightMappingError(
            f"{len(leftover)} tensor(s) of {where} have no place in the sci-scale model (no "
            f"mapping for them): {', '.join(leftover[:5])}{' ...' if len(leftover) > 5 else ''}"
        )


def check_model_names(weights: list[str], recipes: dict[str, Recipe]) -> None:
    """Every backbone weight of the sci-scale model has a recipe and every recipe a weight:
    neither direction leaves a weight random or drops one silently (the SCI branch's
    training-only parts, which no export carries, are the one exception by design)."""
    unmapped = sorted(n for n in set(weights) - set(recipes) if n.startswith(MEGATRON_PREFIX))
    if unmapped:
        raise WeightMappingError(
            f"no Hugging Face tensor maps to {', '.join(unmapped[:5])}"
            f"{' ...' if len(unmapped) > 5 else ''}"
        )
    absent = sorted(set(recipes) - set(weights))
    if absent:
        raise WeightMappingError(f"the model has no weight {', '.join(absent[:5])}")


def megatron_tensor(recipe: Recipe, read: Callable[[str], Tensor]) -> Tensor:
    """One megatron tensor, its HF parts read one by one."""
    return recipe.merge([read(name) for name in recipe.hf])


def hf_tensors(recipes: dict[str, Recipe], tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """The HF tensors of the megatron tensors given (any subset of ``recipes``: a layer, the
    whole model), in the recipes' order, each contiguous."""
    out: dict[str, Tensor] = {}
    for name, recipe in recipes.items():
        if name in tensors:
            for hf_name, part in zip(recipe.hf, recipe.split(tensors[name]), strict=True):
                out[hf_name] = part.contiguous()
    return out
