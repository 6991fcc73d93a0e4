"""Gradient bookkeeping that megatron's DDP would do, for the paths that do not use DeepSpeed.

With ``parallel.zero_stage=0`` the trainer steps a plain torch optimizer: data-parallel gradients
are averaged here, tied embeddings split across pipeline stages get their two gradients summed,
and the clipping norm is the global one: every parameter counted once over tensor and pipeline
ranks (a weight replicated across tensor ranks only on tensor rank 0, the output copy of a tied
embedding not at all).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from sci_scale.runtime import collectives
from sci_scale.runtime.device import current_device

SHARED_COPY = "ds_pipe_replicated"  # DeepSpeed's mark for a pipeline-replicated parameter


def mark_tied_output_copy(model: torch.nn.Module) -> torch.nn.Parameter | None:
    """On the last stage of a pipeline with tied embeddings, the output layer holds a copy of
    the first stage's embedding: mark it so no norm counts it twice (DeepSpeed reads the mark)."""
    gpt = getattr(model, "gpt", model)
    if ps.get_pipeline_model_parallel_world_size() == 1:
        return None
    if not getattr(gpt, "share_embeddings_and_output_weights", False):
        return None
    if gpt.pre_process:
        return gpt.embedding.word_embeddings.weight
    if not gpt.post_process:
        return None  # a middle chunk of an interleaved pipeline holds neither copy
    weight = gpt.output_layer.weight
    setattr(weight, SHARED_COPY, True)
    return weight


def allreduce_tied_embedding_grads(weight: torch.nn.Parameter | None) -> None:
    """Sum the embedding gradient of the first and the output gradient of the last stage."""
    if weight is None or weight.grad is None or not ps.is_rank_in_embedding_group():
        return
    collectives.all_reduce(weight.grad, group=ps.get_embedding_group())


def allreduce_data_parallel_grads(params: list[torch.nn.Parameter]) -> None:
    dp = ps.get_data_parallel_world_size()
    if dp == 1:
        return
    group = ps.get_data_parallel_group()
    for p in params:
        if p.grad is not None:
            collectives.all_reduce(p.grad, group=group)
            p.grad.div_(dp)


def _counted_in_norm(p: torch.nn.Parameter) -> bool:
    if getattr(p, SHARED_COPY, False):
        return False
    is_tp_sharded = getattr(p, "tensor_model_parallel", False)
    return is_tp_sharded or ps.get_tensor_model_parallel_rank() == 0


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> float:
    """Global L2 norm over all model-parallel ranks; gradients scaled down when above max."""
    grads = [p.grad for p in params if p.grad is not None and _counted_in_norm(p)]
    sq = torch.zeros((), dtype=torch.float64, device=current_device())
    for g in grads:
        sq += g.detach().double().pow(2).sum()
    if dist.is_initialized() and ps.get_model_parallel_group() is not None:
        collectives.all_reduce(sq, group=ps.get_model_parallel_group())
    norm = math.sqrt(float(sq))
    if max_norm > 0 and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for p in params:
            if p.grad is not None:
                p.grad.mul_(scale)
    return norm
