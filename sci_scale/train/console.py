"""What a training run prints: its set-up in a few lines, then one progress line per interval.

The console is for the person watching the run; ``metrics.jsonl`` (``train.metrics``) keeps
every figure of every step. Only the main rank prints.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from sci_scale.config import Config
from sci_scale.model.sci_branch import is_sci_parameter

log = logging.getLogger("sci_scale.train")


def fmt_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def layout_summary(tp: int, pp: int, dp: int, zero_stage: int, virtual: int = 1) -> str:
    interleaved = f" (interleaved, {virtual} chunks per stage)" if virtual > 1 else ""
    return f"TP{tp} x PP{pp} x DP{dp}, ZeRO-{zero_stage}{interleaved}"


def runtime_summary(model: Any, cfg: Config) -> str:
    """One line: device, implementation, attention kernel, precision, sequence parallelism."""
    device = model.device
    name = f"{device}"
    if device.type == "cuda":
        name += f" ({torch.cuda.get_device_name(device)})"
    compute = "bf16 autocast" if model.autocast_dtype is not None else "fp32"
    weights = "bf16" if cfg.model.params_dtype == "bf16" else "fp32"
    master = "fp32 (DeepSpeed)" if weights == "bf16" else "fp32"
    return (
        f"device {name}, {model.spec_name}, compute {compute}, weights {weights}, master "
        f"weights {master}, sequence parallel {'on' if cfg.parallel.sequence_parallel else 'off'}"
    )


def log_setup(model: torch.nn.Module, first_chunk: Any, cfg: Config, dp: int, world: int) -> None:
    """The model, the runtime, the parallel layout and the training phases, once per run."""
    n_params = sum(p.numel() for p in model.parameters())
    n_sci = sum(p.numel() for n, p in model.named_parameters() if is_sci_parameter(n))
    log.info(
        "model: %s spec, %.2fM parameters (SCI branch %.2fM), sci.mode=%s",
        first_chunk.spec_name,
        n_params / 1e6,
        n_sci / 1e6,
        cfg.sci.mode,
    )
    log.info("runtime: %s", runtime_summary(first_chunk, cfg))
    p = cfg.parallel
    log.info(
        "layout: %s (%d process%s)",
        layout_summary(p.tensor, p.pipeline, dp, p.zero_stage, p.virtual_pipeline),
        world,
        "" if world == 1 else "es",
    )
    ph = cfg.phases
    if ph.backbone_frozen_until > 0 or ph.partial_until > 0:
        log.info(
            "phases: backbone frozen to step %d, last %d layer(s) train to step %d, then joint",
            ph.backbone_frozen_until,
            ph.unfreeze_last_n,
            ph.partial_until,
        )


class ProgressLog:
    """One line for the last ``train.log_interval`` steps: the latest LM loss, the window's
    mean SCL and cosine gap (pair blocks are rare, so one step's SCL is often absent), the eval
    LM loss on eval steps, and throughput and ETA from the window's mean step time."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.window: list[dict[str, Any]] = []

    def add(self, record: dict[str, Any]) -> None:
        """Record a step; print its line on interval steps, the first and the last."""
        t = self.cfg.train
        self.window = [*self.window, record][-t.log_interval :]
        step = record["step"]
        if self.cfg.logging.console and (step % t.log_interval == 0 or step in (1, t.steps)):
            log.info(self.line())

    def line(self) -> str:
        t, record, window = self.cfg.train, self.window[-1], self.window
        step_time = sum(r["step_time_s"] for r in window) / len(window)
        eta = step_time * (t.steps - record["step"])
        parts = [f"step {record['step']}/{t.steps}", f"lm {record['lm_loss']:.4f}"]
        scl = [r for r in window if r.get("scl_loss") is not None]
        if scl:
            mean_scl = sum(r["scl_loss"] for r in scl) / len(scl)
            gaps = [r["cos_gap"] for r in scl if math.isfinite(r["cos_gap"])]
            gap = f" gap {sum(gaps) / len(gaps):+.3f}" if gaps else ""
            parts.append(f"scl {mean_scl:.4f} ({len(scl)} step(s){gap})")
        if "eval_lm_loss" in record:
            parts.append(f"eval lm {record['eval_lm_loss']:.4f}")
            if record.get("eval_scl_loss") is not None:
                parts.append(
                    f"eval scl {record['eval_scl_loss']:.4f} gap {record['eval_cos_gap']:+.3f}"
                )
        parts += [
            f"lr {record['lr']:.2e}",
            f"{t.global_batch_size * self.cfg.model.seq_length / step_time:,.0f} tok/s",
            f"ETA {fmt_duration(eta)}",
        ]
        return " | ".join(parts)
