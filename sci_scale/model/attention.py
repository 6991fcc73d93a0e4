"""Core attention on ``torch.nn.functional.scaled_dot_product_attention``.

megatron-core's local ``DotProductAttention`` materialises the full score matrix through its own
softmax; SDPA picks the best kernel the device offers (math on CPU, flash or cuDNN on an H100)
with the same numerics contract. We subclass megatron's module so that its partition arithmetic
(heads and query groups per tensor-parallel rank) and its checkpoint keys stay megatron's own.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

# model.attention_backend -> the SDPA kernels it allows (None: SDPA's own choice)
SDPA_KERNELS: dict[str, list[SDPBackend] | None] = {
    "auto": None,
    "flash": [SDPBackend.FLASH_ATTENTION],
    "fused": [SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION],
    "unfused": [SDPBackend.MATH],
}


@dataclass
class ExampleGroup:
    """Examples of one padded width, unpacked into rows: ``index[n, width]`` are their tokens'
    flat positions in the ``[b * s]`` block (padding columns repeat the first token), ``valid``
    marks the real ones."""

    width: int
    index: Tensor
    valid: Tensor


@dataclass
class ExampleLayout:
    """Which tokens of a ``[s, b]`` block form one causal example, passed to the core attention
    in place of a mask (megatron hands ``attention_mask`` through its layers untouched).

    The attention unpacks each example into its own row, grouped by width, and runs plain
    causal SDPA per group: flash-eligible, and memory linear in the sequence length. Everything
    else in a layer is per token, so this is the only place the example structure matters."""

    groups: list[ExampleGroup]
    batch: int
    seq: int


MIN_WIDTH = 16  # narrowest row: FP8 GEMMs and flash tiles want multiples of 16


def example_layout(example_ids: Tensor) -> ExampleLayout | None:
    """The examples (contiguous runs of one id per row) of ``[b, s]`` ids, grouped by width
    (the run's length rounded up to a power of two, at least 16, at most s): padding at most
    doubles the work. None when every row is one example (plain causal attention)."""
    b, s = example_ids.shape
    starts = torch.ones_like(example_ids, dtype=torch.bool)
    starts[:, 1:] = example_ids[:, 1:] != example_ids[:, :-1]
    flat_starts = starts.flatten().nonzero().squeeze(1)  # every row starts a run
    if flat_starts.numel() == b:
        return None
    ends = torch.cat([flat_starts[1:], flat_starts.new_tensor([b * s])])
    lengths = torch.minimum(ends, (flat_starts // s + 1) * s) - flat_starts
    widths = 2 ** torch.ceil(torch.log2(lengths.double())).long()
    widths = torch.clamp(widths, min=min(MIN_WIDTH, s), max=s)
    groups = []
    offsets = torch.arange(s, device=example_ids.device)
    for width in torch.unique(widths).tolist():
        chosen = widths == width
        first, length = flat_starts[chosen], lengths[chosen]
        valid = offsets[None, :width] < length[:, None]
        index = torch.where(valid, first[:, None] + offsets[None, :width], first[:, None])
        groups.append(ExampleGroup(int(width), index, valid))
    return ExampleLayout(groups, b, s)


class SDPAttention(DotProductAttention):
    """Drop-in core attention for megatron's ``SelfAttention``.

    Mask convention is megatron's: ``attention_mask`` is boolean with True meaning *masked out*,
    or an :class:`ExampleLayout` (causal within each example, no mask materialised). With a
    causal mask type and no explicit mask, SDPA's own causal path is used, which is what lets
    flash and cuDNN kernels run. ``sdpa_backend`` (``model.attention_backend``) restricts SDPA
    to those kernels; one that cannot serve the inputs raises instead of silently falling back.
    """

    def __init__(self, *args, sdpa_backend: str = "auto", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sdpa_kernels = SDPA_KERNELS[sdpa_backend]

    def _sdpa(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool) -> Tensor:
        """[n, heads, w, d] attention (GQA heads expanded), under the chosen kernels."""
        groups = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        dropout_p = self.attention_dropout.p if self.training else 0.0
        kernels = sdpa_kernel(self.sdpa_kernels) if self.sdpa_kernels else contextlib.nullcontext()
        with tensor_parallel.get_cuda_rng_tracker().fork(), kernels:
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal,
                scale=self.softmax_scale,
            )  # fmt: skip

    def _per_example(self, q: Tensor, k: Tensor, v: Tensor, layout: ExampleLayout) -> Tensor:
        """Causal attention within each example of ``layout``; [s, b, heads, d] in and out."""
        s, b = layout.seq, layout.batch
        flat = [t.transpose(0, 1).reshape(b * s, *t.shape[2:]) for t in (q, k, v)]
        out = flat[0].new_zeros(b * s, q.size(2), v.size(3))
        for group in layout.groups:
            # [n, w, heads, d] -> [n, heads, w, d]
            rows = [t[group.index].transpose(1, 2) for t in flat]
            context = self._sdpa(*rows, mask=None, causal=True).transpose(1, 2)
            # in place: each group fills its own positions; no copy of the buffer per group
            out.index_put_((group.index[group.valid],), context[group.valid].to(out.dtype))
        return out.view(b, s, *out.shape[1:]).transpose(0, 1)

    def forward(  # type: ignore[override]
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | ExampleLayout | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: Tensor | None = None,
        packed_seq_params: object | None = None,
    ) -> Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("SDPAttention supports neither packed sequences nor bias")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        if isinstance(attention_mask, ExampleLayout):
            context = self._per_example(query, key, value, attention_mask)
        else:
            # [s, b, heads, d] -> [b, heads, s, d]
            q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
            if attention_mask is None:
                if mask_type not in (AttnMaskType.causal, AttnMaskType.no_mask):
                    raise ValueError(f"attention mask type {mask_type} needs an attention_mask")
                sq, sk = q.size(2), k.size(2)
                if mask_type == AttnMaskType.causal and sq != sk:
                    # queries are the last sq of sk positions (a KV cache): causal aligned at
                    # the bottom right, where SDPA's is_causal aligns at the top left
                    keep = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)
                    context = self._sdpa(q, k, v, keep, False)
                else:
                    context = self._sdpa(q, k, v, None, mask_type == AttnMaskType.causal)
            else:
                context = self._sdpa(q, k, v, ~attention_mask, False)
            context = context.permute(2, 0, 1, 3)  # [b, heads, s, d] -> [s, b, heads, d]
        context = context.contiguous()
        return context.view(context.size(0), context.size(1), self.hidden_size_per_partition)


def sdpa_backend_name(device: torch.device, backend: str = "auto") -> str:
    """What SDPA will run on this device, for the one start-up log line."""
    if device.type == "cpu":
        return "torch SDPA (math kernel, CPU)"
    return {
        "auto": "torch SDPA (auto: flash/cuDNN/efficient as the inputs allow)",
        "flash": "torch SDPA (flash kernel only)",
        "fused": "torch SDPA (cuDNN/efficient fused kernels only)",
        "unfused": "torch SDPA (math kernel)",
    }[backend]
