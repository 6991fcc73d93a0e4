"""A sci-scale model with its SCI branch fused into the backbone, as a transformers model class.

Written into exported model directories and loaded with
``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)``. It depends on
transformers only (not on sci-scale), and reproduces sci-scale's logits for plain text:

    embeddings = backbone.embed_tokens(ids)
    states     = final_norm(SCI layers(proj_in(embeddings)))        # causal, RoPE base 10000
    hidden     = input of backbone layer k + gate * proj_out(states) # k = sci.fuse_layer

The SCI layers are Llama decoder layers (RMSNorm, multi-head attention without biases, SwiGLU),
which is what sci-scale builds them from. The contrastive head is not exported: it only feeds
the training loss.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GenerationMixin,
    LlamaConfig,
    PretrainedConfig,
)
from transformers.modeling_utils import PreTrainedModel
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)


class SciScaleConfig(PretrainedConfig):
    model_type = "sci_scale"

    def __init__(
        self,
        backbone: dict[str, Any] | None = None,
        sci: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self.backbone = backbone or {}
        self.sci = sci or {}
        super().__init__(**kwargs)

    def backbone_config(self) -> PretrainedConfig:
        fields = dict(self.backbone)
        return AutoConfig.for_model(fields.pop("model_type"), **fields)

    def sci_layer_config(self) -> LlamaConfig:
        s = self.sci
        return LlamaConfig(
            hidden_size=s["hidden_size"],
            num_attention_heads=s["num_attention_heads"],
            num_key_value_heads=s["num_attention_heads"],
            intermediate_size=s["ffn_hidden_size"],
            num_hidden_layers=s["num_layers"],
            rms_norm_eps=s["norm_epsilon"],
            rope_theta=s.get("rope_theta", 10000.0),
            max_position_embeddings=s.get("max_position_embeddings", 4096),
            attention_bias=False,
            mlp_bias=False,
            vocab_size=1,  # the branch has no embedding of its own
            bos_token_id=None,
            eos_token_id=None,
            pad_token_id=None,
        )


class SciBranch(nn.Module):
    def __init__(self, config: SciScaleConfig, backbone_hidden: int) -> None:
        super().__init__()
        layer_config = config.sci_layer_config()
        layer_config._attn_implementation = "eager"
        hidden = layer_config.hidden_size
        self.proj_in = nn.Linear(backbone_hidden, hidden, bias=False)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(layer_config, i) for i in range(layer_config.num_hidden_layers)
        )
        self.norm = LlamaRMSNorm(hidden, eps=layer_config.rms_norm_eps)
        self.rotary = LlamaRotaryEmbedding(layer_config)
        self.proj_out = nn.Linear(hidden, backbone_hidden, bias=False)
        self.gate = nn.Parameter(torch.zeros(backbone_hidden))

    def forward(
        self, embeddings: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``attention_mask`` (1 = token, 0 = padding, as transformers passes it): padding is
        never attended to and positions count real tokens only, so a left-padded row of a batch
        computes what it computes alone."""
        x = self.proj_in(embeddings)
        b, s, _ = x.shape
        low = torch.finfo(x.dtype).min
        causal = torch.full((s, s), low, device=x.device).triu(1)
        mask = causal[None, None].expand(b, 1, s, s)
        if attention_mask is None:
            positions = torch.arange(s, device=x.device).expand(b, s)
        else:
            keep = attention_mask.to(x.device).bool()
            positions = (keep.long().cumsum(-1) - 1).clamp_min(0)
            mask = mask.masked_fill(~keep[:, None, None, :], low)
        cos_sin = self.rotary(x, positions)
        for layer in self.layers:
            out = layer(x, attention_mask=mask, position_ids=positions, position_embeddings=cos_sin)
            x = out[0] if isinstance(out, tuple) else out
        return self.gate * self.proj_out(self.norm(x))


class SciScaleForCausalLM(PreTrainedModel, GenerationMixin):
    """``generate`` runs without a KV cache: the branch attends over the whole text, so every
    step computes the whole sequence (a cache would hand the branch the newest token alone)."""

    config_class = SciScaleConfig
    base_model_prefix = "backbone"
    _supports_sdpa = True

    def __init__(self, config: SciScaleConfig) -> None:
        super().__init__(config)
        self.backbone = AutoModelForCausalLM.from_config(config.backbone_config())
        hidden = self.backbone.config.hidden_size
        self.sci = SciBranch(config, hidden)
        self._fusion: torch.Tensor | None = None
        layer = self.backbone.model.layers[config.sci["fuse_layer"]]
        layer.register_forward_pre_hook(self._add_fusion, with_kwargs=True)
        self.post_init()
        self.generation_config.use_cache = False

    def _add_fusion(self, _module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if self._fusion is None:
            return args, kwargs
        fusion, self._fusion = self._fusion, None
        if "hidden_states" in kwargs:
            kwargs["hidden_states"] = kwargs["hidden_states"] + fusion
        else:
            args = (args[0] + fusion, *args[1:])
        return args, kwargs

    def get_input_embeddings(self) -> nn.Module:
        return self.backbone.get_input_embeddings()

    def prepare_inputs_for_generation(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        inputs: dict[str, Any] = {"input_ids": input_ids, "use_cache": False}
        if attention_mask is not None:  # positions of a left-padded row start at its text
            inputs["attention_mask"] = attention_mask
            inputs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        return inputs

    def forward(self, input_ids: torch.Tensor, **kwargs: Any) -> Any:
        kwargs.pop("past_key_values", None)
        kwargs["use_cache"] = False
        embeddings = self.backbone.get_input_embeddings()(input_ids)
        self._fusion = self.sci(embeddings, kwargs.get("attention_mask"))
        try:
            return self.backbone(input_ids=input_ids, **kwargs)
        finally:
            self._fusion = None
