"""Layer specs: which megatron-core modules a transformer layer is composed from.

The same model is built from one of two specs, chosen once at start and logged:
- Transformer Engine (fused/flash attention, FP8-capable linears) when ``transformer_engine``
  imports and a GPU is present;
- megatron's local modules with SDPA core attention everywhere else (CPU, CI, laptops).
"""

from __future__ import annotations

import copy
import importlib.util
import logging

import torch
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec

from sci_scale.model.attention import SDPAttention, sdpa_backend_name

log = logging.getLogger(__name__)


def transformer_engine_available() -> bool:
    """True when TE can be used: it is installed and a GPU is present (TE needs cuDNN)."""
    if not torch.cuda.is_available() or importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        import transformer_engine  # noqa: F401
    except Exception as exc:  # TE raises various errors when its CUDA libraries are missing
        log.warning("transformer_engine is installed but failed to import: %s", exc)
        return False
    return True


def local_layer_spec(attn_mask_type: AttnMaskType = AttnMaskType.causal) -> ModuleSpec:
    spec = copy.deepcopy(get_gpt_layer_local_spec(normalization="RMSNorm"))
    attention = spec.submodules.self_attention
    attention.submodules.core_attention = SDPAttention
    attention.params = {**(attention.params or {}), "attn_mask_type": attn_mask_type}
    return spec


def te_layer_spec(attn_mask_type: AttnMaskType = AttnMaskType.causal) -> ModuleSpec:
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_with_transformer_engine_spec,
    )

    spec = copy.deepcopy(get_gpt_layer_with_transformer_engine_spec())
    attention = spec.submodules.self_attention
    attention.params = {**(attention.params or {}), "attn_mask_type": attn_mask_type}
    return spec


def select_layer_spec(
    attn_mask_type: AttnMaskType = AttnMaskType.causal, use_te: bool | None = None
) -> tuple[ModuleSpec, str]:
    """The layer spec for this machine and a human-readable name of the chosen path."""
    if use_te is None:
        use_te = transformer_engine_available()
    if use_te:
        return te_layer_spec(attn_mask_type), "transformer-engine"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return local_layer_spec(attn_mask_type), f"megatron local + {sdpa_backend_name(device)}"


def kernel_fusion_flags() -> dict[str, bool]:
    """TransformerConfig switches for megatron's fused kernels, all off: each needs Apex or
    Transformer Engine kernels that the local spec does not have. Shared by the backbone and the
    SCI branch so both run the same kernels."""
    return {
        "bias_activation_fusion": False,
        "masked_softmax_fusion": False,
        "persist_layer_norm": False,
        "apply_rope_fusion": False,
        "gradient_accumulation_fusion": False,
    }
