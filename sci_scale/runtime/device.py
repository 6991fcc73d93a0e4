"""The one device a process computes on, chosen once from ``runtime.device``.

Everything that allocates (the model, batches, losses, metric and flag tensors) asks
:func:`current_device` instead of guessing: a tensor made on the CPU by default and then handed
to an NCCL collective is the commonest way a CPU-tested trainer fails on its first GPU step.
``cuda`` that cannot be honoured is an error, never a silent CPU run at a hundredth of the speed.
"""

from __future__ import annotations

import os

import torch

from sci_scale.errors import UserError


class DeviceError(UserError, RuntimeError):
    """The requested device cannot be used on this node."""


_DEVICE: torch.device | None = None


def local_world_size() -> int | None:
    """Processes on this node, as the launcher says (torchrun, then Slurm), if it says."""
    env = os.environ
    if "LOCAL_WORLD_SIZE" in env:
        return int(env["LOCAL_WORLD_SIZE"])
    if "SLURM_NTASKS_PER_NODE" in env:
        # "4" or "4(x2)" or "4,2" (heterogeneous): the largest count bounds this node
        counts = [int(part.split("(")[0]) for part in env["SLURM_NTASKS_PER_NODE"].split(",")]
        return max(counts)
    return None


def resolve_device(requested: str, local_rank: int = 0) -> torch.device:
    """``auto | cuda | cpu`` -> this process's device; a clear error when CUDA cannot serve it."""
    if requested not in ("auto", "cuda", "cpu"):
        raise DeviceError(f"runtime.device={requested!r}: valid choices are auto, cuda, cpu")
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        build = "a CPU-only torch build" if torch.version.cuda is None else "no visible GPU"
        raise DeviceError(
            f"runtime.device=cuda but CUDA is unavailable ({build}; "
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); "
            "use runtime.device=cpu to run on the CPU on purpose"
        )
    count = torch.cuda.device_count()
    local = local_world_size()
    if local is not None and local > count:
        raise DeviceError(
            f"{local} processes on this node but {count} visible GPU(s): one process per GPU; "
            "launch with --nproc-per-node / --ntasks-per-node <= the GPUs per node"
        )
    if local_rank >= count:
        raise DeviceError(
            f"local rank {local_rank} has no GPU: {count} visible GPU(s) on this node"
        )
    return torch.device("cuda", local_rank)


def set_current_device(device: torch.device) -> torch.device:
    """Make ``device`` this process's device (and CUDA's current device, before any NCCL)."""
    global _DEVICE
    if device.type == "cuda":
        torch.cuda.set_device(device)
    _DEVICE = device
    return device


def current_device() -> torch.device:
    """This process's device: the one set at start, else CUDA's current one, else the CPU."""
    if _DEVICE is not None:
        return _DEVICE
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def reset_current_device() -> None:
    global _DEVICE
    _DEVICE = None


def autocast_dtype(compute_dtype: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``model.compute_dtype`` on ``device``; None: no autocast (fp32)."""
    if compute_dtype == "auto":
        compute_dtype = "bf16" if device.type == "cuda" else "fp32"
    return torch.bfloat16 if compute_dtype == "bf16" else None
