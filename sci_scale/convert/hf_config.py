"""Hugging Face ``config.json`` <-> sci-scale's model section, for the Llama family.

Read from the raw JSON, so configs written by transformers 4.x (``rope_theta``, ``rope_scaling``)
and 5.x (``rope_parameters``) are both understood. Every field that changes the computation is
either mapped exactly or refused with an error naming it: an import never approximates.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sci_scale.config.schema import ModelSection
from sci_scale.errors import UserError
from sci_scale.model.shapes import llama_ffn_size

# architecture class -> model_type; SmolLM2 checkpoints are LlamaForCausalLM with tied embeddings
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
ROPE_TYPES = ("default", "llama3")
HF_CONFIG_FILE = "config.json"


class UnsupportedModelError(UserError, ValueError):
    """The Hugging Face model uses an architecture or a feature sci-scale does not reproduce."""


class ModelFileError(UnsupportedModelError):
    """A file of a model directory cannot be read (truncated download, not JSON, corrupt
    safetensors); the message names the file."""


def read_json(path: Path) -> Any:
    """A model directory's JSON file, or a one-line ModelFileError naming it and the place."""
    try:
        return json.loads(path.read_bytes())
    except json.JSONDecodeError as exc:
        raise ModelFileError(
            f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})"
        ) from None
    except UnicodeDecodeError as exc:
        raise ModelFileError(f"{path}: not valid JSON (not UTF-8 at byte {exc.start})") from None


def read_hf_config(hf_dir: Path) -> dict[str, Any]:
    path = hf_dir / HF_CONFIG_FILE
    if not path.is_file():
        raise UnsupportedModelError(f"{hf_dir} has no {HF_CONFIG_FILE}: not a Hugging Face model")
    hf = read_json(path)
    if not isinstance(hf, dict):
        raise ModelFileError(f"{path}: expected a JSON object, got {type(hf).__name__}")
    return hf


def architecture_of(hf: dict[str, Any]) -> str:
    archs = hf.get("architectures") or []
    supported = [a for a in archs if a in ARCHITECTURES]
    if not supported:
        raise UnsupportedModelError(
            f"architecture {', '.join(archs) or hf.get('model_type', '?')} is not supported; "
            f"sci-scale converts {', '.join(ARCHITECTURES)} (SmolLM2 is LlamaForCausalLM)"
        )
    return supported[0]


def rope_settings(hf: dict[str, Any]) -> tuple[str, float, dict[str, Any]]:
    """(rope type, theta, parameters) from either transformers generation of config keys."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    return rope_type, theta, params


def _refuse(condition: bool, field: str, value: Any, why: str) -> None:
    if condition:
        raise UnsupportedModelError(f"config field {field}={value!r} is not supported: {why}")


def model_section_from_hf(hf: dict[str, Any], seq_length: int | None = None) -> dict[str, Any]:
    """The ``model.*`` settings that reproduce this HF model (a dict for config overrides)."""
    arch = architecture_of(hf)
    kind = ARCHITECTURES[arch]
    heads = hf["num_attention_heads"]
    hidden = hf["hidden_size"]
    act = hf.get("hidden_act", "silu")
    _refuse(act != "silu", "hidden_act", act, "the MLP is SwiGLU (silu)")
    for field in ("attention_bias", "mlp_bias"):
        _refuse(bool(hf.get(field)), field, hf.get(field), "only Q/K/V biases (Qwen2) are built")
    if kind == "qwen3" and hf.get("use_sliding_window"):
        _refuse(True, "use_sliding_window", True, "Qwen3's per-layer sliding windows")
    _refuse(
        hf.get("partial_rotary_factor", 1.0) != 1.0,
        "partial_rotary_factor",
        hf.get("partial_rotary_factor"),
        "RoPE covers the whole head",
    )
    _refuse(
        hf.get("quantization_config") is not None,
        "quantization_config",
        "...",
        "import an unquantized checkpoint",
    )
    rope_type, theta, rope = rope_settings(hf)
    _refuse(rope_type not in ROPE_TYPES, "rope type", rope_type, f"supported: {ROPE_TYPES}")
    sliding = None
    if kind == "mistral":
        sliding = hf.get("sliding_window")
    if kind == "qwen2" and hf.get("use_sliding_window"):
        _refuse(True, "use_sliding_window", True, "Qwen2's per-layer sliding windows")
    max_pos = int(hf.get("max_position_embeddings", 4096))
    seq = seq_length or min(max_pos, 4096)
    if sliding is not None:
        seq = min(seq, int(sliding))
    section: dict[str, Any] = {
        "num_layers": hf["num_hidden_layers"],
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_query_groups": hf.get("num_key_value_heads") or heads,
        "ffn_hidden_size": hf["intermediate_size"],
        "seq_length": seq,
        "rotary_base": theta,
        "norm_epsilon": float(hf.get("rms_norm_eps", 1e-6)),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "vocab_size": hf["vocab_size"],
        # The vocabulary is not padded beyond what tensor parallelism needs: padded rows would
        # take part in the softmax and change the loss against the original model.
        "make_vocab_size_divisible_by": 1,
        "head_dim": hf.get("head_dim")
        if hf.get("head_dim", hidden // heads) != hidden // heads
        else None,
        "qkv_bias": kind == "qwen2",
        "qk_layernorm": kind == "qwen3",
        "sliding_window": int(sliding) if sliding is not None else None,
        "hidden_dropout": 0.0,
        "attention_dropout": float(hf.get("attention_dropout", 0.0)),
    }
    if rope_type == "llama3":
        section.update(
            rope_scaling_factor=float(rope["factor"]),
            rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
            rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
            rope_original_max_positions=int(rope.get("original_max_position_embeddings", 8192)),
        )
    return section


def hf_config_from_model(
    m: ModelSection, vocab: int, template: dict[str, Any] | None, dtype: str
) -> dict[str, Any]:
    """The ``config.json`` of an export: the imported original with the shape fields rewritten
    from the model (so a round trip is exact), or a fresh Llama (Qwen2 with Q/K/V biases)."""
    hf = dict(template or {})
    if not hf:
        arch = (
            "Qwen3ForCausalLM"
            if m.qk_layernorm
            else "Qwen2ForCausalLM"
            if m.qkv_bias
            else "LlamaForCausalLM"
        )
        hf = {
            "architectures": [arch],
            "model_type": ARCHITECTURES[arch],
            "hidden_act": "silu",
            "max_position_embeddings": m.seq_length,
            "bos_token_id": None,
            "eos_token_id": None,
        }
    hf.update(
        num_hidden_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_query_groups,
        intermediate_size=m.ffn_hidden_size or llama_ffn_size(m.hidden_size),
        rms_norm_eps=m.norm_epsilon,
        tie_word_embeddings=m.tie_embeddings,
        vocab_size=vocab,
    )
    hf["torch_dtype"] = dtype  # "bfloat16", "float32", "float16"; transformers 5 reads it too
    if m.head_dim is not None or hf.get("model_type") == "qwen3":  # Qwen3's default is 128
        hf["head_dim"] = m.head_dim or m.hidden_size // m.num_attention_heads
    if "rope_parameters" not in hf and "rope_scaling" not in hf:
        hf["rope_theta"] = m.rotary_base
        if m.rope_scaling_factor is not None:
            hf["rope_scaling"] = {
                "rope_type": "llama3",
                "factor": m.rope_scaling_factor,
                "low_freq_factor": m.rope_low_freq_factor,
                "high_freq_factor": m.rope_high_freq_factor,
                "original_max_position_embeddings": m.rope_original_max_positions,
            }
    return hf
