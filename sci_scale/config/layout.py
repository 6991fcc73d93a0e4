"""Does a configuration's parallel layout fit a number of processes?

One check shared by the trainer (at start-up, from the real world size) and by ``sci-scale
submit`` (before anything is queued, from nodes x tasks per node), so a layout that cannot run
is refused with the same message in both places.
"""

from __future__ import annotations

from sci_scale.config.errors import ConfigError
from sci_scale.config.schema import Config


def check_model_parallel_fits(
    tensor: int, pipeline: int, world_size: int, world_desc: str | None = None
) -> None:
    """TP x PP must divide the world; it takes only numbers, so the trainer's process-group
    set-up can check before any group exists (a ConfigError then raises on every rank alike,
    and nothing hangs on it)."""
    model_parallel = tensor * pipeline
    if world_size < 1 or world_size % model_parallel:
        world = world_desc or f"the world size ({world_size})"
        raise ConfigError(
            f"parallel layout does not fit: parallel.tensor ({tensor}) x parallel.pipeline "
            f"({pipeline}) = {model_parallel} must divide {world}"
        )


def data_parallel_size(cfg: Config, world_size: int, world_desc: str | None = None) -> int:
    """TP x PP x DP = world: the data-parallel size, or a ConfigError naming the numbers."""
    p, t = cfg.parallel, cfg.train
    check_model_parallel_fits(p.tensor, p.pipeline, world_size, world_desc)
    world = world_desc or f"the world size ({world_size})"
    model_parallel = p.tensor * p.pipeline
    dp = world_size // model_parallel
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError(
            f"train.global_batch_size ({t.global_batch_size}) must be a multiple of "
            f"train.micro_batch_size ({t.micro_batch_size}) x data-parallel size ({dp}) "
            f"= {t.micro_batch_size * dp}, where data-parallel size = {world} / "
            f"(parallel.tensor x parallel.pipeline = {model_parallel})"
        )
    return dp
