"""The training loop: megatron's forward-backward schedule, AdamW, eval, checkpoints, logging.

One step = ``global_batch_size / (micro_batch_size * dp)`` micro-batches through
``get_forward_backward_func()`` (gradients accumulate), then clipping and one AdamW update. The
data position is a consumed-sample count, the learning rate and SCL weight are functions of the
step, and every RNG is checkpointed, so ``--resume`` reproduces the uninterrupted run exactly.

The trainer composes separable parts, each in its own module: the schedule and its reductions
(``train.schedule``), checkpointing and resume (``train.checkpointing``), console output
(``train.console``), metrics files (``train.metrics``), SCI health (``train.sci_health``), memory
accounting (``train.memory``) and stopping on signals or the wall clock (``train.stopping``).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from megatron.core import parallel_state

from sci_scale.config import Config, ConfigError, config_to_dict, save_config
from sci_scale.config.layout import data_parallel_size
from sci_scale.data.build import build_data
from sci_scale.data.pipeline import DataBundle
from sci_scale.losses.scl import alpha_at
from sci_scale.model.gpt import ModelChunks, SCIGPTModel, model_vocab_size
from sci_scale.model.specs import resolve_implementation
from sci_scale.runtime.distributed import destroy_distributed, init_distributed, seed_everything
from sci_scale.runtime.launch_env import read_dist_env
from sci_scale.train.checkpointing import RunCheckpoints
from sci_scale.train.console import ProgressLog, fmt_duration, log_setup
from sci_scale.train.engine import ScheduleView, build_engine
from sci_scale.train.grads import (
    allreduce_data_parallel_grads,
    allreduce_tied_embedding_grads,
    clip_grad_norm,
    mark_tied_output_copy,
)
from sci_scale.train.guards import Skip, StepGuard, check_finite_state, deepspeed_step
from sci_scale.train.hang import HangWatch
from sci_scale.train.memory import FirstStepMemory
from sci_scale.train.metrics import MetricsSink
from sci_scale.train.optim import build_optimizer, lr_at, set_lr
from sci_scale.train.phases import FreezeSchedule
from sci_scale.train.run_dir import RunDirectoryInUse, claim_run_dir
from sci_scale.train.schedule import StepSchedule
from sci_scale.train.sci_health import gather_embeddings, heldout_representation, sci_step_summary
from sci_scale.train.stopping import StopConditions

log = logging.getLogger("sci_scale.train")


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    history: list[dict[str, Any]] = field(default_factory=list)
    checkpoint: Path | None = None
    wall_time_s: float = 0.0
    pair_rate_realised: float = 0.0
    stop_reason: str | None = None  # set when a signal or train.max_wall_minutes ended the run
    skipped_steps: int = 0  # updates the step guard skipped (train.guards), this invocation
    save_stalls_s: list[float] = field(default_factory=list)  # training time each save took

    @property
    def finished(self) -> bool:
        return self.stop_reason is None


def check_master_weights(cfg: Config) -> None:
    """Training bf16 weights needs an fp32 master copy: DeepSpeed keeps one under ZeRO; the
    plain optimizer of ZeRO-0 would round every update to bf16."""
    if cfg.model.params_dtype == "bf16" and cfg.parallel.zero_stage == 0:
        raise ConfigError(
            "model.params_dtype=bf16 with parallel.zero_stage=0: AdamW would update the bf16 "
            "weights themselves, with no fp32 master copy; keep model.params_dtype=fp32 (bf16 "
            "compute comes from model.compute_dtype, bf16 on GPUs by default) or use "
            "parallel.zero_stage >= 1"
        )


class Trainer:
    """``resume``: False starts fresh, True continues from ``latest`` (an error when there is
    none), "auto" continues when a checkpoint exists and starts fresh otherwise."""

    def __init__(
        self, cfg: Config, resume: bool | Literal["auto"] = False, overwrite: bool = False
    ) -> None:
        if overwrite and resume:
            raise RunDirectoryInUse(
                "--overwrite starts a new run in place of the old one; it cannot be combined "
                "with --resume or --auto-resume"
            )
        self.cfg = cfg
        self.resume = resume
        self.overwrite = overwrite
        self.run_dir = Path(cfg.run.dir)
        self.started = time.monotonic()

    # -- setup ---------------------------------------------------------------------------
    def setup(self) -> None:
        cfg, t = self.cfg, self.cfg.train
        # Checked on every rank before any process group exists: nothing can hang on it.
        rank, world, _ = read_dist_env()
        data_parallel_size(cfg, world)
        claim_run_dir(self.run_dir, bool(self.resume), self.overwrite, is_main=rank == 0)
        check_master_weights(cfg)
        p = cfg.parallel
        self.env = init_distributed(
            p.tensor, p.pipeline, p.virtual_pipeline, device=cfg.runtime.device
        )
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.num_microbatches = t.global_batch_size // (t.micro_batch_size * self.dp_size)
        self.is_main = self.env.is_main
        seed_everything(t.seed)
        # What this machine cannot serve (TE, flash on a CPU, ...) fails before the data build.
        resolve_implementation(cfg, self.env.device)
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")

        t0 = time.perf_counter()
        self.data: DataBundle = build_data(cfg, self.run_dir)
        log.info("data ready in %.1fs (cache %s)", time.perf_counter() - t0, self.data.cache_dir)

        self.chunks = self._build_chunks()
        # With interleaved stages a rank holds several chunks; the SCI branch, if any, is in
        # the first. ``self.model`` is what optimizer, clipping and checkpoints see.
        self.sci_model = self.chunks[0]
        self.model: torch.nn.Module = (
            self.chunks[0] if len(self.chunks) == 1 else ModelChunks(self.chunks)
        )
        log_setup(self.model, self.sci_model, cfg, self.dp_size, self.env.world_size)
        self.freeze = FreezeSchedule(cfg.phases, self.chunks, cfg.model.num_layers)
        self.tied_weights = [w for c in self.chunks if (w := mark_tied_output_copy(c)) is not None]

        # Weights first (before DeepSpeed: ZeRO-3 partitions what it is handed), then the engine,
        # then the optimizer state that lives in it.
        self.checkpoints = RunCheckpoints(
            cfg, self.run_dir, self.env.world_size, self.data.tokenizer.model_path, self.resume
        )
        self.step, self.consumed_samples = self.checkpoints.restore_weights(self.model)
        self.optimizer = build_optimizer(self.model, cfg)
        self.engine = None
        schedule_models: list[Any] = list(self.chunks)
        if p.zero_stage > 0:
            self.engine, _ = build_engine(self.model, self.optimizer, cfg)
            schedule_models = [ScheduleView(self.engine)]
        self.checkpoints.restore_training_state(self.optimizer, self.engine)
        self.first_step = self.step + 1
        self.schedule = StepSchedule(cfg, schedule_models, self.dp_rank, self.dp_size)
        self.memory = FirstStepMemory(self.env.rank)
        self.progress = ProgressLog(cfg)
        self.guard = StepGuard(cfg, self.env.world_size, self.is_main, self.engine and self.model)
        self.hang = HangWatch(t.hang_timeout_s, self.is_main)
        self.stops = StopConditions(
            t.max_wall_minutes, self.is_main, self.env.world_size, started=self.started
        )
        self.metrics = (
            MetricsSink(
                self.run_dir,
                config_to_dict(cfg),
                cfg.logging.wandb_mode,
                cfg.logging.wandb_project,
                cfg.run.name,
                resume_step=self.step,
            )
            if self.is_main
            else None
        )

    def _build_chunks(self) -> list[SCIGPTModel]:
        """This rank's model: one chunk, or one per virtual stage (interleaved 1F1B)."""
        virtual = self.cfg.parallel.virtual_pipeline
        stages = [None] if virtual == 1 else list(range(virtual))
        return [
            SCIGPTModel(
                self.cfg,
                vocab_size=model_vocab_size(self.cfg, self.data.tokenizer.vocab_size),
                pre_process=parallel_state.is_pipeline_first_stage(
                    ignore_virtual=virtual == 1, vp_stage=vp_stage
                ),
                post_process=parallel_state.is_pipeline_last_stage(
                    ignore_virtual=virtual == 1, vp_stage=vp_stage
                ),
                vp_stage=vp_stage,
            )
            for vp_stage in stages
        ]

    # -- one step ------------------------------------------------------------------------
    def train_step(self) -> dict[str, Any]:
        cfg, t = self.cfg, self.cfg.train
        step = self.step + 1
        lr = lr_at(step, cfg)
        set_lr(self.optimizer, lr)
        alpha = alpha_at(step, cfg.sci.alpha, cfg.sci.alpha_warmup_steps)
        start = time.perf_counter()
        result = self.schedule.run(
            self.data.train,
            self.consumed_samples,
            self.num_microbatches,
            forward_only=False,
            scl_weight=alpha / self.num_microbatches,
        )
        grad_norm, skip = self._apply_gradients(step, result.lm_loss)
        elapsed = time.perf_counter() - start
        self.step = step
        self.consumed_samples += t.global_batch_size
        blocks, pair_blocks, tokens = self.schedule.global_counts(result.counter)
        record: dict[str, Any] = {
            "step": step,
            "lm_loss": result.lm_loss,
            "scl_loss": None,
            "tokens_per_s": tokens / elapsed,
            "step_time_s": elapsed,
            "lr": lr,
            "alpha": alpha,
            "grad_norm": grad_norm,
            "skipped": skip.reason if skip else None,
            "pair_blocks": pair_blocks,
            "blocks": blocks,
            "consumed_samples": self.consumed_samples,
        }
        record.update(sci_step_summary(result.sci_stats))
        if step == self.first_step:
            record.update(self.memory.record_fields())
        return record

    def _apply_gradients(self, step: int, loss: float) -> tuple[float, Skip | None]:
        """Reduce, clip and apply the accumulated gradients unless the guard skips the step
        (decided before the update, by every rank); returns the global grad norm and the skip."""
        for weight in self.tied_weights:
            allreduce_tied_embedding_grads(weight)
        self.memory.before_update(self.model, self.optimizer, self.engine)
        if self.engine is not None:
            skip = self.guard.decide(loss)
            norm, skip = deepspeed_step(self.engine, self.optimizer, self.model, skip)
        else:
            params = [p for p in self.model.parameters() if p.requires_grad]
            allreduce_data_parallel_grads(params)
            self.freeze.drop_frozen_grads(step)
            norm = clip_grad_norm(params, self.cfg.train.clip_grad)
            skip = self.guard.decide(loss, norm)
            if skip is None:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.memory.after_update(self.model, self.optimizer, self.engine)
        self.guard.record(step, skip, loss)
        return norm, skip

    # -- eval ----------------------------------------------------------------------------
    def _forward_only(self, dataset: Any, batches: int, collect: bool = False):
        self.model.eval()
        with torch.no_grad():
            result = self.schedule.run(
                dataset, 0, batches, forward_only=True, collect_sci_embeddings=collect
            )
        self.model.train()
        return result

    def evaluate(self) -> dict[str, float]:
        batches = self.cfg.train.eval_batches
        lm = self._forward_only(self.data.valid_corpus, batches).lm_loss
        out = {"eval_lm_loss": lm, "eval_ppl": math.exp(min(lm, 50.0))}
        if self.cfg.sci.mode != "off" and self.data.heldout_pairs is not None:
            stats = self._forward_only(self.data.heldout_pairs, batches, collect=True).sci_stats
            out.update({f"eval_{k}": v for k, v in sci_step_summary(stats).items()})
            collected = gather_embeddings(stats)
            if self.is_main:
                out.update(heldout_representation(collected, self.step))
        return out

    # -- loop ----------------------------------------------------------------------------
    def _save(self, result: TrainResult) -> Path:
        check_finite_state(self.model, self.optimizer, self.step, self.env.world_size)
        path = self.checkpoints.save(
            self.model, self.optimizer, self.engine, self.step, self.consumed_samples
        )
        result.save_stalls_s.append(self.checkpoints.stall_s)
        return path

    def train(self, result: TrainResult, stop_at: int, max_steps: int | None) -> None:
        """Steps to ``stop_at``: eval, metrics, console, checkpoints, and an agreed early stop."""
        cfg, t = self.cfg, self.cfg.train
        last_saved = self.step if self.checkpoints.resuming else -1
        if cfg.checkpoint.save_initial and self.step == 0:
            result.checkpoint, last_saved = self._save(result), 0
        if self.step < stop_at and (early := self.stops.reason(wall_clock=False)):
            result.stop_reason = early  # a signal during set-up: no step ran, nothing new to save
            if self.is_main:
                log.warning(
                    "stopping before step %d (%s): nothing new to save", self.step + 1, early
                )
            return
        if self.step >= t.steps:
            log.info("nothing to do: step %d already reached train.steps=%d", self.step, t.steps)
        log.info(
            "training steps %d..%d: %d micro-batch(es) of %d x %d tokens per step",
            *(self.step + 1, stop_at, self.num_microbatches),
            *(t.micro_batch_size, cfg.model.seq_length),
        )
        while self.step < stop_at:
            self.hang.step_started()
            record = self.train_step()
            if self.step % t.eval_interval == 0 or self.step == t.steps:
                record.update(self.evaluate())
            result.history.append(record)
            if self.metrics is not None:
                self.metrics.write(record)
            self.progress.add(record)
            self.guard.stop_if_diverged()
            self.checkpoints.poll()  # an async checkpoint whose writers are done is sealed
            stop_reason = self.stops.reason() if self.step < stop_at else None
            if self.step % cfg.checkpoint.interval == 0 or stop_reason:
                result.checkpoint, last_saved = self._save(result), self.step
            if stop_reason:
                result.stop_reason = stop_reason
                if self.is_main:
                    log.warning(
                        "stopping at step %d (%s); continue with --resume", self.step, stop_reason
                    )
                break
        finished = self.step >= t.steps
        if last_saved != self.step and (
            max_steps is not None or (finished and cfg.checkpoint.save_final)
        ):
            result.checkpoint = self._save(result)

    def run(self, max_steps: int | None = None) -> TrainResult:
        """Train to ``train.steps`` (or ``max_steps`` more steps, then checkpoint and stop)."""
        wall = time.perf_counter()
        self.setup()
        t = self.cfg.train
        result = TrainResult(
            self.run_dir, self.step, pair_rate_realised=self.data.pair_rate_realised
        )
        stop_at = t.steps if max_steps is None else min(t.steps, self.step + max_steps)
        try:
            with self.stops:
                self.train(result, stop_at, max_steps)
                self.checkpoints.poll(blocking=True)  # no exit before the checkpoint is whole
        finally:
            self.hang.stop()
            if self.metrics is not None:
                self.metrics.close()
            destroy_distributed()
        result.step, result.skipped_steps = self.step, self.guard.total
        result.wall_time_s = time.perf_counter() - wall
        log.info(
            "done: step %d in %s, %d update(s) skipped; run directory %s",
            *(self.step, fmt_duration(result.wall_time_s), self.guard.total, self.run_dir),
        )
        return result


def train(
    cfg: Config,
    resume: bool | Literal["auto"] = False,
    max_steps: int | None = None,
    overwrite: bool = False,
) -> TrainResult:
    return Trainer(cfg, resume=resume, overwrite=overwrite).run(max_steps=max_steps)
