"""Process groups, megatron ``parallel_state`` and seeding.

A single process (the CPU demo, tests) still gets a real one-rank process group, so the code
path is the one torchrun and Slurm jobs take. Ranks come from torchrun's variables or, when
absent, from Slurm's (``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``).
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from sci_scale.config.layout import check_model_parallel_fits
from sci_scale.runtime.collective_check import install_from_env
from sci_scale.runtime.cpu_compat import apply_cpu_compat
from sci_scale.runtime.device import reset_current_device, resolve_device, set_current_device
from sci_scale.runtime.launch_env import read_dist_env

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(
    tensor: int = 1, pipeline: int = 1, virtual_pipeline: int = 1, device: str = "auto"
) -> DistEnv:
    """Choose this process's device, then initialise torch.distributed (NCCL on CUDA, gloo on
    the CPU) and megatron's tensor/pipeline/data groups.

    On CUDA the device is set from the local rank *before* the process group exists, so NCCL
    binds each rank to its own GPU. A CPU run applies megatron's CPU compatibility shims, also
    on a machine that has a GPU (``runtime.device=cpu``)."""
    rank, world, local_rank = read_dist_env()
    # Raised on every rank before any process group exists: nothing can hang on it.
    check_model_parallel_fits(tensor, pipeline, world)
    chosen = resolve_device(device, local_rank)
    if chosen.type == "cpu":
        apply_cpu_compat(force=True)
    backend = "nccl" if chosen.type == "cuda" else "gloo"
    if not dist.is_initialized():
        set_current_device(chosen)
        install_from_env()
        if world == 1 and "MASTER_ADDR" not in os.environ:
            store = dist.HashStore()
            dist.init_process_group(backend, store=store, rank=0, world_size=1)
        else:
            dist.init_process_group(
                backend,
                rank=rank,
                world_size=world,
                device_id=chosen if chosen.type == "cuda" else None,
            )
    else:
        set_current_device(chosen)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tensor,
            pipeline_model_parallel_size=pipeline,
            virtual_pipeline_model_parallel_size=virtual_pipeline if virtual_pipeline > 1 else None,
        )
    log.debug("rank %d/%d on %s (%s)", rank, world, chosen, backend)
    return DistEnv(
        rank=rank, world_size=world, local_rank=local_rank, backend=backend, device=chosen
    )


def destroy_distributed() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    reset_current_device()


def seed_everything(seed: int) -> None:
    """Seed Python, numpy, torch and megatron's model-parallel RNG tracker."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
