"""One micro-batch through the model, in the form megatron's pipeline schedules call.

``forward_step(data_iterator, model)`` returns the model's per-token loss and a loss function;
the schedule calls that function on the last pipeline stage, divides its first output by the
number of micro-batches and backpropagates it. The SCL never passes through here: its gradient
is attached inside the model (``losses.aux``) on the first stage.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from sci_scale.model.gpt import SCIGPTModel


@dataclass
class BatchCounter:
    """Blocks and tokens seen by this rank's forward steps (pair blocks counted apart)."""

    blocks: int = 0
    pair_blocks: int = 0
    tokens: int = 0

    def reset(self) -> None:
        self.blocks = self.pair_blocks = self.tokens = 0


def lm_loss_func(
    loss_mask: Tensor, lm_weight: float, output_tensor: Tensor
) -> tuple[Tensor, dict[str, Tensor]]:
    """Mean LM loss over the micro-batch's unmasked tokens.

    ``lm_weight`` is 0 in ``sci.mode=sci_only`` (the backbone is frozen; only SCL trains): the
    graph still runs backward, so the SCL gradient attached to the hidden states is delivered.
    """
    losses = output_tensor.float()
    mask = loss_mask.float()
    lm = (losses * mask).sum() / mask.sum().clamp(min=1.0)
    return lm * lm_weight, {"lm_loss": lm.detach(), "tokens": mask.sum().detach()}


def make_forward_step(counter: BatchCounter):
    def forward_step(data_iterator: Iterator[dict[str, Tensor]], model: SCIGPTModel):
        batch = next(data_iterator)
        counter.blocks += batch["tokens"].size(0)
        counter.pair_blocks += int((batch["template_ids"][:, 0] >= 0).sum())
        counter.tokens += batch["tokens"].numel()
        device = next(model.parameters()).device
        b = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        output = model(
            b["tokens"],
            b["position_ids"],
            labels=b["labels"],
            loss_mask=b["loss_mask"],
            example_ids=b["example_ids"],
            template_ids=b["template_ids"],
        )
        weight = 1.0 if model.lm_trains else 0.0
        return output, partial(lm_loss_func, b["loss_mask"], weight)

    return forward_step


def mean_of(records: list[dict[str, Tensor]], key: str) -> float:
    if not records:
        return float("nan")
    return float(torch.stack([r[key].float() for r in records]).mean())
