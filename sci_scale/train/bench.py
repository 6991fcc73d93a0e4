"""Throughput of a config, and what the SCI branch costs: ``sci-scale bench``.

The config runs as given and again with ``sci.mode=off``, in one process, alternating one
optimizer step of each so that machine noise (other jobs, frequency changes) falls on both
alike. Both read the same blocks in the same order, pair blocks included at their natural rate.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from sci_scale.config import Config
from sci_scale.runtime.distributed import destroy_distributed
from sci_scale.train.trainer import Trainer

log = logging.getLogger("sci_scale.bench")


@dataclass
class BenchResult:
    variant: str
    step_times_s: list[float]
    tokens_per_step: int

    @property
    def median_step_s(self) -> float:
        return statistics.median(self.step_times_s)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.median_step_s


def _variant(cfg: Config, run_dir: Path, **sci: object) -> Config:
    new = dataclasses.replace(
        cfg,
        run=dataclasses.replace(cfg.run, dir=str(run_dir)),
        sci=dataclasses.replace(cfg.sci, **sci),
        logging=dataclasses.replace(cfg.logging, wandb_mode="disabled", console=False),
        checkpoint=dataclasses.replace(cfg.checkpoint, save_final=False),
    )
    if new.data.cache_dir is None:  # share one data cache: both variants read the same blocks
        new = dataclasses.replace(
            new, data=dataclasses.replace(new.data, cache_dir=str(run_dir.parent / "data"))
        )
    return new


def bench(cfg: Config, steps: int, warmup: int) -> list[BenchResult]:
    """Median step time and tokens/s of ``cfg`` and of the same config without the branch."""
    with tempfile.TemporaryDirectory(prefix="sci-scale-bench-") as tmp:
        variants = {"sci": _variant(cfg, Path(tmp) / "sci")}
        if cfg.sci.mode != "off":
            variants["off"] = _variant(cfg, Path(tmp) / "off", mode="off")
        trainers = {}
        for name, variant in variants.items():
            trainer = Trainer(variant)
            trainer.setup()
            if trainer.metrics is not None:
                trainer.metrics.close()  # timing only: nothing is logged
                trainer.metrics = None
            trainers[name] = trainer
        times: dict[str, list[float]] = {name: [] for name in trainers}
        tokens = cfg.train.global_batch_size * cfg.model.seq_length
        try:
            for i in range(warmup + steps):
                for name, trainer in trainers.items():
                    start = time.perf_counter()
                    trainer.train_step()
                    if i >= warmup:
                        times[name].append(time.perf_counter() - start)
        finally:
            destroy_distributed()
    return [BenchResult(name, t, tokens) for name, t in times.items()]


def report(results: list[BenchResult]) -> str:
    lines = [f"{'variant':<8} {'median step':>12} {'tokens/s':>10}"]
    for r in results:
        lines.append(f"{r.variant:<8} {r.median_step_s * 1e3:>10.1f}ms {r.tokens_per_s:>10,.0f}")
    by_name = {r.variant: r for r in results}
    if "off" in by_name:
        ratio = by_name["sci"].median_step_s / by_name["off"].median_step_s
        lines.append(f"SCI branch step-time ratio (sci / off): {ratio:.3f}")
    return "\n".join(lines)
