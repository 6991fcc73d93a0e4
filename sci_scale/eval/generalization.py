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

    def to_dict(self) -> dict[str, float | int | str]:
        return {"task": self.task, "examples": self.examples, "correct": self.correct,
                "accuracy": self.accuracy}  # fmt: skip


def prompt(source: str) -> str:
    return f"IN: {source} OUT:"


def exact_match(generate: Generate, task: str, pairs: Sequence[tuple[str, str]]) -> EvalResult:
    outputs = generate([prompt(source) for source, _ in pairs])
    correct = sum(
        out.split() == gold.split() for out, (_, gold) in zip(outputs, pairs, strict=True)
    )
    return EvalResult(task, len(pairs), correct)


def scan_pairs(split: str, part: str = "test", limit: int | None = None) -> list[tuple[str, str]]:
    pairs = [(command, " ".join(actions)) for command, actions in scan_split(split, part)]
    return pairs[:limit] if limit else pairs


def evaluate_scan(
    generate: Generate, split: str, part: str = "test", limit: int | None = None
) -> EvalResult:
    return exact_match(generate, f"scan/{split}/{part}", scan_pairs(split, part, limit))


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


class GreedyGenerator:
    """Greedy decoding with a sci-scale model in one process.

    Prompts are grouped by token length and decoded in lockstep, so no padding enters the
    causal attention; each step runs the whole sequence (no KV cache: the evaluated models are
    small and the outputs short).
    """

    def __init__(
        self, model: torch.nn.Module, tokenizer, vocab: int, max_new_tokens: int = 64,
        batch_size: int = 64, progress: bool = False,
    ) -> None:  # fmt: skip
        self.model, self.tok, self.vocab = model, tokenizer, vocab
        self.max_new_tokens, self.batch_size, self.progress = max_new_tokens, batch_size, progress

    def _decode_batch(self, ids: torch.Tensor) -> list[list[int]]:
        from sci_scale.convert.hf import sci_logits

        out: list[list[int]] = [[] for _ in range(len(ids))]
        done = torch.zeros(len(ids), dtype=torch.bool)
        for _ in range(self.max_new_tokens):
            nxt = sci_logits(self.model, ids, self.vocab)[:, -1].argmax(-1)
            for i in torch.nonzero(~done).flatten().tolist():
                if int(nxt[i]) == self.tok.eod:
                    done[i] = True
                else:
                    out[i].append(int(nxt[i]))
            if bool(done.all()):
                break
            ids = torch.cat([ids, nxt[:, None]], dim=1)
        return out

    def __call__(self, prompts: list[str]) -> list[str]:
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
            for i, generated in zip(batch, self._decode_batch(ids), strict=True):
                results[i] = self.tok.detokenize(generated)
        return results
