"""One micro-batch through the model, in the form megatron's pipeline schedules call.

``forward_step(data_iterator, model)`` returns the model's per-token loss and a loss function;
the schedule calls that function on the last pipeline stage, divides its first output by the
number of micro-batches and backpropagates it. The SCL never passes through here: the model
attaches its gradient on the first stage (``losses.aux``) with the step's SCL weight, and
reports its statistics in its output, which the step collects.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial

from torch import Tensor

from sci_scale.model.gpt import ModelOutput, SCIGPTModel
from sci_scale.model.sci_branch import SCIStats
from sci_scale.runtime.device import current_device


@dataclass
class BatchCounter:
    """What this rank's forward steps saw and produced in one schedule run: blocks and tokens
    (pair blocks counted apart), the SCI statistics of each micro-batch; and what they are
    given: the factor that turns a micro-batch's summed LM loss into its share of the step's
    loss, the SCL weight, and whether to collect the SCI embeddings."""

    blocks: int = 0
    pair_blocks: int = 0
    tokens: int = 0
    loss_scale: float = 1.0
    scl_weight: float = 0.0
    collect_sci_embeddings: bool = False
    sci_stats: list[SCIStats] = field(default_factory=list)

    def reset(
        self, loss_scale: float = 1.0, scl_weight: float = 0.0, collect: bool = False
    ) -> None:
        self.blocks = self.pair_blocks = self.tokens = 0
        self.loss_scale, self.scl_weight, self.collect_sci_embeddings = (
            loss_scale,
            scl_weight,
            collect,
        )
        self.sci_stats = []


def lm_loss_func(
    loss_mask: Tensor, scale: float, output_tensor: Tensor
) -> tuple[Tensor, dict[str, Tensor]]:
    """The micro-batch's summed LM loss times ``scale``.

    The trainer sets ``scale = num_microbatches * dp / global_tokens`` (0 in
    ``sci.mode=sci_only``): after the schedule's division by the number of micro-batches and the
    data-parallel gradient average, the step optimises the mean over every token of the global
    batch, whatever the split into micro-batches and ranks. A zero scale still runs backward, so
    the SCL gradient attached to the hidden states is delivered.
    """
    lm_sum = (output_tensor.float() * loss_mask.float()).sum()
    return lm_sum * scale, {"lm_sum": lm_sum.detach(), "tokens": loss_mask.sum().detach()}


def make_forward_step(counter: BatchCounter):
    def forward_step(data_iterator: Iterator[dict[str, Tensor]], model: SCIGPTModel):
        batch = next(data_iterator)
        counter.blocks += batch["tokens"].size(0)
        counter.pair_blocks += int((batch["template_ids"][:, 0] >= 0).sum())
        counter.tokens += batch["tokens"].numel()
        module = getattr(model, "module", model)  # a DeepSpeed engine wraps the model
        device = current_device()
        b = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        output: ModelOutput = model(
            b["tokens"],
            b["position_ids"],
            labels=b["labels"],
            loss_mask=b["loss_mask"],
            example_ids=b["example_ids"],
            template_ids=b["template_ids"],
            scl_weight=counter.scl_weight,
            collect_sci_embeddings=counter.collect_sci_embeddings,
        )
        if output.sci is not None:
            counter.sci_stats.append(output.sci)
        scale = counter.loss_scale if module.lm_trains else 0.0
        return output.lm, partial(lm_loss_func, b["loss_mask"], scale)

    return forward_step


def sum_of(records: list[dict[str, Tensor]], key: str) -> float:
    return float(sum(float(r[key]) for r in records))
