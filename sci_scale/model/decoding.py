"""Incremental (KV-cached) decoding with megatron-core's static inference context.

megatron's static batching keeps each attention layer's keys and values in
``StaticInferenceContext.key_value_memory_dict`` (``[max_seq, max_batch, groups, head_dim]``
per layer): a *prefill* forward writes the prompt's keys and values, then each *decode* forward
feeds one new token per row with ``sequence_len_offset`` at the number of cached positions.
megatron itself slices the rotary embeddings at that offset and, past the prefill, hands the
core attention ``AttnMaskType.no_mask`` (one query attending to every cached key); the prefill
keeps the layer's causal mask (query and key lengths are equal there).

The SCI branch is a causal megatron ``TransformerBlock`` of its own, so its contribution at a
position depends on the earlier tokens only and can be cached the same way; its layers are
numbered from 1 like the backbone's, so it keeps its own context (:attr:`DecodeContext.branch`),
advanced in lockstep with the backbone's.
"""

from __future__ import annotations

import torch
from megatron.core.inference.contexts.static_context import StaticInferenceContext
from torch import Tensor


class DecodeContext(StaticInferenceContext):
    """The backbone's static KV cache and, when the model has an SCI branch, the branch's."""

    def __init__(self, max_batch_size: int, max_sequence_length: int, branch: bool) -> None:
        super().__init__(max_batch_size, max_sequence_length)
        self.branch = (
            StaticInferenceContext(max_batch_size, max_sequence_length) if branch else None
        )

    def _contexts(self) -> list[StaticInferenceContext]:
        return [self] if self.branch is None else [self, self.branch]

    def increment_sequence_len_offset(self, increment: int) -> None:
        super().increment_sequence_len_offset(increment)
        if self.branch is not None:
            self.branch.increment_sequence_len_offset(increment)

    def enable_decode_mode(self) -> None:
        super().enable_decode_mode()
        if self.branch is not None:
            self.branch.enable_decode_mode()

    def enable_prefill_mode(self) -> None:
        super().enable_prefill_mode()
        if self.branch is not None:
            self.branch.enable_prefill_mode()

    def select_rows(self, rows: Tensor) -> None:
        """Keep only these batch rows (in this order) of every cached layer: rows that left
        the batch stop costing compute. The new buffers hold exactly the rows kept."""
        for context in self._contexts():
            memory = context.key_value_memory_dict
            for layer, (key, value) in memory.items():
                memory[layer] = (key[:, rows], value[:, rows])
            context.max_batch_size = len(rows)


def branch_context(context: StaticInferenceContext | None) -> StaticInferenceContext | None:
    """The SCI branch's own KV cache within the model's ``context`` (None without one)."""
    if context is None:
        return None
    branch = getattr(context, "branch", None)
    if branch is None:
        raise ValueError(
            "the SCI branch needs a KV cache of its own (its layer numbers collide with the "
            "backbone's): decode with model.decoding.DecodeContext(..., branch=True)"
        )
    return branch


def kv_cache_supported(model: torch.nn.Module) -> bool:
    """Whether :class:`CachedDecoder` can serve ``model``: an ``SCIGPTModel`` (not named in
    the annotations: ``model.gpt`` imports this module), whole in one process, on the local
    spec with sci-scale's SDPA core attention.

    Transformer Engine's attention (and megatron's own softmax attention, CUDA-only) take
    megatron's cache through code paths this project cannot test on its CPU-only CI, so those
    models decode by full recomputation instead (correct, only slower)."""
    impl = getattr(model, "impl", None)  # None: not an SCIGPTModel
    return (
        impl is not None
        and not impl.use_te
        and impl.attention_backend != "local"
        and model.pre_process
        and model.post_process
    )


class CachedDecoder:
    """Greedy decoding state of one batch of equal-length prompts.

    :meth:`prefill` runs the prompts ``[b, s]`` once; each :meth:`step` then runs one new token
    per row against the cache. Both return the last position's logits ``[b, vocab]`` (float32,
    on the CPU, the first ``vocab`` columns of the padded vocabulary), like the full
    recomputation's last position. :meth:`keep` drops rows that left the batch."""

    def __init__(self, model: torch.nn.Module, vocab: int, batch: int, max_length: int) -> None:
        self.model, self.vocab = model.eval(), vocab
        self.context = DecodeContext(batch, max_length, branch=model.sci is not None)

    def _forward(self, tokens: Tensor) -> Tensor:
        start = self.context.sequence_len_offset
        positions = torch.arange(start, start + tokens.size(1)).expand_as(tokens)
        with torch.no_grad():
            logits = self.model(tokens, positions, inference_context=self.context).lm
        self.context.increment_sequence_len_offset(tokens.size(1))
        return logits[..., : self.vocab].float().cpu()

    def prefill(self, tokens: Tensor, last_only: bool = True) -> Tensor:
        """The prompts' logits: the last position's ``[b, vocab]``, or every position's
        ``[b, s, vocab]`` with ``last_only=False``."""
        if self.context.sequence_len_offset:
            raise RuntimeError("prefill runs once, on an empty cache")
        self.context.materialize_only_last_token_logits = last_only
        logits = self._forward(tokens)
        self.context.materialize_only_last_token_logits = True
        self.context.enable_decode_mode()
        return logits[:, -1] if last_only else logits

    def step(self, tokens: Tensor) -> Tensor:
        """Logits ``[b, vocab]`` after appending ``tokens`` ``[b]`` (one per row)."""
        return self._forward(tokens[:, None])[:, -1]

    def keep(self, rows: list[int]) -> None:
        """Go on with these rows of the batch only (in this order)."""
        if rows != list(range(self.context.max_batch_size)):
            self.context.select_rows(torch.tensor(rows, device=self.model.device))
