"""Checkpoint selection on the dev set, then one score on the test part.

Every checkpoint a study run kept is decoded on the dev set carved from the training part
(:mod:`sci_scale.data.task`); the one with the best exact match (the latest among ties) is the
run's model, and only it is decoded on the test part. The test part is read here and nowhere
else in a study, after training and selection are over.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from sci_scale.checkpoint.index import step_checkpoints
from sci_scale.checkpoint.load import checkpoint_tokenizer, load_whole_model, single_process
from sci_scale.config.schema import Config
from sci_scale.data.build import config_task_parts
from sci_scale.eval import generalization as gen
from sci_scale.eval.suite import token_budget

log = logging.getLogger(__name__)


@dataclass
class Selected:
    checkpoint: Path
    step: int
    accuracy: float  # on the dev set
    curve: list[list[float]] = field(default_factory=list)  # [step, dev exact match]


def _step(ckpt: Path) -> int:
    return int(ckpt.name.removeprefix("step_"))


def exact_match_of(
    ckpt: Path, pairs: list[tuple[str, str]], task: str, batch_size: int
) -> gen.EvalResult:
    with single_process():
        loaded = load_whole_model(ckpt)
        tokenizer = checkpoint_tokenizer(loaded.cfg, loaded.state)
        budget = token_budget(tokenizer, pairs)
        generate = gen.GreedyGenerator(loaded.model, tokenizer, loaded.rows, budget, batch_size)
        return gen.exact_match(generate, task, pairs)


def select_on_dev(cfg: Config, batch_size: int, limit: int | None = None) -> Selected:
    parts = config_task_parts(cfg)
    dev = [(ex.source, ex.target) for ex in parts.dev][:limit]
    ckpts = sorted(step_checkpoints(Path(cfg.run.dir) / "checkpoints"), key=_step)
    if not ckpts:
        raise FileNotFoundError(f"{cfg.run.dir}: no checkpoint to select from")
    best: Selected | None = None
    curve = []
    for ckpt in ckpts:
        result = exact_match_of(ckpt, dev, f"{parts.name}/dev", batch_size)
        curve.append([_step(ckpt), result.accuracy])
        log.info("%s dev: %d/%d exact", ckpt.name, result.correct, result.examples)
        if best is None or result.accuracy >= best.accuracy:
            best = Selected(ckpt, _step(ckpt), result.accuracy)
    assert best is not None
    best.curve = curve
    return best


def score_test(
    cfg: Config, ckpt: Path, batch_size: int, limit: int | None = None
) -> gen.EvalResult:
    parts = config_task_parts(cfg)
    test = [(ex.source, ex.target) for ex in parts.test][:limit]
    return exact_match_of(ckpt, test, f"{parts.name}/test", batch_size)
