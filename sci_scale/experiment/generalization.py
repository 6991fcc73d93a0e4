"""``sci-scale experiment generalization``: train on a benchmark, select on dev, score the test.

For every (split, variant, seed) one ordinary sci-scale run trains on the split's training part
as prompt -> target (``data.corpus=task``, loss on the target tokens only); its checkpoints are
scored on the dev set carved from the training part (greedy decoding, exact match, end token
required), the best one is kept (the latest among ties), and only that one is scored on the
published test part. Nothing about the test part reaches training or selection.

Variants (:data:`VARIANTS`):

- ``vanilla``: the LM alone;
- ``pairs_no_scl``: pair blocks (commands sharing a template, from the same training part) in
  ``experiment.pair_rate`` of the blocks, no branch, no SCL: the structure as data only;
- ``sci_joint``: the SCI branch + SCL over those pair blocks, trained with the LM;
- ``sci_pretrain_joint``: an SCI-only phase (``experiment.sci_only_steps`` steps, pair blocks
  at ``experiment.sci_only_pair_rate``), then joint training from it.

Every run lives in ``OUT/runs/<split>/<variant>/seed<k>``; its record is written to
``OUT/results/<split>-<variant>-seed<k>.json`` when done, and a rerun skips the runs that have
one and resumes an interrupted run from its checkpoint. ``--run-index K`` does only the K-th
run of the plan (a Slurm array task); ``--report-only`` gathers what exists.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from sci_scale.checkpoint.index import step_checkpoints
from sci_scale.config.loader import override_config
from sci_scale.config.schema import Config
from sci_scale.experiment.study import RunSpec, Study, StudyError

log = logging.getLogger(__name__)


def _train(cfg: Config) -> None:
    from sci_scale.train.trainer import train

    result = train(cfg, resume="auto")
    if result.step < cfg.train.steps:
        raise StudyError(
            f"{cfg.run.name} stopped at step {result.step} of {cfg.train.steps} "
            f"({result.stop_reason or 'interrupted'}); rerun the study to resume it"
        )


def _write_json(path: Path, record: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)  # whole or absent


def run_one(study: Study, spec: RunSpec) -> dict[str, Any]:
    """Train (or resume), select on dev, score the test part; the record, also on disk."""
    from sci_scale.experiment.selection import score_test, select_on_dev

    path = study.result_path(spec)
    if path.exists():
        log.info("%s: done before (%s)", spec.name, path)
        return json.loads(path.read_text())
    t0 = time.perf_counter()
    cfg = study.run_config(spec)
    if spec.variant.sci_only_first:
        pre = study.run_config(spec, "-sci_only")
        _train(pre)
        last = step_checkpoints(Path(pre.run.dir) / "checkpoints")[0]
        cfg = override_config(cfg, [f"checkpoint.init_from={last}"])
    _train(cfg)
    t1 = time.perf_counter()
    e = cfg.experiment
    selected = select_on_dev(cfg, e.eval_batch_size, e.dev_limit)
    test = score_test(cfg, selected.checkpoint, e.eval_batch_size, e.test_limit)
    record = {
        "benchmark": study.benchmark,
        "variant": spec.variant.key,
        "split": spec.split,
        "seed": spec.seed,
        "exact_match": test.accuracy,
        "correct": test.correct,
        "examples": test.examples,
        "steps": cfg.train.steps,
        "selected_step": selected.step,
        "dev_exact_match": selected.accuracy,
        "dev_curve": selected.curve,
        "wall_s": round(time.perf_counter() - t0, 1),
        "train_s": round(t1 - t0, 1),
        "eval_s": round(time.perf_counter() - t1, 1),
        "checkpoint": str(selected.checkpoint),
    }
    _write_json(path, record)
    log.info(
        "%s: test exact match %.2f%% (%d/%d) at step %d (dev %.2f%%)",
        spec.name, 100 * test.accuracy, test.correct, test.examples, selected.step,
        100 * selected.accuracy,
    )  # fmt: skip
    return record


def gather(study: Study) -> list[dict[str, Any]]:
    """Every finished run's record of this study's plan, in plan order."""
    return [
        json.loads(p.read_text()) for p in (study.result_path(s) for s in study.plan) if p.exists()
    ]


def run_study(
    study: Study, run_index: int | None = None, report_only: bool = False, command: str = ""
) -> Path:
    """Run the plan (or its ``run_index``-th run), then write results.json and REPORT.md."""
    from sci_scale.experiment.generalization_report import write_study_report

    plan = study.plan
    study.out.mkdir(parents=True, exist_ok=True)
    if run_index is not None:
        if not 0 <= run_index < len(plan):
            raise StudyError(f"--run-index {run_index}: the plan has runs 0..{len(plan) - 1}")
        plan = [plan[run_index]]
    if not report_only:
        for n, spec in enumerate(plan, start=1):
            log.info("study run %d/%d: %s", n, len(plan), spec.name)
            run_one(study, spec)
    records = gather(study)
    _write_json(study.out / "results.json", records)
    return write_study_report(study, records, command)
