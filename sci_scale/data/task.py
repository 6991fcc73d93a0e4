"""A benchmark as a training task: its train part, a dev set carved from it, its test part.

``data.corpus=task`` trains on a benchmark's training part as prompt -> target examples
(``IN: <source> OUT:`` then the target), selects checkpoints on the dev set and is scored on the
test part. The three are disjoint by construction: the test part is the published one, and the
dev set is drawn from the training part and removed from it. Only the training part (dev
removed) ever reaches a tokenizer, a training block or a structural pair.

The dev set is drawn from commands that occur once in the training part: the add-primitive
splits repeat their one bare primitive ("jump") on purpose, and moving it to dev would remove
the only example of it. The draw depends on the task name only, so every variant and seed of a
study is selected on the same dev set.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from sci_scale.config.task import TaskSpec
from sci_scale.data.pairs import PairDataError, scan_split
from sci_scale.data.pairs.base import Example
from sci_scale.data.pairs.cogs import cogs_examples
from sci_scale.data.pairs.scan import scan_template

SEPARATOR = " OUT: "


@dataclass(frozen=True)
class TaskExample:
    source: str  # the command / sentence
    target: str  # the action sequence / logical form
    template: str  # its structural template (examples sharing it are SCL positives)

    @property
    def prompt(self) -> str:
        return f"IN: {self.source} OUT:"

    @property
    def text(self) -> str:
        return f"IN: {self.source}{SEPARATOR}{self.target}"


@dataclass
class TaskParts:
    name: str
    train: list[TaskExample]  # with the published repeats, dev removed
    dev: list[TaskExample]
    test: list[TaskExample]

    def pair_examples(self, benchmark: str) -> list[Example]:
        """The training part as structural examples, each distinct command once (an identical
        anchor and partner would be a trivial positive)."""
        seen: set[str] = set()
        out = []
        for ex in self.train:
            if ex.source not in seen:
                seen.add(ex.source)
                out.append(Example(ex.text, ex.template, benchmark, "train"))
        return out

    def dev_pair_examples(self, benchmark: str) -> list[Example]:
        return [Example(ex.text, ex.template, benchmark, "dev") for ex in self.dev]


def _scan(split: str, part: str) -> list[TaskExample]:
    return [
        TaskExample(command, " ".join(actions), scan_template(command))
        for command, actions in scan_split(split, part)  # type: ignore[arg-type]
    ]


def _cogs(path: Path) -> list[TaskExample]:
    out = []
    for ex in cogs_examples(path, split="task"):
        source, _, target = ex.text.removeprefix("IN: ").partition(SEPARATOR)
        out.append(TaskExample(source, target, ex.template))
    return out


def _cogs_file(root: Path, name: str) -> Path:
    path = root / name
    if not path.is_file():
        raise PairDataError(f"{path}: no such COGS file (data.cogs_path={root})")
    return path


def carve_dev(train: list[TaskExample], size: int, key: str) -> tuple[list, list]:
    """(train without dev, dev): ``size`` commands that occur once in ``train`` (at most a
    tenth of them), drawn with a generator seeded by ``key``."""
    counts = Counter(ex.source for ex in train)
    singles = sorted(ex.source for ex in train if counts[ex.source] == 1)
    chosen = set(random.Random(f"dev:{key}").sample(singles, min(size, len(singles) // 10)))
    if not chosen:
        raise PairDataError(f"{key}: too few distinct training examples to carve a dev set")
    return [ex for ex in train if ex.source not in chosen], [
        ex for ex in train if ex.source in chosen
    ]


def task_parts(spec: TaskSpec, dev_examples: int, cogs_path: str | None = None) -> TaskParts:
    if spec.benchmark == "scan":
        train, test = _scan(spec.split, "train"), _scan(spec.split, "test")
    else:
        root = Path(cogs_path or ".")
        root = root if root.is_dir() else root.parent
        train = _cogs(_cogs_file(root, "train.tsv"))
        test = _cogs(_cogs_file(root, f"{spec.split}.tsv"))
    # The published parts are disjoint; this keeps them so for any file given as COGS data.
    held_out = {ex.source for ex in test}
    train = [ex for ex in train if ex.source not in held_out]
    train, dev = carve_dev(train, dev_examples, spec.name)
    return TaskParts(spec.name, train, dev, test)
