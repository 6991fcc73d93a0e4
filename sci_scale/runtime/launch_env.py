"""This process's rank, world size and local rank, as its launcher set them.

torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; ``srun`` sets SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID,
so one task per GPU under srun needs no wrapper. Kept free of torch so the command line can
choose its log level (rank 0 talks, the others warn) before importing anything heavy.
"""

from __future__ import annotations

import os


def read_dist_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun, else Slurm, else a single process."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0
