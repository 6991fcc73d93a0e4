"""Task examples packed into training blocks: every example once per epoch, whole.

A benchmark's training part is small (SCAN's 16 K commands are ~0.4 M tokens at one token per
word), so a run makes many passes over it. Each epoch visits the examples in the order of a
permutation seeded by (seed, epoch) and packs them greedily into blocks of ``seq_length``
tokens; an example never straddles two blocks (the next one starts where it does not fit, the
rest is padding). Examples carry their own ids (``example_ids``), so the SCI branch and, with
``data.reset_attention_mask``, the backbone keep attention within each one; task blocks carry
no templates (the SCL runs on pair blocks only). The block plan is computed once, so any block
is available by index on any rank (megatron's samplers read by index).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from torch.utils.data import Dataset

from sci_scale.data.blocks import TokenizedExample, block_identity, pack_block


class TaskBlockDataset(Dataset):
    def __init__(
        self,
        examples: Sequence[TokenizedExample],
        seq_length: int,
        pad_id: int,
        num_samples: int,
        seed: int,
        target_loss_only: bool,
        name: str = "task",
    ) -> None:
        if not examples:
            raise ValueError(f"{name}: no examples")
        lengths = np.asarray([len(ex.tokens) for ex in examples])
        budget = seq_length + 1  # inputs and shifted labels come from one buffer
        if int(lengths.max()) > budget:
            longest = int(lengths.max())
            raise ValueError(
                f"{name}: {int((lengths > budget).sum())} example(s) are longer than a block "
                f"(longest {longest} tokens, model.seq_length={seq_length}); raise "
                f"model.seq_length to at least {longest - 1}"
            )
        self.examples, self.seq_length, self.pad_id = examples, seq_length, pad_id
        self.num_samples, self.target_loss_only = num_samples, target_loss_only
        self.order, self.starts = self._plan(lengths, budget, num_samples, seed)
        self.unique_identifiers = block_identity(
            self, name, examples, seq_length=seq_length, num_samples=num_samples, seed=seed,
            target_loss_only=target_loss_only,
        )  # fmt: skip

    @staticmethod
    def _plan(
        lengths: np.ndarray, budget: int, num_samples: int, seed: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """(example order over all epochs, where each block starts in it; one extra end)."""
        order: list[np.ndarray] = []
        starts = [0]
        position, epoch, used = 0, 0, 0
        while len(starts) <= num_samples:
            perm = np.random.default_rng([seed, epoch]).permutation(len(lengths))
            order.append(perm)
            for i in perm:  # a block may take the end of one epoch and the start of the next
                if used + lengths[i] > budget:
                    starts.append(position)
                    used = 0
                used += lengths[i]
                position += 1
            epoch += 1
        starts.append(position)  # the last epoch's tail closes a block too
        return np.concatenate(order), np.asarray(starts[: num_samples + 1])

    @property
    def epochs(self) -> float:
        """How many passes over the examples the planned blocks make."""
        return int(self.starts[-1]) / len(self.examples)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, idx: int) -> dict[str, np.ndarray]:
        members = self.order[self.starts[idx] : self.starts[idx + 1]]
        pieces = [self.examples[i].tokens for i in members]
        owners = [np.full(len(p), k, dtype=np.int64) for k, p in enumerate(pieces)]
        prompts = [self.examples[i].prompt_length for i in members]
        return pack_block(
            pieces, owners, [], self.seq_length, self.pad_id,
            prompts if self.target_loss_only else None,
        )  # fmt: skip
