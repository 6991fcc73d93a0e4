"""Core attention on ``torch.nn.functional.scaled_dot_product_attention``.

megatron-core's local ``DotProductAttention`` materialises the full score matrix through its own
softmax; SDPA picks the best kernel the device offers (math on CPU, flash or cuDNN on an H100)
with the same numerics contract. We subclass megatron's module so that its partition arithmetic
(heads and query groups per tensor-parallel rank) and its checkpoint keys stay megatron's own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from torch import Tensor


class SDPAttention(DotProductAttention):
    """Drop-in core attention for megatron's ``SelfAttention``.

    Mask convention is megatron's: ``attention_mask`` is boolean with True meaning *masked out*.
    With a causal mask type and no explicit mask, SDPA's own causal path is used.
    """

    def forward(  # type: ignore[override]
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: Tensor | None = None,
        packed_seq_params: object | None = None,
    ) -> Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("SDPAttention supports neither packed sequences nor bias")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        # [s, b, heads, d] -> [b, heads, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        groups = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        dropout_p = self.attention_dropout.p if self.training else 0.0
        if attention_mask is None:
            if mask_type not in (AttnMaskType.causal, AttnMaskType.no_mask):
                raise ValueError(f"attention mask type {mask_type} needs an attention_mask")
            allowed = None
            is_causal = mask_type == AttnMaskType.causal
        else:
            allowed = ~attention_mask
            is_causal = False
        with tensor_parallel.get_cuda_rng_tracker().fork():
            context = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=allowed,
                dropout_p=dropout_p,
                is_causal=is_causal,
                scale=self.softmax_scale,
            )
        # [b, heads, s, d] -> [s, b, heads * d]
        context = context.permute(2, 0, 1, 3).contiguous()
        return context.view(context.size(0), context.size(1), self.hidden_size_per_partition)


def sdpa_backend_name(device: torch.device) -> str:
    """What SDPA will run on this device, for the one start-up log line."""
    return "torch SDPA (math kernel, CPU)" if device.type == "cpu" else "torch SDPA (flash/cuDNN)"
