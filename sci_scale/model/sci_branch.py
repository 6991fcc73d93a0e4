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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from sci_scale.config.schema import SciSection
from sci_scale.model.attention import ExampleLayout, example_layout
from sci_scale.model.specs import Implementation, kernel_fusion_flags, layer_spec


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

    def encode(self, embeddings: Tensor, example_ids: Tensor) -> Tensor:
        """SCI states [s, b, h_sci] from the shared embeddings [s, b, h]; a token attends to
        the earlier tokens of its own example only."""
        x = self.proj_in(embeddings)
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
