"""Generalization evals: SCAN and COGS as exact-match sequence generation.

A model is asked ``IN: <input> OUT:`` (the format its structural pairs were trained in) and
its greedy continuation up to the end-of-document token is compared with the gold output,
token for token after whitespace splitting. A continuation counts only if the model ended it
with the end token: one cut off by the token budget is wrong even when its words equal the
gold. The evaluators take any ``generate`` function (prompts -> completions), so a checkpoint,
an imported backbone or a fake model in a test are scored by the same code.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from sci_scale.data.pairs import PairDataError, scan_split
from sci_scale.data.pairs.cogs import cogs_examples

#: New tokens per continuation without targets to size the budget from: SCAN's longest output
#: is 48 actions, 3-5 BPE pieces each.
DEFAULT_MAX_NEW_TOKENS = 256


@dataclass(frozen=True)
class Continuation:
    """A generated continuation and whether the model ended it with the end token (False: cut
    off by the token budget, or stopped early because it could no longer match its target)."""

    text: str
    finished: bool


#: prompts -> completions: plain strings (taken as finished, i.e. ended with the end token:
#: a fake model in a test, a gold table) or :class:`Continuation` (a real decoder's).
Generate = Callable[[list[str]], Sequence["str | Continuation"]]


@dataclass
class Decoded:
    """One row's generated token ids (without the end token) and whether it ended with it."""

    tokens: list[int]
    finished: bool = False


@dataclass
class EvalResult:
    task: str
    examples: int
    correct: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.examples if self.examples else 0.0


def prompt(source: str) -> str:
    return f"IN: {source} OUT:"


def exact_match(generate: Generate, task: str, pairs: Sequence[tuple[str, str]]) -> EvalResult:
    """Continuations equal to the gold output, word for word, and ended with the end token."""
    prompts = [prompt(source) for source, _ in pairs]
    if isinstance(generate, GreedyGenerator):  # it may stop a continuation that went wrong
        outputs = generate.generate(prompts, targets=[gold for _, gold in pairs])
    else:  # plain strings are taken as finished (see Generate)
        outputs = [
            c if isinstance(c, Continuation) else Continuation(c, finished=True)
            for c in generate(prompts)
        ]
    correct = sum(
        out.finished and out.text.split() == gold.split()
        for out, (_, gold) in zip(outputs, pairs, strict=True)
    )
    return EvalResult(task, len(pairs), correct)


def scan_pairs(
    split: str, part: str = "test", limit: int | None = None, seed: int = 0
) -> list[tuple[str, str]]:
    """``(command, actions)`` of a split part. The test part is the published one in a fixed
    order, whatever ``seed``: every split's membership is fixed (``simple``'s is the published
    draw), so ``limit`` keeps the same test examples for any model. ``seed`` orders the train
    part only; pass the model's ``train.seed`` to get its training pairs' order."""
    lines = scan_split(split, part, seed)  # type: ignore[arg-type]
    pairs = [(command, " ".join(actions)) for command, actions in lines]
    return pairs[:limit] if limit else pairs


def evaluate_scan(
    generate: Generate, split: str, part: str = "test", limit: int | None = None, seed: int = 0
) -> EvalResult:
    return exact_match(generate, f"scan/{split}/{part}", scan_pairs(split, part, limit, seed))


def cogs_pairs(path: str | Path, limit: int | None = None) -> list[tuple[str, str]]:
    pairs = []
    for example in cogs_examples(path, split="test"):
        source, _, gold = example.text.removeprefix("IN: ").partition(" OUT: ")
        pairs.append((source, gold))
    if not pairs:
        raise PairDataError(f"{path}: no COGS examples")
    return pairs[:limit] if limit else pairs


def evaluate_cogs(generate: Generate, path: str | Path, limit: int | None = None) -> EvalResult:
    return exact_match(generate, f"cogs/{Path(path).stem}", cogs_pairs(path, limit))


def could_still_match(text: str, target_words: list[str]) -> bool:
    """Whether a continuation that begins with ``text`` can still equal the target, word for
    word: every complete word matches, and the last (possibly partial) word begins the
    target's word at its position."""
    words = text.split()
    if len(words) > len(target_words):
        return False
    if not words:
        return True
    done, last = words[:-1], words[-1]
    if done != target_words[: len(done)]:
        return False
    expected = target_words[len(done)]
    return expected.startswith(last) if not text[-1:].isspace() else last == expected


class _FullRecompute:
    """Decoding without a cache: each step runs the whole sequence (Transformer Engine models,
    and the reference the KV cache is tested against)."""

    def __init__(self, model: torch.nn.Module, vocab: int, ids: torch.Tensor) -> None:
        self.model, self.vocab, self.ids = model, vocab, ids

    def _last(self) -> torch.Tensor:
        from sci_scale.checkpoint.load import sci_logits

        return sci_logits(self.model, self.ids, self.vocab)[:, -1]

    def first(self) -> torch.Tensor:
        return self._last()

    def advance(self, tokens: torch.Tensor, keep: list[int]) -> torch.Tensor:
        self.ids = torch.cat([self.ids, tokens[:, None]], dim=1)[keep]
        return self._last()


class _Cached:
    """Decoding on megatron's KV cache (``model.decoding``): the prompts once, then one token
    per row and step."""

    def __init__(self, model: torch.nn.Module, vocab: int, ids: torch.Tensor, budget: int) -> None:
        from sci_scale.model.decoding import CachedDecoder

        self.ids = ids
        self.decoder = CachedDecoder(model, vocab, ids.size(0), ids.size(1) + budget)

    def first(self) -> torch.Tensor:
        return self.decoder.prefill(self.ids)

    def advance(self, tokens: torch.Tensor, keep: list[int]) -> torch.Tensor:
        # rows that left the batch leave the cache too: later steps cost only what still runs
        self.decoder.keep(keep)
        return self.decoder.step(tokens[keep])


class GreedyGenerator:
    """Greedy decoding with a sci-scale model in one process.

    Prompts are grouped by token length and decoded in lockstep, so no padding enters the
    causal attention. With ``kv_cache`` (the default) each step runs only the new tokens
    against megatron's static KV cache (``model.decoding``; models it cannot serve, on
    Transformer Engine, fall back to full recomputation); without it each step runs the whole
    sequence. Both give the same tokens.

    Given ``targets`` (exact-match scoring), a continuation stops as soon as it can no longer
    equal its target (:func:`could_still_match`): it is wrong whatever comes next, and the
    score is the one full decoding gives, at a fraction of the steps for a model that errs
    early. Its returned text is then the wrong prefix so far.

    ``max_new_tokens`` None: with targets, the longest target's tokens + 2 (room for the end
    token; a longer continuation cannot match), else :data:`DEFAULT_MAX_NEW_TOKENS`.
    """

    def __init__(
        self, model: torch.nn.Module, tokenizer, vocab: int, max_new_tokens: int | None = None,
        batch_size: int = 64, progress: bool = False, kv_cache: bool = True,
    ) -> None:  # fmt: skip
        from sci_scale.model.decoding import kv_cache_supported

        self.model, self.tok, self.vocab = model, tokenizer, vocab
        self.max_new_tokens, self.batch_size, self.progress = max_new_tokens, batch_size, progress
        self.kv_cache = kv_cache and kv_cache_supported(model)

    def budget(self, targets: Sequence[str] | None) -> int:
        """New tokens per continuation (see the class docstring)."""
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        if targets is None:
            return DEFAULT_MAX_NEW_TOKENS
        lengths = [len(ids) for ids in self.tok.tokenize_batch([" " + t for t in targets])]
        return max(lengths, default=0) + 2

    def _decode_batch(
        self, ids: torch.Tensor, targets: list[list[str]] | None = None, budget: int | None = None
    ) -> list[Decoded]:
        budget = self.budget(None) if budget is None else budget
        out = [Decoded([]) for _ in range(len(ids))]
        if budget <= 0:
            return out
        active = list(range(len(ids)))  # which output each row of the batch extends
        steps = (
            _Cached(self.model, self.vocab, ids, budget)
            if self.kv_cache
            else _FullRecompute(self.model, self.vocab, ids)
        )
        logits = steps.first()
        for step in range(budget):
            nxt = logits.argmax(-1)
            keep = []
            for row, i in enumerate(active):
                token = int(nxt[row])
                if token == self.tok.eod:
                    out[i].finished = True
                    continue
                out[i].tokens.append(token)
                if targets is None or could_still_match(
                    self.tok.detokenize(out[i].tokens), targets[i]
                ):
                    keep.append(row)
            if not keep or step == budget - 1:
                break
            # finished rows leave the batch, so the later steps cost only what still runs
            logits = steps.advance(nxt, keep)
            active = [active[row] for row in keep]
        return out

    def generate(self, prompts: list[str], targets: list[str] | None = None) -> list[Continuation]:
        """Each prompt's greedy continuation, and whether it ended with the end token."""
        from tqdm.auto import tqdm

        budget = self.budget(targets)
        encoded = self.tok.tokenize_batch(list(prompts))
        by_length: dict[int, list[int]] = {}
        for i, ids in enumerate(encoded):
            by_length.setdefault(len(ids), []).append(i)
        results = [Continuation("", False)] * len(prompts)
        batches = [
            idx[k : k + self.batch_size]
            for idx in by_length.values()
            for k in range(0, len(idx), self.batch_size)
        ]
        for batch in tqdm(batches, disable=not self.progress, unit=" batch"):
            ids = torch.tensor([encoded[i] for i in batch], dtype=torch.long)
            words = None if targets is None else [targets[i].split() for i in batch]
            for i, done in zip(batch, self._decode_batch(ids, words, budget), strict=True):
                results[i] = Continuation(self.tok.detokenize(done.tokens), done.finished)
        return results

    def __call__(self, prompts: list[str], targets: list[str] | None = None) -> list[str]:
        """The continuations' text (a :data:`Generate`); :meth:`generate` also says which
        ended with the end token."""
        return [c.text for c in self.generate(prompts, targets)]
