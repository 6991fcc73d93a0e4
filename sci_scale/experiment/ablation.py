"""The SCI ablation: does the structural branch help, cost perplexity, or collapse?

One base config is trained as several variants, each under every seed, with the same model
shape, steps and batch (so the same LM token budget), then every final checkpoint is scored by
the same evaluations (:mod:`sci_scale.eval.suite`):

- ``vanilla``: the LM alone, no pair blocks, no branch;
- ``pairs_no_scl``: pair blocks at ``experiment.pair_rate`` in the LM stream, no branch and no
  contrastive loss (the contrastive-injection baseline: structure only as text);
- ``sci_joint_<rate>``: branch + SCL trained with the LM, for each ``experiment.pair_rates``;
- ``sci_frozen``: the branch trained first with the backbone fixed (``sci.mode=sci_only``,
  ``experiment.sci_only_steps`` steps, pair blocks at ``experiment.sci_only_pair_rate``), then
  frozen while the LM trains from scratch beside it (``sci.mode=frozen``; the fusion gate and
  output projection still learn).

Every run is a normal sci-scale run under ``OUT/runs/<variant>/seed<k>`` (its metrics.jsonl,
checkpoint and data cache are where ``sci-scale status`` and ``sci-scale eval`` expect them).
A run's figures are written to ``OUT/results/<variant>-seed<k>.json`` when it is done, and a
rerun skips the runs that have them and resumes an interrupted one from its checkpoint, so the
study survives being stopped.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from sci_scale.checkpoint.index import latest_checkpoint
from sci_scale.config.loader import config_to_dict, override_config
from sci_scale.config.schema import Config
from sci_scale.data.pairs import scan_split
from sci_scale.errors import UserError
from sci_scale.experiment.report import write_report
from sci_scale.experiment.variants import Variant, ablation_variants

log = logging.getLogger(__name__)

RESULTS_DIR = "results"


class ExperimentError(UserError, RuntimeError):
    pass


def cogs_eval_file(cfg: Config) -> Path | None:
    """The COGS file scored: the in-distribution ``test.tsv`` beside ``data.cogs_path``'s
    training file, else its ``dev.tsv``; None without COGS in the pair sources."""
    if "cogs" not in cfg.data.pair_sources or not cfg.data.cogs_path:
        return None
    root = Path(cfg.data.cogs_path)
    root = root if root.is_dir() else root.parent
    for name in ("test.tsv", "dev.tsv"):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(f"{root}: no test.tsv or dev.tsv to evaluate COGS on")


def study_config(cfg: Config, out: Path) -> Config:
    """What every run shares: one data cache (one tokenizer per seed, so the variants of a
    seed are scored on the same tokens), SCAN training pairs from the combined split of the
    evaluated splits, and only the final checkpoint kept. A ``checkpoint.init_from`` (an
    imported backbone) starts every run, and the SCI-only phase of "SCI frozen"."""
    e = cfg.experiment
    for split in e.scan_splits:
        scan_split(split, "test")  # an unknown split fails now, not after hours of training
    overrides = [
        f"data.cache_dir={out / 'data'}",
        f"checkpoint.interval={cfg.train.steps}",
        "checkpoint.keep_last=1",
        "checkpoint.save_final=true",
    ]
    if e.scan_splits and "scan" in cfg.data.pair_sources:
        overrides.append(f"data.scan_split={'+'.join(e.scan_splits)}")
    return override_config(cfg, overrides)


class Ablation:
    def __init__(self, cfg: Config, out: Path) -> None:
        self.out = out
        self.cfg = study_config(cfg, out)
        self.variants = ablation_variants(self.cfg)
        self.results = out / RESULTS_DIR

    def run_dir(self, key: str, seed: int) -> Path:
        return self.out / "runs" / key / f"seed{seed}"

    def result_path(self, key: str, seed: int) -> Path:
        return self.results / f"{key}-seed{seed}.json"

    def run_config(self, variant: Variant, seed: int, extra: list[str] | None = None) -> Config:
        return override_config(
            self.cfg,
            [
                f"run.dir={self.run_dir(variant.key, seed)}",
                f"run.name={variant.key}-seed{seed}",
                f"train.seed={seed}",
                f"sci.mode={variant.sci_mode}",
                f"data.pair_rate={variant.pair_rate}",
                *(extra or []),
            ],
        )

    def _train(self, cfg: Config) -> Path:
        from sci_scale.train.trainer import train

        result = train(cfg, resume="auto")
        ckpt = latest_checkpoint(Path(cfg.run.dir) / "checkpoints")
        if result.step < cfg.train.steps or ckpt is None:
            raise ExperimentError(
                f"{cfg.run.name} stopped at step {result.step} of {cfg.train.steps}"
                f" ({result.stop_reason or 'no final checkpoint'}); rerun to resume"
            )
        return ckpt

    def _sci_only_phase(self, seed: int) -> Path:
        e = self.cfg.experiment
        pre = Variant("sci_only", "SCI-only phase", "sci_only", e.sci_only_pair_rate)
        steps = e.sci_only_steps
        cfg = self.run_config(
            pre,
            seed,
            [
                f"train.steps={steps}",
                f"train.warmup_steps={min(self.cfg.train.warmup_steps, max(1, steps // 10))}",
                f"train.eval_interval={steps}",
                f"checkpoint.interval={steps}",
            ],
        )
        return self._train(cfg)

    def evaluate(self, ckpt: Path) -> dict[str, float]:
        from sci_scale.eval.suite import EvalPlan, evaluate_checkpoint_dir

        e = self.cfg.experiment
        plan = EvalPlan(
            ppl_blocks=e.ppl_blocks,
            scan_splits=list(e.scan_splits),
            cogs_file=cogs_eval_file(self.cfg),
            limit=e.eval_limit,
            batch_size=e.eval_batch_size,
            probe_templates=e.probe_templates,
        )
        return evaluate_checkpoint_dir(ckpt, plan)  # the runs' data.cache_dir holds the corpus

    def _write(self, path: Path, record: dict[str, Any]) -> None:
        self.results.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        os.replace(tmp, path)  # a result file is whole or absent

    def run_one(self, variant: Variant, seed: int, reevaluate: bool = False) -> dict[str, Any]:
        path = self.result_path(variant.key, seed)
        if path.exists():
            record = json.loads(path.read_text())
            if not reevaluate:
                log.info("%s seed %d: done before, figures in %s", variant.key, seed, path)
                return record
            log.info("%s seed %d: evaluating its final checkpoint again", variant.key, seed)
            t0 = time.perf_counter()
            record["figures"] = self.evaluate(Path(record["checkpoint"]))
            record["eval_s"] = time.perf_counter() - t0
            self._write(path, record)
            return record
        t0 = time.perf_counter()
        extra = []
        if variant.sci_only_first:
            extra.append(f"checkpoint.init_from={self._sci_only_phase(seed)}")
        cfg = self.run_config(variant, seed, extra)
        ckpt = self._train(cfg)
        t1 = time.perf_counter()
        figures = self.evaluate(ckpt)
        t = cfg.train
        record = {
            "variant": variant.key,
            "label": variant.label,
            "seed": seed,
            "sci_mode": variant.sci_mode,
            "pair_rate": variant.pair_rate,
            "lm_tokens": t.steps * t.global_batch_size * cfg.model.seq_length,
            "checkpoint": str(ckpt),
            "metrics": str(Path(cfg.run.dir) / "metrics.jsonl"),
            "train_s": t1 - t0,
            "eval_s": time.perf_counter() - t1,
            "figures": figures,
        }
        self._write(path, record)
        return record

    def run(self, reevaluate: bool = False) -> list[dict[str, Any]]:
        seeds = self.cfg.experiment.seeds
        total = len(seeds) * len(self.variants)
        records = []
        for n, (seed, variant) in enumerate(
            ((s, v) for s in seeds for v in self.variants), start=1
        ):
            log.info("ablation run %d/%d: %s, seed %d", n, total, variant.label, seed)
            records.append(self.run_one(variant, seed, reevaluate))
        return records


def run_ablation(cfg: Config, out: Path, command: str = "", reevaluate: bool = False) -> Path:
    """Train, evaluate and report; returns the path of ``REPORT.md``. ``reevaluate``: score
    the final checkpoints of finished runs again (after changing ``experiment`` evaluation
    settings) instead of reading their figures back; nothing is retrained."""
    out.mkdir(parents=True, exist_ok=True)
    ablation = Ablation(cfg, out)
    (out / "config.json").write_text(json.dumps(config_to_dict(ablation.cfg), indent=2) + "\n")
    t0 = time.perf_counter()
    records = ablation.run(reevaluate)
    return write_report(
        out, ablation.cfg, ablation.variants, records, command, time.perf_counter() - t0
    )
