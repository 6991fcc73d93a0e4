"""Micro-batches for one data-parallel rank, resumable from a consumed-sample count.

The layout is megatron's pretraining sampler: each micro-step takes ``micro_batch_size * dp``
consecutive blocks of the blended order and rank r reads its own slice, so resuming needs only
``consumed_samples``, and the global order is the same whatever the layout.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset


def collate(samples: list[dict[str, np.ndarray]]) -> dict[str, Tensor]:
    return {key: torch.from_numpy(np.stack([s[key] for s in samples])) for key in samples[0]}


class MicroBatches(Iterator[dict[str, Tensor]]):
    def __init__(
        self,
        dataset: Dataset,
        consumed_samples: int,
        micro_batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        wrap: bool = False,
    ) -> None:
        self.dataset = dataset
        self.consumed = consumed_samples
        self.mb = micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.wrap = wrap

    def __iter__(self) -> MicroBatches:
        return self

    def __next__(self) -> dict[str, Tensor]:
        n = len(self.dataset)  # type: ignore[arg-type]
        start = self.consumed + self.dp_rank * self.mb
        if start + self.mb > n and not self.wrap:
            raise StopIteration
        indices = [(start + i) % n for i in range(self.mb)]
        self.consumed += self.mb * self.dp_size
        return collate([self.dataset[i] for i in indices])
