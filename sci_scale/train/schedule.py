"""Micro-batches through megatron's forward-backward schedule, and the step's reductions.

A step reads ``num_microbatches`` micro-batches of this data-parallel rank's share of the global
batch, hands them to ``get_forward_backward_func()`` (1F1B, interleaved, or no pipelining), and
reduces what every rank needs to know: the global token count (which scales each micro-batch's
loss, so the step optimises the mean over all tokens) and the LM loss (computed on the last
pipeline stage).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from sci_scale.config import Config
from sci_scale.data.loader import MicroBatches
from sci_scale.model.sci_branch import SCIStats
from sci_scale.runtime import collectives
from sci_scale.train.step import BatchCounter, make_forward_step, sum_of


@dataclass
class ScheduleResult:
    lm_loss: float  # the mean LM loss over the global batch's tokens, known on every rank
    counter: BatchCounter  # what this rank's forward steps saw and produced

    @property
    def sci_stats(self) -> list[SCIStats]:
        return self.counter.sci_stats


class StepSchedule:
    """``models``: one entry per model chunk of this rank (a DeepSpeed engine's view, or the
    chunks themselves); each reads every micro-batch once."""

    def __init__(self, cfg: Config, models: list[Any], dp_rank: int, dp_size: int) -> None:
        self.cfg = cfg
        self.models = models
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.forward_backward = get_forward_backward_func()

    def run(
        self,
        dataset: Any,
        start: int,
        num_microbatches: int,
        forward_only: bool,
        scl_weight: float = 0.0,
        collect_sci_embeddings: bool = False,
    ) -> ScheduleResult:
        """Micro-batches ``start..`` of ``dataset`` (wrapping around for evaluation)."""
        t = self.cfg.train
        source = MicroBatches(
            dataset, start, t.micro_batch_size, self.dp_rank, self.dp_size, wrap=forward_only
        )
        microbatches = [next(source) for _ in range(num_microbatches)]
        global_tokens = self._global_tokens(microbatches)
        counter = BatchCounter()
        counter.reset(
            loss_scale=num_microbatches * self.dp_size / global_tokens,
            scl_weight=scl_weight,
            collect=collect_sci_embeddings,
        )
        losses = self.forward_backward(
            forward_step_func=make_forward_step(counter),
            data_iterator=[iter(microbatches) for _ in self.models],
            model=self.models,
            num_microbatches=num_microbatches,
            seq_length=self.cfg.model.seq_length,
            micro_batch_size=t.micro_batch_size,
            forward_only=forward_only,
        )
        return ScheduleResult(self._reduce_lm(sum_of(losses, "lm_sum"), global_tokens), counter)

    def global_counts(self, counter: BatchCounter) -> tuple[int, int, int]:
        """(blocks, pair blocks, tokens) of the step over every data-parallel rank."""
        counts = [counter.blocks, counter.pair_blocks, counter.tokens]
        if self.dp_size > 1:
            counts = collectives.all_reduce_values(counts, parallel_state.get_data_parallel_group())
        blocks, pair_blocks, tokens = (int(c) for c in counts)
        return blocks, pair_blocks, tokens

    def _global_tokens(self, microbatches: list[dict[str, Any]]) -> float:
        tokens = sum(float(b["loss_mask"].sum()) for b in microbatches)
        if self.dp_size > 1:
            (tokens,) = collectives.all_reduce_values(
                [tokens], parallel_state.get_data_parallel_group()
            )
        return max(tokens, 1.0)

    def _reduce_lm(self, lm_sums: float, global_tokens: float) -> float:
        """The step's mean LM loss, known on every rank (the last stage computes it)."""
        value = lm_sums / global_tokens
        if self.dp_size > 1:
            (value,) = collectives.all_reduce_values(
                [value], parallel_state.get_data_parallel_group()
            )
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            (value,) = collectives.all_reduce_values(
                [value], parallel_state.get_pipeline_model_parallel_group()
            )
        return value
