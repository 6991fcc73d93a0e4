"""Generalization evals: SCAN and COGS as exact-match sequence generation.

A model is asked ``IN: <input> OUT:`` (the format its structural pairs were trained in) and
its greedy continuation up to the end-of-document token is compared with the gold output,
token for token after whitespace splitting. The evaluators take any ``generate`` function
(prompts -> completions), so a checkpoint, an imported backbone or a fake model in a test are
scored by the same code.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from sci_scale.data.pairs import PairDataError, scan_split
from sci_scale.data.pairs.cogs import cogs_examples

Generate = Callable[[list[str]], list[str]]


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
    prompts = [prompt(source) for source, _ in pairs]
    if isinstance(generate, GreedyGenerator):  # it may stop a continuation that went wrong
        outputs = generate(prompts, targets=[gold for _, gold in pairs])
    else:
        outputs = generate(prompts)
    correct = sum(
        out.split() == gold.split() for out, (_, gold) in zip(outputs, pairs, strict=True)
    )
    return EvalResult(task, len(pairs), correct)


def scan_pairs(
    split: str, part: str = "test", limit: int | None = None, seed: int = 0
) -> list[tuple[str, str]]:
    """``(command, actions)`` of a split part. ``seed`` must be the one the model's training
    pairs were generated with (``train.seed``): it decides the ``simple`` split's membership
    and every split's order (so which examples ``limit`` keeps)."""
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


class GreedyGenerator:
    """Greedy decoding with a sci-scale model in one process.

    Prompts are grouped by token length and decoded in lockstep, so no padding enters the
    causal attention; each step runs the whole sequence (no KV cache: the evaluated models are
    small and the outputs short).

    Given ``targets`` (exact-match scoring), a continuation stops as soon as it can no longer
    equal its target (:func:`could_still_match`): it is wrong whatever comes next, and the
    score is the one full decoding gives, at a fraction of the steps for a model that errs
    early. Its returned text is then the wrong prefix so far.
    """

    def __init__(
        self, model: torch.nn.Module, tokenizer, vocab: int, max_new_tokens: int = 64,
        batch_size: int = 64, progress: bool = False,
    ) -> None:  # fmt: skip
        self.model, self.tok, self.vocab = model, tokenizer, vocab
        self.max_new_tokens, self.batch_size, self.progress = max_new_tokens, batch_size, progress

    def _decode_batch(
        self, ids: torch.Tensor, targets: list[list[str]] | None = None
    ) -> list[list[int]]:
        from sci_scale.checkpoint.load import sci_logits

        out: list[list[int]] = [[] for _ in range(len(ids))]
        active = list(range(len(ids)))  # which output each row of ``ids`` extends
        for _ in range(self.max_new_tokens):
            nxt = sci_logits(self.model, ids, self.vocab)[:, -1].argmax(-1)
            keep = []
            for row, i in enumerate(active):
                token = int(nxt[row])
                if token == self.tok.eod:
                    continue
                out[i].append(token)
                if targets is None or could_still_match(self.tok.detokenize(out[i]), targets[i]):
                    keep.append(row)
            if not keep:
                break
            # finished rows leave the batch, so the later steps cost only what still runs
            ids = torch.cat([ids, nxt[:, None]], dim=1)[keep]
            active = [active[row] for row in keep]
        return out

    def __call__(self, prompts: list[str], targets: list[str] | None = None) -> list[str]:
        from tqdm.auto import tqdm

        encoded = self.tok.tokenize_batch(list(prompts))
        by_length: dict[int, list[int]] = {}
        for i, ids in enumerate(encoded):
            by_length.setdefault(len(ids), []).append(i)
        results: list[str] = [""] * len(prompts)
        batches = [
            idx[k : k + self.batch_size]
            for idx in by_length.values()
            for k in range(0, len(idx), self.batch_size)
        ]
        for batch in tqdm(batches, disable=not self.progress, unit=" batch"):
            ids = torch.tensor([encoded[i] for i in batch], dtype=torch.long)
            words = None if targets is None else [targets[i].split() for i in batch]
            for i, generated in zip(batch, self._decode_batch(ids, words), strict=True):
                results[i] = self.tok.detokenize(generated)
        return results
