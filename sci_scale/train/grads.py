"""Gradient bookkeeping that megatron's DDP would do, for the paths that do not use DeepSpeed.

With ``parallel.zero_stage=0`` the trainer steps a plain torch optimizer: data-parallel gradients
are averaged here, tied embeddings split across pipeline stages get their two gradients summed,
and the clipping norm is the global one: every parameter counted once over tensor and pipeline
ranks (a weight replicated across tensor ranks only on tensor rank 0, the output copy of a tied
embedding not at all).

Under DeepSpeed the gradients are reduced and partitioned inside ``engine.step()``, so no
global norm exists before the update; :class:`NonFiniteWatch` sees every gradient as autograd
produces it instead, which is what the skip decision (``train.guards``) needs before the step.
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


class NonFiniteWatch:
    """Whether any gradient this rank produced since the last read was NaN or infinite.

    A tensor hook on every trainable parameter adds the sum of each incoming gradient (every
    micro-batch's contribution, before accumulation and before DeepSpeed's own post-accumulate
    hooks move it into ZeRO's buffers) to one float32 accumulator on the device, without a
    host sync. A non-finite element makes the sum non-finite. A finite sum can only overflow
    when some element exceeds 1e19, whose square already overflows the float32 norm DeepSpeed
    computes, so "the sum is not finite" implies "the global norm is not finite"; the converse
    edge (a norm overflowing from finite elements) is caught by DeepSpeed's own overflow check.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.total = torch.zeros((), dtype=torch.float32, device=current_device())
        self.handles = [p.register_hook(self._see) for p in model.parameters() if p.requires_grad]

    def _see(self, grad: torch.Tensor) -> None:
        self.total.add_(grad.detach().sum(dtype=torch.float32).to(self.total.device))

    def read_and_reset(self) -> float:
        """The accumulated sum (non-finite when some gradient was), then zero again."""
        value = float(self.total)
        self.total.zero_()
        return value

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
