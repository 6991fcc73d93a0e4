"""Held-out perplexity of a checkpoint: mean next-token loss over corpus blocks it never saw.

The blocks come from the test share of ``data.split`` (training reads the first share and the
eval steps the second), so a run's own corpus gives an untouched slice, and any text file can be
scored by pointing ``data`` at it. Perplexities are only comparable between models that share a
tokenizer (the ablation's variants of one seed do).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class PerplexityResult:
    nll: float  # mean loss per predicted token (nats)
    tokens: int
    blocks: int

    @property
    def ppl(self) -> float:
        return math.exp(min(self.nll, 50.0))


def perplexity(
    model: torch.nn.Module, blocks: Sequence[dict[str, Any]], batch_size: int = 8
) -> PerplexityResult:
    """Mean loss over the ``loss_mask`` tokens of ``blocks`` (megatron GPTDataset samples)."""
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(blocks), batch_size):
            batch = [blocks[i] for i in range(start, min(start + batch_size, len(blocks)))]

            def stack(key: str, batch: list[dict[str, Any]] = batch) -> torch.Tensor:
                return torch.stack([torch.as_tensor(b[key]) for b in batch])

            losses = model(stack("tokens"), stack("position_ids"), labels=stack("labels")).lm
            mask = stack("loss_mask").float().to(losses.device)
            total += float((losses.float() * mask).sum())
            count += int(mask.sum())
    if count == 0:
        raise ValueError("no tokens to score: the held-out blocks are empty")
    return PerplexityResult(total / count, count, len(blocks))
