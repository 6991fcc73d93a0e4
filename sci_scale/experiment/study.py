"""What a generalization study is: its splits, variants, seeds and the plan of runs.

A study is a plan of (split, variant, seed) runs over one base config; each run is an ordinary
sci-scale training run whose config :meth:`Study.run_config` derives (the task, the variant's
SCI mode and pair rate, the seed, checkpoints at every eval interval for selection). The runner
(:mod:`sci_scale.experiment.generalization`) and the report both read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sci_scale.config.loader import override_config
from sci_scale.config.schema import Config
from sci_scale.errors import UserError

SPLITS: dict[str, tuple[str, ...]] = {
    "scan": ("simple", "length", "addprim_jump", "addprim_turn_left", "template_around_right"),
    "cogs": ("gen",),
}


@dataclass(frozen=True)
class StudyVariant:
    key: str
    label: str
    sci_mode: str  # of the (final) training run
    uses_pairs: bool
    sci_only_first: bool = False


VARIANTS: dict[str, StudyVariant] = {
    v.key: v
    for v in (
        StudyVariant("vanilla", "vanilla", "off", False),
        StudyVariant("pairs_no_scl", "LM + pairs, no SCL", "off", True),
        StudyVariant("sci_joint", "SCI joint", "joint", True),
        StudyVariant("sci_pretrain_joint", "SCI-only, then joint", "joint", True, True),
    )
}


@dataclass(frozen=True)
class Preset:
    splits: tuple[str, ...]
    variants: tuple[str, ...]
    seeds: int


PRESETS: dict[str, Preset] = {
    "quick": Preset(("simple", "length"), ("vanilla", "sci_joint"), 1),
    "full": Preset(SPLITS["scan"], tuple(VARIANTS), 5),
}


class StudyError(UserError, ValueError):
    pass


@dataclass(frozen=True)
class RunSpec:
    split: str
    variant: StudyVariant
    seed: int

    @property
    def name(self) -> str:
        return f"{self.split}-{self.variant.key}-seed{self.seed}"


@dataclass
class Study:
    cfg: Config
    out: Path
    benchmark: str
    splits: list[str]
    variants: list[StudyVariant]
    seeds: list[int]

    def __post_init__(self) -> None:
        valid = SPLITS.get(self.benchmark)
        if valid is None:
            raise StudyError(f"--benchmark {self.benchmark!r}: choose one of {', '.join(SPLITS)}")
        if self.benchmark == "scan":
            from sci_scale.data.pairs.scan import SCAN_SPLITS

            valid = SCAN_SPLITS  # every published split may be studied, not only the defaults
        for split in self.splits:
            for part in split.split("+"):
                if part not in valid:
                    raise StudyError(
                        f"--splits: {split!r} is not a {self.benchmark} split; valid: "
                        f"{', '.join(valid)}"
                    )
        if self.benchmark == "cogs" and not self.cfg.data.cogs_path:
            raise StudyError("--benchmark cogs needs data.cogs_path=DIR (train.tsv, gen.tsv)")

    @property
    def plan(self) -> list[RunSpec]:
        """Seed-major, so that a partial study already has every cell at its first seeds."""
        return [
            RunSpec(split, variant, seed)
            for seed in self.seeds
            for split in self.splits
            for variant in self.variants
        ]

    def result_path(self, spec: RunSpec) -> Path:
        return self.out / "results" / f"{spec.name}.json"

    def run_dir(self, spec: RunSpec, phase: str = "") -> Path:
        return self.out / "runs" / spec.split / f"{spec.variant.key}{phase}" / f"seed{spec.seed}"

    def task(self, split: str) -> str:
        return f"{self.benchmark}:{split}"

    def run_config(self, spec: RunSpec, phase: str = "") -> Config:
        e = self.cfg.experiment
        v = spec.variant
        sci_only = phase == "-sci_only"
        rate = e.sci_only_pair_rate if sci_only else (e.pair_rate if v.uses_pairs else 0.0)
        steps = e.sci_only_steps if sci_only else self.cfg.train.steps
        overrides = [
            f"run.dir={self.run_dir(spec, phase)}",
            f"run.name={spec.name}{phase}",
            f"train.seed={spec.seed}",
            "data.corpus=task",
            f"data.task={self.task(spec.split)}",
            f"data.cache_dir={self.out / 'data' / spec.split}",
            f"data.pair_rate={rate}",
            f"sci.mode={'sci_only' if sci_only else v.sci_mode}",
            f"train.steps={steps}",
            # every eval interval is a candidate for selection on dev; all are kept
            f"checkpoint.interval={min(steps, self.cfg.train.eval_interval)}",
            "checkpoint.keep_last=0",
            "checkpoint.save_final=true",
        ]
        if sci_only:
            overrides += [
                f"train.warmup_steps={min(self.cfg.train.warmup_steps, max(1, steps // 10))}",
                f"train.eval_interval={steps}",
                f"checkpoint.interval={steps}",
            ]
        return override_config(self.cfg, overrides)
