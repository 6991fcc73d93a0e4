"""Does a configuration's parallel layout fit a number of processes?

One check shared by the trainer (at start-up, from the real world size) and by ``sci-scale
submit`` (before anything is queued, from nodes x tasks per node), so a layout that cannot run
is refused with the same message in both places.
"""

from __future__ import annotations

from sci_scale.config.errors import ConfigError
from sci_scale.config.schema import Config


def data_parallel_size(cfg: Config, world_size: int, world_desc: str | None = None) -> int:
    """TP x PP x DP = world: the data-parallel size, or a ConfigError naming the numbers."""
    p, t = cfg.parallel, cfg.train
    world = world_desc or f"the world size ({world_size})"
    model_parallel = p.tensor * p.pipeline
    if world_size < 1 or world_size % model_parallel:
        raise ConfigError(
            f"parallel layout does not fit: parallel.tensor ({p.tensor}) x parallel.pipeline "
            f"({p.pipeline}) = {model_parallel} must divide {world}"
        )
    dp = world_size // model_parallel
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError(
            f"train.global_batch_size ({t.global_batch_size}) must be a multiple of "
            f"train.micro_batch_size ({t.micro_batch_size}) x data-parallel size ({dp}) "
            f"= {t.micro_batch_size * dp}, where data-parallel size = {world} / "
            f"(parallel.tensor x parallel.pipeline = {model_parallel})"
        )
    return dp
