"""``data.task``: which benchmark a ``data.corpus=task`` run trains on.

``scan:<split>`` names a published SCAN split (or several joined by '+', trained on the
intersection of their training parts); ``cogs`` reads ``data.cogs_path``'s ``train.tsv`` and is
scored on its ``gen.tsv`` (``cogs:test``: the in-distribution ``test.tsv``). The split name
itself is checked where the data is built (the data package knows the splits); here only the
form and the keys it needs.
"""

from __future__ import annotations

from dataclasses import dataclass

from sci_scale.config.errors import ConfigError
from sci_scale.config.schema import Config

TASK_BENCHMARKS = ("scan", "cogs")


@dataclass(frozen=True)
class TaskSpec:
    benchmark: str  # scan | cogs
    split: str  # a SCAN split; for COGS the file scored: "gen" (gen.tsv) or "test" (test.tsv)

    @property
    def name(self) -> str:
        return f"{self.benchmark}:{self.split}"


def parse_task(value: str) -> TaskSpec:
    benchmark, _, split = value.partition(":")
    if benchmark not in TASK_BENCHMARKS:
        raise ConfigError(
            f"data.task={value!r}: the benchmark must be one of {', '.join(TASK_BENCHMARKS)} "
            "(e.g. scan:simple, scan:length, cogs)"
        )
    if benchmark == "scan" and not split:
        raise ConfigError(f"data.task={value!r}: name the SCAN split, e.g. scan:simple")
    if benchmark == "cogs" and split not in ("", "gen", "test"):
        raise ConfigError(
            f"data.task={value!r}: COGS is scored on gen.tsv (cogs, cogs:gen) or on the "
            "in-distribution test.tsv (cogs:test)"
        )
    return TaskSpec(benchmark, split or "gen")


def check_task(cfg: Config) -> None:
    d = cfg.data
    if d.corpus != "task":
        if d.task is not None:
            raise ConfigError(f"data.task={d.task!r} is only read with data.corpus=task")
        return
    if d.task is None:
        raise ConfigError("data.corpus is 'task' but data.task is not set (e.g. scan:simple)")
    spec = parse_task(d.task)
    if spec.benchmark == "cogs" and not d.cogs_path:
        raise ConfigError("data.task=cogs needs data.cogs_path (the directory of train.tsv)")
    if d.task_dev_examples < 1:
        raise ConfigError(f"data.task_dev_examples must be >= 1, got {d.task_dev_examples}")
