"""Attaching an auxiliary loss's gradient to an activation (megatron's MoE aux-loss pattern).

The SCL is computed on the first pipeline stage, but only the last stage owns the loss that the
schedule backpropagates. Passing the hidden states through :class:`AttachAuxLoss` makes the
backward pass through those states also backpropagate ``scale * aux_loss``: the pipeline
schedules need no change and the last stage never sees the SCL.
"""

from __future__ import annotations

import torch
from torch import Tensor


class AttachAuxLoss(torch.autograd.Function):
    """Identity on ``activation``; its backward also seeds ``aux_loss`` with ``scale``."""

    @staticmethod
    def forward(ctx, activation: Tensor, aux_loss: Tensor, scale: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(aux_loss)
        ctx.scale = scale
        return activation.view_as(activation)

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, Tensor, None]:  # type: ignore[override]
        (aux_loss,) = ctx.saved_tensors
        return grad_output, torch.full_like(aux_loss, ctx.scale), None


def attach_aux_loss(activation: Tensor, aux_loss: Tensor, scale: float) -> Tensor:
    return AttachAuxLoss.apply(activation, aux_loss, scale)
