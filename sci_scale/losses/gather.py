"""Data-parallel SCL: every rank's embeddings become negatives (and positives) for all.

The embeddings are all-gathered by :class:`AllGatherWithGrad`, whose backward sums every rank's
gradient into the local shard: each rank's loss over its own anchors then reaches every example
it used, and after the data-parallel gradient average the update is that of the single-process
SCL on the global micro-batch. (``torch.distributed.nn.functional.all_gather`` does the same but
its gloo backward scatters from global rank 0, which fails in any group without rank 0, e.g. the
data-parallel group of tensor rank 1.) Ranks hold different numbers of
examples, so rows are padded to the largest count with template id -1 (ignored by the loss).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from sci_scale.runtime import collectives


@dataclass
class GatheredExamples:
    z: Tensor  # [world * n_max, d], differentiable for the local rows
    templates: Tensor  # [world * n_max], -1 for padding
    local: Tensor  # bool [world * n_max], this rank's rows


class AllGatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0; backward: the group's summed gradient of the local rows."""

    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup) -> Tensor:  # type: ignore[override]
        ctx.group = group
        ctx.rows = x.size(0)
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        rank = dist.get_rank(ctx.group)
        return grad[rank * ctx.rows : (rank + 1) * ctx.rows], None


def max_example_count(count: int, group: dist.ProcessGroup) -> int:
    """The largest per-rank example count of the group. Zero means no rank has pair examples;
    otherwise every rank must take part in the gather (and its backward), even with none."""
    (largest,) = collectives.all_reduce_values([count], group, op=collectives.ReduceOp.MAX)
    return int(largest)


def gather_examples(
    z: Tensor, templates: Tensor, n_max: int, group: dist.ProcessGroup
) -> GatheredExamples:
    n, d = z.shape
    pad = n_max - n
    z_padded = torch.cat([z, z.new_zeros(pad, d)]) if pad else z
    t_padded = torch.cat([templates, templates.new_full((pad,), -1)]) if pad else templates
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    z_all = AllGatherWithGrad.apply(z_padded, group)
    t_parts = [torch.empty_like(t_padded) for _ in range(world)]
    dist.all_gather(t_parts, t_padded.contiguous(), group=group)
    local = torch.zeros(world * n_max, dtype=torch.bool, device=z.device)
    local[rank * n_max : rank * n_max + n] = True
    return GatheredExamples(z_all, torch.cat(t_parts), local)
