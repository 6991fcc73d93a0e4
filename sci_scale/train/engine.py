"""DeepSpeed ZeRO as the data-parallel engine under megatron's pipeline schedules.

megatron-core's schedules run forward and backward (plain ``torch.autograd.backward``); DeepSpeed
owns what happens to the gradients after that: data-parallel reduction, ZeRO partitioning of
gradients (stage 2) and parameters (stage 3), clipping and the optimizer step. Two DeepSpeed
features make the pairing work without touching either library:

- *torch-style backward*: with a ZeRO optimizer DeepSpeed hooks the backward pass itself, so the
  schedule's own ``backward`` calls reach it;
- ``managed_gradient_accumulation: false``: the schedule accumulates its micro-batches and
  ``engine.step()`` is the accumulation boundary (DeepSpeed's gradient_accumulation_steps is 1;
  the loss is already scaled per micro-batch by the schedule).

DeepSpeed sees megatron's process groups through :class:`MegatronMPU`.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from megatron.core import parallel_state as ps

from sci_scale.config.schema import Config
from sci_scale.runtime.launch_env import read_dist_env

log = logging.getLogger(__name__)


class MegatronMPU:
    """The ``mpu`` interface DeepSpeed asks for, answered from megatron's ``parallel_state``.

    DeepSpeed's "model parallel" group is megatron's tensor x pipeline group (gradient norms are
    summed over it), while its model-parallel *rank* must be the tensor-parallel rank: a
    parameter replicated across tensor ranks (a norm weight) is counted once per pipeline stage.
    """

    get_data_parallel_group = staticmethod(ps.get_data_parallel_group)
    get_data_parallel_rank = staticmethod(ps.get_data_parallel_rank)
    get_data_parallel_world_size = staticmethod(ps.get_data_parallel_world_size)
    get_tensor_model_parallel_group = staticmethod(ps.get_tensor_model_parallel_group)
    get_tensor_model_parallel_rank = staticmethod(ps.get_tensor_model_parallel_rank)
    get_tensor_model_parallel_world_size = staticmethod(ps.get_tensor_model_parallel_world_size)
    get_tensor_model_parallel_src_rank = staticmethod(ps.get_tensor_model_parallel_src_rank)
    get_pipeline_model_parallel_group = staticmethod(ps.get_pipeline_model_parallel_group)
    get_pipeline_model_parallel_rank = staticmethod(ps.get_pipeline_model_parallel_rank)
    get_pipeline_model_parallel_world_size = staticmethod(ps.get_pipeline_model_parallel_world_size)
    get_model_parallel_group = staticmethod(ps.get_model_parallel_group)
    get_model_parallel_rank = staticmethod(ps.get_tensor_model_parallel_rank)

    @staticmethod
    def get_model_parallel_world_size() -> int:
        return (
            ps.get_tensor_model_parallel_world_size() * ps.get_pipeline_model_parallel_world_size()
        )


class ScheduleView:
    """What megatron's schedules see of a DeepSpeed-wrapped model.

    Calls go through the engine (its forward registers the backward hooks ZeRO relies on);
    attribute lookups that megatron makes (``config``, ``model_type``, ``set_input_tensor``)
    reach the model itself. Without this view megatron would find the engine's own ``config``
    (DeepSpeed's dict) first.
    """

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.module = engine.module

    @property
    def config(self) -> Any:
        return self.module.config

    @property
    def model_type(self) -> Any:
        return self.module.model_type

    def set_input_tensor(self, input_tensor: Any) -> None:
        self.module.set_input_tensor(input_tensor)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.engine(*args, **kwargs)


def deepspeed_config(cfg: Config, dp_size: int) -> dict[str, Any]:
    t, p = cfg.train, cfg.parallel
    zero: dict[str, Any] = {"stage": p.zero_stage}
    if p.zero_stage >= 2:
        zero.update({"overlap_comm": False, "contiguous_gradients": True})
    if p.zero_stage == 3:
        # Gather every parameter for each module's forward: CPU-sized models, exact arithmetic.
        zero.update({"stage3_param_persistence_threshold": 0, "stage3_prefetch_bucket_size": 0})
    return {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.global_batch_size // dp_size,
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,
        "gradient_clipping": t.clip_grad,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.model.params_dtype == "bf16"},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def _extensions_dir() -> Path:
    """A per-user cache for DeepSpeed's JIT-built ops; the temp dir when home is read-only."""
    cache = Path.home() / ".cache" / "sci-scale" / "torch_extensions"
    try:
        cache.mkdir(parents=True, exist_ok=True)
        if os.access(cache, os.W_OK):
            return cache
    except OSError:
        pass
    return Path(tempfile.gettempdir()) / f"sci-scale-torch-extensions-{os.getuid()}"


def build_engine(model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: Config):
    """Wrap ``model`` and a torch optimizer in a DeepSpeed engine (no JIT-built ops needed)."""
    os.environ.setdefault("DS_BUILD_OPS", "0")
    # DeepSpeed JIT-builds its CPU shared-memory communication op on first use (~35 s); one
    # cache per user keeps that to once per machine instead of once per run directory.
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(_extensions_dir()))
    # DeepSpeed asserts LOCAL_RANK is set, which only launchers do; a single process started
    # as ``sci-scale train`` (or by Slurm) has its local rank from ``read_dist_env``.
    os.environ.setdefault("LOCAL_RANK", str(read_dist_env()[2]))
    import deepspeed

    for name in ("DeepSpeed", "deepspeed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    engine, ds_optimizer, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        config=deepspeed_config(cfg, ps.get_data_parallel_world_size()),
        mpu=MegatronMPU(),
        dist_init_required=False,
    )
    return engine, ds_optimizer
