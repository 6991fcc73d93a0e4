"""The SCI encoder branch: a small causal transformer beside the backbone.

tokens -> shared embedding -> proj_in -> SCI blocks (causal, within each example) -> proj_out
      -> gated add into the backbone's residual stream at layer ``sci.fuse_layer``
                                            \\-> pool per example -> head -> z (L2-normalised)

The blocks are a megatron-core ``TransformerBlock`` with their own config, so the branch is
tensor-parallel and takes the Transformer Engine spec on GPU like the backbone. The gate starts at
zero: with it at zero the model's logits equal the backbone's bit for bit.

Attention within each example uses no dense mask: on the local spec the blocks get an
``ExampleLayout`` in place of a mask, and the core attention unpacks each example (a contiguous
run of one example id; padding is a run of its own) into its own row, grouped by width, with
plain causal SDPA per group (see ``model.attention``); on Transformer Engine the examples are
packed sequences (THD, ``cu_seqlens``) for its varlen kernels. Both keep memory linear in the
sequence length, where a dense ``[b, 1, s, s]`` mask costs 64 M entries per sample at seq 8192,
and both let flash/fused kernels run. The branch is still one call of one ``TransformerBlock``,
so ZeRO-3's per-module parameter gathers stay in step across data-parallel ranks.

The branch is one component with an explicit interface towards the model and the trainer:

- what it adds to the forward: :meth:`SCIBranch.contribute` turns the shared embeddings of a
  micro-batch into an :class:`SCIContribution` (the gated fusion for the residual stream and the
  SCL), and :meth:`SCIBranch.join` adds it to the hidden states at ``sci.fuse_layer``;
- the auxiliary loss: the SCL rides on the joined hidden states (``losses.aux``) with the weight
  the caller passes for the step, and is reported in the model's output as :class:`SCIStats`;
- the parameters it owns (encoder, heads, gate, temperature): :func:`is_sci_parameter` names
  them for optimizer groups and parameter counts, :meth:`SCIBranch.apply_mode` freezes them;
- the metrics: :class:`SCIStats` per micro-batch (SCL, anchors, positive/negative cosine, and
  the embeddings on request), summarised by ``train.sci_health``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.inference.contexts.static_context import StaticInferenceContext
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from sci_scale.config.schema import SciSection
from sci_scale.losses.aux import attach_aux_loss
from sci_scale.losses.gather import gather_examples, max_example_count
from sci_scale.losses.scl import SCLOutput, Temperature, supervised_contrastive_loss
from sci_scale.model.attention import ExampleLayout, example_layout
from sci_scale.model.specs import Implementation, kernel_fusion_flags, layer_spec

# Where the SCI component sits in the model: every parameter under this attribute is its own.
SCI_ATTRIBUTE = "sci"


def is_sci_parameter(name: str) -> bool:
    """Whether a parameter (by its name in the model, chunk prefixes allowed) is the branch's."""
    return f".{SCI_ATTRIBUTE}." in f".{name}"


class SCIStats(NamedTuple):
    """What the branch measured on one micro-batch: detached values, for metrics only.

    ``scl`` is this rank's share of the (global, with data parallelism) SCL; ``embeddings`` and
    ``templates`` are this rank's L2-normalised z and their template ids, on the CPU, when the
    caller asked for them (evaluation)."""

    scl: float
    num_anchors: int
    pos_cos: float
    neg_cos: float
    embeddings: Tensor | None = None
    templates: Tensor | None = None


@dataclass
class SCIContribution:
    """What the branch adds to one micro-batch's forward: the gated fusion for the residual
    stream (sequence-sharded like it under sequence parallelism), the differentiable SCL, and
    its statistics. Each part is None when the micro-batch does not produce it."""

    fusion: Tensor | None = None
    scl: SCLOutput | None = None
    stats: SCIStats | None = None


def example_attention_mask(example_ids: Tensor) -> Tensor:
    """[b, s] example ids -> [b, 1, s, s] megatron mask (True = masked): the dense definition
    of per-example causal attention, kept as the reference the unpacked path is tested against.

    A token attends to earlier tokens of its own example only: causal, and an anchor never sees
    its partner (or the invariance would be trivial). Padding (id -1) attends within padding,
    so no row is fully masked.
    """
    s = example_ids.size(1)
    causal = torch.ones(s, s, dtype=torch.bool, device=example_ids.device).tril()
    same = example_ids[:, :, None] == example_ids[:, None, :]
    return ~(causal[None] & same)[:, None]


class SCIBranch(MegatronModule):
    """The structural encoder, its fusion into the backbone and its embedding head."""

    def __init__(
        self,
        sci: SciSection,
        backbone_config: TransformerConfig,
        impl: Implementation,
    ) -> None:
        sci_heads = sci.num_attention_heads
        config = TransformerConfig(
            num_layers=sci.num_layers,
            hidden_size=sci.hidden_size,
            num_attention_heads=sci_heads,
            ffn_hidden_size=sci.ffn_hidden_size or 4 * sci.hidden_size,
            normalization="RMSNorm",
            gated_linear_unit=True,
            activation_func=F.silu,
            add_bias_linear=False,
            layernorm_epsilon=backbone_config.layernorm_epsilon,
            init_method_std=backbone_config.init_method_std,
            hidden_dropout=backbone_config.hidden_dropout,
            attention_dropout=backbone_config.attention_dropout,
            tensor_model_parallel_size=backbone_config.tensor_model_parallel_size,
            # The branch lives whole on the first pipeline stage.
            pipeline_model_parallel_size=1,
            # It attends over unpacked examples, whole: the sequence is never sharded here.
            sequence_parallel=False,
            use_cpu_initialization=backbone_config.use_cpu_initialization,
            perform_initialization=backbone_config.perform_initialization,
            params_dtype=backbone_config.params_dtype,
            bf16=backbone_config.bf16,
            attention_backend=backbone_config.attention_backend,
            fp8=backbone_config.fp8,
            fp8_recipe=backbone_config.fp8_recipe,
            **kernel_fusion_flags(impl),
        )
        super().__init__(config=config)
        self.sci = sci
        self.use_te = impl.use_te
        # The backbone's embedding output is sequence-sharded under sequence parallelism.
        self.sequence_parallel = backbone_config.sequence_parallel
        spec = layer_spec(impl, AttnMaskType.causal)
        hidden = backbone_config.hidden_size
        dtype = backbone_config.params_dtype
        self.proj_in = torch.nn.Linear(hidden, sci.hidden_size, bias=False, dtype=dtype)
        self.rotary = RotaryEmbedding(
            kv_channels=sci.hidden_size // sci_heads, rotary_percent=1.0, rotary_base=10000
        )
        self.encoder = TransformerBlock(config, spec, post_layer_norm=True)
        self.proj_out = torch.nn.Linear(sci.hidden_size, hidden, bias=False, dtype=dtype)
        self.gate = torch.nn.Parameter(torch.zeros(hidden, dtype=dtype))
        if sci.pooling == "attention":
            self.pool_query = torch.nn.Parameter(torch.zeros(sci.hidden_size, dtype=dtype))
        self.head = torch.nn.Sequential(
            torch.nn.Linear(sci.hidden_size, sci.hidden_size, dtype=dtype),
            torch.nn.GELU(),
            torch.nn.Linear(sci.hidden_size, sci.embed_dim, dtype=dtype),
        )
        for module in (self.proj_in, self.proj_out, self.head[0], self.head[2]):
            torch.nn.init.normal_(module.weight, std=backbone_config.init_method_std)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        self.temperature = Temperature(sci.tau, sci.learnable_tau, sci.tau_min, sci.tau_max)

    # -- the parameters it owns -------------------------------------------------------------
    @property
    def trains_scl(self) -> bool:
        """Whether the SCL's gradient is applied (``sci.mode`` joint or sci_only)."""
        return self.sci.mode in ("joint", "sci_only")

    def apply_mode(self) -> None:
        """``sci.mode=frozen``: the branch keeps its weights; only the fusion (gate and output
        projection) learns from the LM loss."""
        if self.sci.mode != "frozen":
            return
        for module in (self.proj_in, self.encoder, self.head, self.temperature):
            for p in module.parameters():
                p.requires_grad_(False)
        if self.sci.pooling == "attention":
            self.pool_query.requires_grad_(False)

    # -- what it adds to the forward --------------------------------------------------------
    def contribute(
        self,
        embeddings: Tensor,
        example_ids: Tensor,
        template_ids: Tensor | None,
        collect_embeddings: bool = False,
        inference_context: StaticInferenceContext | None = None,
    ) -> SCIContribution:
        """The fusion and SCL of one micro-batch from the backbone's embedding output [s, b, h]
        (with ``inference_context``, the branch's own KV cache: the tokens after the cached ones).

        With data parallelism the SCL contrasts every rank's examples (``losses.gather``); every
        rank then runs the branch whenever any rank has an example, since the gather's backward
        is a collective."""
        local_count = 0 if template_ids is None else int((template_ids >= 0).sum())
        dp_group = _data_parallel_group()
        n_max = local_count if dp_group is None else max_example_count(local_count, dp_group)
        if not self.sci.fuse and n_max == 0:
            return SCIContribution()  # nothing to fuse and nothing to contrast: skip the branch
        states = self.encode(self._whole_sequence(embeddings), example_ids, inference_context)
        fusion = self._sequence_shard(self.fusion(states)) if self.sci.fuse else None
        if n_max == 0:
            return SCIContribution(fusion=fusion)
        assert template_ids is not None
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.trains_scl):
            z, templates = self.embed(states, example_ids, template_ids)
            if dp_group is None:
                scl = supervised_contrastive_loss(z, templates, self.temperature())
            else:
                g = gather_examples(z, templates, n_max, dp_group)
                scl = supervised_contrastive_loss(
                    g.z, g.templates, self.temperature(), anchors=g.local, ranks=dp_group.size()
                )
        stats = SCIStats(float(scl.loss.detach()), scl.num_anchors, scl.pos_cos, scl.neg_cos)
        if collect_embeddings:
            stats = stats._replace(
                embeddings=z.detach().float().cpu(), templates=templates.detach().cpu()
            )
        return SCIContribution(fusion=fusion, scl=scl, stats=stats)

    def join(self, hidden: Tensor, contribution: SCIContribution, scl_weight: float) -> Tensor:
        """``hidden`` + the fusion, carrying ``scl_weight`` x SCL into the backward pass."""
        if contribution.fusion is not None:
            hidden = hidden + contribution.fusion
        scl = contribution.scl
        if scl is not None and self.trains_scl and scl.loss.requires_grad:
            # Attached even when this rank has no anchor of its own: with data parallelism the
            # backward of the embedding all-gather is a collective every rank must enter.
            hidden = attach_aux_loss(hidden, scl.loss, scl_weight)
        return hidden

    def _whole_sequence(self, embeddings: Tensor) -> Tensor:
        """The branch sees whole examples: with sequence parallelism the embedding output is
        sharded over the sequence, so it is gathered (its gradient, identical on every
        tensor rank, is split back rather than summed)."""
        if not self.sequence_parallel:
            return embeddings
        return tensor_parallel.gather_from_sequence_parallel_region(
            embeddings, tensor_parallel_output_grad=False
        )

    def _sequence_shard(self, fusion: Tensor) -> Tensor:
        if not self.sequence_parallel:
            return fusion
        return tensor_parallel.scatter_to_sequence_parallel_region(fusion)

    # -- checkpoints --------------------------------------------------------------------------
    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None
    ) -> dict:
        """The temperature's checkpoint key stays ``temperature.log_tau`` (beside the branch),
        where checkpoints written before it belonged to the branch keep it."""
        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        owner = f"{prefix}temperature."
        model_prefix = prefix.removesuffix(f"{SCI_ATTRIBUTE}.")
        for value in state.values():
            key = getattr(value, "key", None)
            if isinstance(key, str) and key.startswith(owner):
                value.key = model_prefix + key[len(prefix) :]
        return state

    def encode(
        self,
        embeddings: Tensor,
        example_ids: Tensor,
        inference_context: StaticInferenceContext | None = None,
    ) -> Tensor:
        """SCI states [s, b, h_sci] from the shared embeddings [s, b, h]; a token attends to
        the earlier tokens of its own example only. With ``inference_context`` (incremental
        decoding, one example per row) the earlier tokens' keys and values come from its cache,
        and megatron slices the rotary table, built for the cache's whole length, at its offset."""
        x = self.proj_in(embeddings)
        if inference_context is not None:
            return self.encoder(
                hidden_states=x,
                attention_mask=None,
                rotary_pos_emb=self.rotary(inference_context.max_sequence_length),
                inference_context=inference_context,
            )
        rotary = self.rotary(x.size(0))
        layout = example_layout(example_ids)
        if layout is not None and self.use_te:
            return self._encode_packed(x, rotary, layout)
        return self.encoder(hidden_states=x, attention_mask=layout, rotary_pos_emb=rotary)

    def _encode_packed(self, x: Tensor, rotary: Tensor, layout: ExampleLayout) -> Tensor:
        """Transformer Engine's attention takes the examples as packed sequences (THD with
        ``cu_seqlens``), its own varlen kernels; the block is laid out as one long row."""
        s, b, h = x.shape
        starts = torch.cat([g.index[:, 0] for g in layout.groups]).sort().values.to(torch.int32)
        cu_seqlens = torch.cat([starts, starts.new_tensor([b * s])])
        max_len = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        packed = PackedSeqParams(
            qkv_format="thd",
            cu_seqlens_q=cu_seqlens,
            cu_seqlens_kv=cu_seqlens,
            max_seqlen_q=max_len,
            max_seqlen_kv=max_len,
        )
        rows = x.transpose(0, 1).reshape(b * s, 1, h)
        out = self.encoder(
            hidden_states=rows,
            attention_mask=None,
            rotary_pos_emb=self.rotary(max_len),
            packed_seq_params=packed,
        )
        return out.reshape(b, s, -1).transpose(0, 1)

    def fusion(self, states: Tensor) -> Tensor:
        """What is added to the backbone's residual stream: ``gate * proj_out(s)``."""
        return self.gate * self.proj_out(states)

    def pool(self, states: Tensor, example_ids: Tensor, num_examples: int) -> Tensor:
        """Per-example vectors [b, E, h_sci] pooled over each example's tokens."""
        onehot = (
            example_ids[:, None, :]
            == torch.arange(num_examples, device=states.device)[None, :, None]
        )  # [b, E, s]
        weights = onehot.to(states.dtype)
        if self.sci.pooling == "mean":
            weights = weights / weights.sum(-1, keepdim=True).clamp_min(1.0)
        elif self.sci.pooling == "last":
            positions = torch.arange(example_ids.size(1), device=states.device)
            last = torch.where(onehot, positions, -1).amax(-1, keepdim=True)  # [b, E, 1]
            weights = (positions[None, None, :] == last).to(states.dtype)
        else:  # attention pooling with a learned query
            scores = torch.einsum("sbh,h->bs", states, self.pool_query)[:, None, :]
            scores = scores.masked_fill(~onehot, float("-inf"))
            weights = torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0)
        return torch.einsum("bes,sbh->beh", weights, states)

    def embed(
        self, states: Tensor, example_ids: Tensor, template_ids: Tensor
    ) -> tuple[Tensor, Tensor]:
        """L2-normalised z [N, d] and template ids [N] of every example with a template."""
        valid = template_ids >= 0  # [b, E]
        # No early return for a block without examples: the (empty) result stays part of the
        # graph, so a data-parallel rank without pair examples still joins the gather's backward.
        pooled = self.pool(states, example_ids, template_ids.size(1))
        z = F.normalize(self.head(pooled[valid]).float(), dim=-1)
        return z, template_ids[valid]


def _data_parallel_group():
    """The data-parallel group when there is more than one data-parallel rank."""
    if not dist.is_initialized() or parallel_state.get_data_parallel_world_size() == 1:
        return None
    return parallel_state.get_data_parallel_group()
