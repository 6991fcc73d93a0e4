"""Layer specs: which megatron-core modules a transformer layer is composed from.

The same model is built from one of two specs, chosen once at start from
``model.transformer_impl`` and what the machine offers, and logged:
- Transformer Engine (fused/flash attention, FP8-capable linears, sequence parallelism);
- megatron's local modules with SDPA core attention (CPU, CI, laptops, GPUs without TE), or
  megatron's own softmax attention with ``model.attention_backend=local``.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
from dataclasses import dataclass

import torch
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnBackend, AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec

from sci_scale.config.errors import ConfigError
from sci_scale.config.schema import Config
from sci_scale.model.attention import SDPAttention, sdpa_backend_name

log = logging.getLogger(__name__)

TE = "transformer_engine"


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


@dataclass(frozen=True)
class Implementation:
    """What the model is built from on this machine: the resolved ``model.transformer_impl``
    and ``model.attention_backend`` for ``device``."""

    transformer: str  # "local" or "transformer_engine"
    attention_backend: str  # auto | flash | fused | unfused | local
    device: torch.device

    @property
    def use_te(self) -> bool:
        return self.transformer == TE

    def megatron_attention_backend(self) -> AttnBackend:
        """What megatron's TransformerConfig is told. It turns the value into Transformer
        Engine's NVTE_*_ATTN switches; the local spec's SDPA reads ours, so megatron is told
        ``auto`` there (its environment switches then stay consistent within a process)."""
        return AttnBackend[self.attention_backend] if self.use_te else AttnBackend.auto

    def describe(self) -> str:
        if self.use_te:
            return f"transformer-engine (attention {self.attention_backend})"
        if self.attention_backend == "local":
            return "megatron local + megatron softmax attention"
        return f"megatron local + {sdpa_backend_name(self.device, self.attention_backend)}"


def resolve_implementation(cfg: Config, device: torch.device) -> Implementation:
    """The implementation ``cfg`` asks for on ``device``, or a ConfigError saying why not."""
    m, p = cfg.model, cfg.parallel
    te_here = device.type == "cuda" and transformer_engine_available()
    impl = m.transformer_impl
    if impl == "auto":
        impl = TE if te_here else "local"
    if impl == TE and not te_here:
        why = "this process runs on the CPU" if device.type != "cuda" else "it does not import"
        raise ConfigError(
            f"model.transformer_impl=transformer_engine but Transformer Engine cannot be used "
            f"({why}); install the [gpu] extra on a GPU node or use model.transformer_impl=local"
        )
    if m.fp8 is not None and impl != TE:
        raise ConfigError(
            f"model.fp8={m.fp8} needs Transformer Engine on a GPU; this machine builds the "
            f"megatron local spec, which has no FP8 kernels"
        )
    if p.sequence_parallel and impl != TE:
        raise ConfigError(
            "parallel.sequence_parallel=true needs Transformer Engine: megatron's local RMSNorm "
            "does not support sequence parallelism, and this machine builds the local spec"
        )
    if m.attention_backend in ("flash", "fused") and device.type != "cuda":
        raise ConfigError(
            f"model.attention_backend={m.attention_backend} is a GPU kernel and this process "
            f"runs on {device}; use auto or unfused"
        )
    if m.compute_dtype == "bf16" and device.type != "cuda":
        raise ConfigError(
            f"model.compute_dtype=bf16 on {device}: bf16 compute is autocast over the fp32 "
            "weights, and megatron's linear layers replay autocast in their backward for CUDA "
            "only; use model.compute_dtype=fp32 (or auto) on the CPU"
        )
    if m.attention_backend == "local" and device.type != "cuda":
        raise ConfigError(
            "model.attention_backend=local is megatron's own softmax attention, which builds its "
            "causal mask on CUDA; on the CPU use auto or unfused (SDPA's math kernel)"
        )
    if m.attention_backend == "local" and impl == TE:
        raise ConfigError(
            "model.attention_backend=local is megatron's own core attention of the local spec; "
            "with Transformer Engine choose flash, fused, unfused or auto"
        )
    return Implementation(impl, m.attention_backend, device)


def local_layer_spec(
    attn_mask_type: AttnMaskType = AttnMaskType.causal,
    attention_backend: str = "auto",
    qk_layernorm: bool = False,
) -> ModuleSpec:
    spec = copy.deepcopy(
        get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=qk_layernorm)
    )
    attention = spec.submodules.self_attention
    attention.submodules.core_attention = (
        DotProductAttention
        if attention_backend == "local"
        else ModuleSpec(module=SDPAttention, params={"sdpa_backend": attention_backend})
    )
    attention.params = {**(attention.params or {}), "attn_mask_type": attn_mask_type}
    return spec


def te_layer_spec(
    attn_mask_type: AttnMaskType = AttnMaskType.causal, qk_layernorm: bool = False
) -> ModuleSpec:
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_with_transformer_engine_spec,
    )

    spec = copy.deepcopy(get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm))
    attention = spec.submodules.self_attention
    attention.params = {**(attention.params or {}), "attn_mask_type": attn_mask_type}
    return spec


def layer_spec(
    impl: Implementation, attn_mask_type: AttnMaskType, qk_layernorm: bool = False
) -> ModuleSpec:
    """``qk_layernorm``: RMSNorm over each head's queries and keys before RoPE (Qwen3)."""
    if impl.use_te:
        return te_layer_spec(attn_mask_type, qk_layernorm)
    return local_layer_spec(attn_mask_type, impl.attention_backend, qk_layernorm)


def select_layer_spec(
    attn_mask_type: AttnMaskType = AttnMaskType.causal, use_te: bool | None = None
) -> tuple[ModuleSpec, str]:
    """The layer spec for this machine's defaults and a human-readable name of the path."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if use_te is None:
        use_te = transformer_engine_available()
    impl = Implementation(TE if use_te else "local", "auto", device)
    return layer_spec(impl, attn_mask_type), impl.describe()


def kernel_fusion_flags(impl: Implementation | None = None) -> dict[str, bool]:
    """TransformerConfig switches for megatron's fused kernels, shared by the backbone and the
    SCI branch so both run the same kernels.

    On CUDA: the SwiGLU fusion (megatron's own compiled kernel, no extra package) and, with
    Transformer Engine, TE's fused RoPE. Always off: the masked-softmax and persistent
    layer-norm kernels (Apex; SDPA and TE replace them) and gradient-accumulation fusion
    (it accumulates into megatron DDP's ``main_grad``, which sci-scale's DeepSpeed/plain
    optimizer path does not have). On the CPU everything is off: the kernels are CUDA-only.
    """
    on_gpu = impl is not None and impl.device.type == "cuda"
    return {
        "bias_activation_fusion": on_gpu,
        "masked_softmax_fusion": False,
        "persist_layer_norm": False,
        "apply_rope_fusion": on_gpu and impl is not None and impl.use_te,
        "gradient_accumulation_fusion": False,
    }
