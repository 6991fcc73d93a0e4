"""The one model: megatron-core's ``GPTModel`` (Llama-style) with the SCI branch beside it.

The backbone is megatron's own ``GPTModel``, built from a layer spec, untouched. The SCI branch
reads the shared embedding output and joins the residual stream at layer ``sci.fuse_layer``
through a forward pre-hook on that layer: megatron's ``TransformerBlock`` offers no injection
point, and a hook keeps its forward, its activation recomputation and the pipeline schedules
exactly as megatron ships them. The SCL gradient rides on the same hidden states (see
``losses.aux``), so only the first pipeline stage ever sees the branch.
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from megatron.core.enums import ModelType
from megatron.core.inference.contexts.static_context import StaticInferenceContext
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from sci_scale.config.errors import ConfigError
from sci_scale.config.schema import Config
from sci_scale.model.attention import ExampleLayout, example_layout
from sci_scale.model.decoding import branch_context
from sci_scale.model.init import check_constant_vectors, initialize_layout_independent
from sci_scale.model.sci_branch import SCI_ATTRIBUTE, SCIBranch, SCIContribution, SCIStats
from sci_scale.model.shapes import llama_ffn_size, padded_vocab_size
from sci_scale.model.specs import (
    TE,
    Implementation,
    kernel_fusion_flags,
    layer_spec,
    resolve_implementation,
    transformer_engine_available,
)
from sci_scale.runtime.device import autocast_dtype, current_device

log = logging.getLogger(__name__)


def model_vocab_size(cfg: Config, tokenizer_vocab: int) -> int:
    """The embedding's rows: ``model.vocab_size`` if set (it must hold every token id the
    tokenizer can produce), else the tokenizer's vocabulary."""
    rows = cfg.model.vocab_size
    if rows is None:
        return tokenizer_vocab
    if tokenizer_vocab > rows:
        raise ConfigError(
            f"the tokenizer has {tokenizer_vocab} tokens but the model's embedding has "
            f"model.vocab_size={rows} rows: ids >= {rows} would index past it; use the "
            "backbone's own tokenizer (data.tokenizer=HF_DIR)"
        )
    return rows


def backbone_transformer_config(
    cfg: Config, impl: Implementation | None = None
) -> TransformerConfig:
    m, p = cfg.model, cfg.parallel
    if impl is None:  # the machine's default implementation, not checked against the config
        impl = Implementation(
            TE if transformer_engine_available() else "local",
            m.attention_backend,
            current_device(),
        )
    dtype = torch.bfloat16 if m.params_dtype == "bf16" else torch.float32
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        ffn_hidden_size=m.ffn_hidden_size or llama_ffn_size(m.hidden_size),
        normalization="RMSNorm",
        layernorm_epsilon=m.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=m.hidden_dropout,
        attention_dropout=m.attention_dropout,
        init_method_std=m.init_method_std,
        kv_channels=m.head_dim,
        add_qkv_bias=m.qkv_bias,
        qk_layernorm=m.qk_layernorm,
        tensor_model_parallel_size=p.tensor,
        pipeline_model_parallel_size=p.pipeline,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline if p.virtual_pipeline > 1 else None,
        # Weights are allocated where they compute; their values are drawn layout-independently
        # afterwards (model.init). The CPU path keeps megatron's CPU initialization, which its
        # CPU compatibility layer is proven with.
        use_cpu_initialization=impl.device.type in ("cpu", "meta"),
        perform_initialization=impl.device.type != "meta",
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=m.params_dtype == "bf16",
        sequence_parallel=p.sequence_parallel,
        attention_backend=impl.megatron_attention_backend(),
        **kernel_fusion_flags(impl),
        cross_entropy_loss_fusion=False,
        batch_p2p_sync=False,
        **recompute_settings(m.recompute),
        **fp8_settings(m.fp8),
    )


def apply_llama3_rope_scaling(rotary: torch.nn.Module, cfg: Config) -> None:
    """Llama-3 RoPE frequency scaling with all four of its parameters.

    megatron's ``GPTModel(rope_scaling=True)`` fixes the low/high frequency factors and the
    original context at Llama 3.1's values (1, 4, 8192); imported models may differ (Llama 3.2
    has factor 32), so the frequencies are recomputed here with megatron's own scaling function.
    """
    m = cfg.model
    dim = rotary.inv_freq.numel() * 2
    base = 1.0 / (
        m.rotary_base ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim)
    )
    rotary.inv_freq = rotary._apply_scaling(
        base.to(rotary.inv_freq.device),
        factor=m.rope_scaling_factor,
        low_freq_factor=m.rope_low_freq_factor,
        high_freq_factor=m.rope_high_freq_factor,
        original_max_position_embeddings=m.rope_original_max_positions,
    )


def fp8_settings(recipe: str | None) -> dict[str, object]:
    """megatron's FP8 switches: E4M3 forward / E5M2 backward ("hybrid"), with Transformer
    Engine's delayed scaling or its per-tensor current scaling ("tensorwise")."""
    if recipe is None:
        return {}
    return {"fp8": "hybrid", "fp8_recipe": {"delayed": "delayed", "current": "tensorwise"}[recipe]}


def recompute_settings(mode: str) -> dict[str, object]:
    """megatron's activation recomputation: selective = core attention, full = every layer."""
    if mode == "selective":
        return {"recompute_granularity": "selective"}
    if mode == "full":
        return {
            "recompute_granularity": "full",
            "recompute_method": "uniform",
            "recompute_num_layers": 1,
        }
    return {}


class ModelOutput(NamedTuple):
    """What one forward returns.

    ``lm``: the per-token LM loss [b, s] when labels are given, the logits [b, s, vocab_padded
    / tp] otherwise; on a pipeline stage before the last, the hidden states the schedule sends
    on. ``sci``: the SCI branch's statistics for this micro-batch (first stage, when the
    branch computed its SCL), else None. The SCL's gradient is already attached to the hidden
    states with the weight passed to the forward."""

    lm: Tensor
    sci: SCIStats | None = None


class SCIGPTModel(MegatronModule):
    """megatron ``GPTModel`` + the SCI component (``sci.mode == "off"`` builds none)."""

    def __init__(
        self,
        cfg: Config,
        vocab_size: int,
        pre_process: bool = True,
        post_process: bool = True,
        use_te: bool | None = None,
        vp_stage: int | None = None,
        device: torch.device | None = None,
    ) -> None:
        device = device or current_device()
        if use_te is None:
            impl = resolve_implementation(cfg, device)
        else:  # an explicit choice (tests, tools)
            impl = Implementation(TE if use_te else "local", cfg.model.attention_backend, device)
        config = backbone_transformer_config(cfg, impl)
        super().__init__(config=config)
        self.model_type = ModelType.encoder_or_decoder  # read by megatron's schedules
        self.cfg = cfg
        self.impl = impl
        self.device = device
        self.vocab_size = vocab_size
        self.pre_process, self.post_process = pre_process, post_process
        self.spec_name = impl.describe()
        self.autocast_dtype = autocast_dtype(cfg.model.compute_dtype, device)
        # Everything is allocated on the run's device: megatron's modules by its own device
        # argument, the branch's plain torch modules through the device context.
        with device:
            self._build(cfg, config, impl, vocab_size, pre_process, post_process, vp_stage)
        # The SCI contribution waiting for the fusion layer's pre-hook, within one forward.
        self._pending: tuple[SCIContribution, float] | None = None
        if device.type != "meta":  # meta: shapes and checkpoint keys only (conversion plans)
            check_constant_vectors(self)
            initialize_layout_independent(
                self,
                seed=cfg.train.seed,
                std=cfg.model.init_method_std,
                layers={f"{SCI_ATTRIBUTE}.": cfg.sci.num_layers, "": cfg.model.num_layers},
            )
        self.apply_mode()

    def _build(
        self,
        cfg: Config,
        config: TransformerConfig,
        impl: Implementation,
        vocab_size: int,
        pre_process: bool,
        post_process: bool,
        vp_stage: int | None,
    ) -> None:
        if cfg.data.reset_attention_mask and impl.use_te:
            raise ConfigError(
                "data.reset_attention_mask=true needs model.transformer_impl=local: the "
                "backbone's per-document attention runs on sci-scale's SDPA attention, not on "
                "Transformer Engine's"
            )
        spec = layer_spec(impl, AttnMaskType.causal, cfg.model.qk_layernorm)
        self.gpt = GPTModel(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=padded_vocab_size(
                vocab_size, cfg.model.make_vocab_size_divisible_by, cfg.parallel.tensor
            ),
            max_sequence_length=cfg.model.seq_length,
            pre_process=pre_process,
            post_process=post_process,
            share_embeddings_and_output_weights=cfg.model.tie_embeddings,
            position_embedding_type="rope",
            rotary_base=int(cfg.model.rotary_base),
            parallel_output=True,
            vp_stage=vp_stage,
        )
        if cfg.model.rope_scaling_factor is not None:
            apply_llama3_rope_scaling(self.gpt.rotary_pos_emb, cfg)
        self.sci: SCIBranch | None = None
        if cfg.sci.mode != "off" and pre_process:
            self.sci = SCIBranch(cfg.sci, config, impl)
            if cfg.sci.fuse_layer > 0:
                layer = self.gpt.decoder.layers[cfg.sci.fuse_layer]
                layer.register_forward_pre_hook(self._fusion_hook, with_kwargs=True)

    # -- modes ---------------------------------------------------------------------------
    def apply_mode(self) -> None:
        """Freeze what ``sci.mode`` says is fixed: the backbone (sci_only) or the branch."""
        if self.sci is None:
            return
        if self.cfg.sci.mode == "sci_only":
            for p in self.gpt.parameters():
                p.requires_grad_(False)
        self.sci.apply_mode()

    @property
    def lm_trains(self) -> bool:
        """Whether the LM loss is optimised (every mode but sci_only)."""
        return self.cfg.sci.mode != "sci_only"

    # -- megatron hooks ------------------------------------------------------------------
    def set_input_tensor(self, input_tensor: Any) -> None:
        self.gpt.set_input_tensor(input_tensor)

    def _join_pending(self, hidden: Tensor) -> Tensor:
        if self._pending is None or self.sci is None:
            return hidden
        contribution, scl_weight = self._pending
        self._pending = None
        return self.sci.join(hidden, contribution, scl_weight)

    def _fusion_hook(
        self, _module: torch.nn.Module, args: tuple, kwargs: dict
    ) -> tuple[tuple, dict]:
        if "hidden_states" in kwargs:
            kwargs["hidden_states"] = self._join_pending(kwargs["hidden_states"])
        else:
            args = (self._join_pending(args[0]), *args[1:])
        return args, kwargs

    # -- forward -------------------------------------------------------------------------
    def _document_layout(self, example_ids: Tensor | None) -> ExampleLayout | None:
        """``data.reset_attention_mask``: each document (example) of a packed block attends
        to itself only, through the same unpacked per-example attention as the SCI branch
        (memory linear in the sequence; None when every row is one document)."""
        if not self.cfg.data.reset_attention_mask or example_ids is None:
            return None
        return example_layout(example_ids)

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor,
        labels: Tensor | None = None,
        loss_mask: Tensor | None = None,
        example_ids: Tensor | None = None,
        template_ids: Tensor | None = None,
        scl_weight: float = 0.0,
        collect_sci_embeddings: bool = False,
        inference_context: StaticInferenceContext | None = None,
    ) -> ModelOutput:
        """One micro-batch; ``scl_weight`` multiplies the SCL's gradient (the trainer passes
        ``alpha / num_microbatches``), ``collect_sci_embeddings`` returns the branch's z.
        ``inference_context``: megatron's static KV cache (a ``model.decoding.DecodeContext``,
        which holds the SCI branch's own); ``input_ids`` are then the tokens after the cached
        ones, and the logits are gathered over tensor-parallel ranks.

        Inputs are moved to the model's device (a no-op for the trainer's batches, which are
        there already); the forward runs under autocast at ``model.compute_dtype``."""
        input_ids, position_ids, labels, loss_mask, example_ids, template_ids = (
            None if t is None else t.to(self.device, non_blocking=True)
            for t in (input_ids, position_ids, labels, loss_mask, example_ids, template_ids)
        )
        with torch.autocast(
            self.device.type,
            dtype=self.autocast_dtype or torch.float32,
            enabled=self.autocast_dtype is not None,
        ):
            decoder_input, sci_stats = None, None
            if self.pre_process:
                decoder_input = self.gpt.embedding(input_ids=input_ids, position_ids=position_ids)
                if self.sci is not None:
                    if example_ids is None:
                        example_ids = torch.zeros_like(input_ids)
                    contribution = self.sci.contribute(
                        decoder_input,
                        example_ids,
                        template_ids,
                        collect_sci_embeddings,
                        inference_context=branch_context(inference_context),
                    )
                    sci_stats = contribution.stats
                    self._pending = (contribution, scl_weight)
                    if self.cfg.sci.fuse_layer == 0:
                        decoder_input = self._join_pending(decoder_input)
            try:
                lm = self.gpt(
                    input_ids,
                    position_ids,
                    attention_mask=self._document_layout(example_ids),
                    decoder_input=decoder_input,
                    labels=labels,
                    loss_mask=loss_mask,
                    inference_context=inference_context,
                    # megatron's inference path requires gathered logits
                    runtime_gather_output=True if inference_context is not None else None,
                )
            finally:
                self._pending = None
        return ModelOutput(lm, sci_stats)


class ModelChunks(torch.nn.ModuleList):
    """The model chunks of one pipeline rank with interleaved (virtual) stages.

    Checkpoints nest each chunk's sharded state under its own key; megatron matches tensors by
    their global keys (layer numbers include the virtual offset), so a checkpoint saved with or
    without virtual stages loads into either."""

    def sharded_state_dict(self, prefix: str = "", *args: Any, **kwargs: Any) -> dict:
        return {f"chunk{i}": c.sharded_state_dict(prefix) for i, c in enumerate(self)}

    def load_state_dict(self, state_dict: dict, strict: bool = True, assign: bool = False):  # type: ignore[override]
        for i, chunk in enumerate(self):
            chunk.load_state_dict(state_dict[f"chunk{i}"], strict=strict)
