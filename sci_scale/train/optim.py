"""AdamW with Megatron's parameter groups, and the warm-up + cosine learning-rate schedule.

Norm weights, biases and the SCI fusion gate get no weight decay (decaying a gain or the gate
toward zero fights the model); the SCI branch may run at ``sci.lr_scale`` times the base rate.
The schedule is a pure function of the step, so a resumed run needs nothing but the step.
"""

from __future__ import annotations

import math

import torch

from sci_scale.config.errors import ConfigError
from sci_scale.config.schema import Config
from sci_scale.model.sci_branch import is_sci_parameter


def _no_decay(name: str, param: torch.nn.Parameter) -> bool:
    return param.ndim < 2 or name.endswith(".bias") or name.endswith("sci.gate")


def param_groups(model: torch.nn.Module, cfg: Config) -> list[dict]:
    """Trainable parameters split by (weight decay, lr scale); empty groups are dropped.

    The SCI branch gets groups of its own only when ``sci.lr_scale`` differs from 1: every
    pipeline stage then has the same two groups, which DeepSpeed's ZeRO needs (it reduces the
    gradient norm group by group across stages, so unequal group counts would deadlock).
    """
    buckets: dict[tuple[bool, float], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        lr_scale = cfg.sci.lr_scale if is_sci_parameter(name) else 1.0
        buckets.setdefault((_no_decay(name, param), lr_scale), []).append(param)
    groups = []
    for (no_decay, lr_scale), params in sorted(buckets.items()):
        groups.append(
            {
                "params": params,
                "weight_decay": 0.0 if no_decay else cfg.train.weight_decay,
                "lr_scale": lr_scale,
            }
        )
    return groups


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.AdamW:
    t = cfg.train
    groups = param_groups(model, cfg)
    if not groups:
        raise ConfigError("nothing to train: every parameter is frozen by sci.mode")
    return torch.optim.AdamW(
        groups,
        lr=t.lr,
        betas=(t.adam_beta1, t.adam_beta2),
        eps=t.adam_eps,
        weight_decay=t.weight_decay,
        # The for-loop implementation: bit-identical results whatever the parameter grouping,
        # which the parallel-equality and resume tests rely on.
        foreach=False,
    )


def lr_at(step: int, cfg: Config) -> float:
    """Learning rate for optimizer step ``step`` (1-based): linear warm-up, then cosine."""
    t = cfg.train
    if t.warmup_steps > 0 and step <= t.warmup_steps:
        return t.lr * step / t.warmup_steps
    decay_steps = max(1, t.steps - t.warmup_steps)
    progress = min(1.0, (step - t.warmup_steps) / decay_steps)
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
