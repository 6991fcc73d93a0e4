"""The training loop: megatron's forward-backward schedule, AdamW, eval, checkpoints, logging.

One step = ``global_batch_size / (micro_batch_size * dp)`` micro-batches through
``get_forward_backward_func()`` (gradients accumulate), then clipping and one AdamW update. The
data position is a consumed-sample count, the learning rate and SCL weight are functions of the
step, and every RNG is checkpointed, so ``--resume`` reproduces the uninterrupted run exactly.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from sci_scale.config import Config, ConfigError, config_to_dict
from sci_scale.config.layout import data_parallel_size
from sci_scale.data.loader import MicroBatches
from sci_scale.data.pipeline import DataBundle, build_data
from sci_scale.data.tokenizer import tokenizer_identity
from sci_scale.eval.representation import collapse_warning, representation_metrics
from sci_scale.losses.scl import alpha_at
from sci_scale.model.gpt import ModelChunks, SCIGPTModel, model_vocab_size
from sci_scale.model.shapes import llama_ffn_size
from sci_scale.model.specs import resolve_implementation
from sci_scale.runtime import collectives
from sci_scale.runtime.distributed import (
    destroy_distributed,
    init_distributed,
    seed_everything,
)
from sci_scale.runtime.launch_env import read_dist_env
from sci_scale.train.checkpoint import (
    CheckpointManager,
    RunState,
    load_training_state,
    load_weights,
    read_run_state,
)
from sci_scale.train.checkpoint_index import CheckpointError, latest_checkpoint
from sci_scale.train.engine import ScheduleView, build_engine
from sci_scale.train.grads import (
    allreduce_data_parallel_grads,
    allreduce_tied_embedding_grads,
    clip_grad_norm,
    mark_tied_output_copy,
)
from sci_scale.train.memory import state_bytes
from sci_scale.train.metrics import MetricsSink
from sci_scale.train.optim import build_optimizer, lr_at, set_lr
from sci_scale.train.phases import FreezeSchedule
from sci_scale.train.step import BatchCounter, make_forward_step, sum_of

log = logging.getLogger("sci_scale.train")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    history: list[dict[str, Any]] = field(default_factory=list)
    checkpoint: Path | None = None
    wall_time_s: float = 0.0
    pair_rate_realised: float = 0.0
    stop_reason: str | None = None  # set when a signal or train.max_wall_minutes ended the run

    @property
    def finished(self) -> bool:
        return self.stop_reason is None


def _fmt_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _sci_summary(records: list) -> dict[str, float]:
    """Step SCL = mean over the micro-batches that had pair examples of their (global) SCL.

    Each data-parallel rank records its share of every such micro-batch's loss (see
    ``supervised_contrastive_loss(ranks=...)``); the mean of the shares over ranks is the global
    value. Cosines are averaged over the micro-batches (and ranks) that could measure them.
    Only first-stage ranks hold records; they alone take part in the reduction.
    """
    # micro-batches, SCL sum, anchors, pos-cos sum and count, neg-cos sum and count
    stats = [0.0] * 7
    for r in records:
        stats[0] += 1.0
        stats[1] += r.scl
        stats[2] += r.num_anchors
        if math.isfinite(r.pos_cos):
            stats[3] += r.pos_cos
            stats[4] += 1.0
        if math.isfinite(r.neg_cos):
            stats[5] += r.neg_cos
            stats[6] += 1.0
    dp = parallel_state.get_data_parallel_world_size()
    if dp > 1 and parallel_state.is_pipeline_first_stage():
        stats = collectives.all_reduce_values(stats, parallel_state.get_data_parallel_group())
        # every rank records the same micro-batches; shares average to the SCL
        stats[0], stats[1] = stats[0] / dp, stats[1] / dp
    n_mb, scl_sum, anchors, pos_sum, pos_n, neg_sum, neg_n = stats
    if n_mb == 0:
        return {}
    pos = pos_sum / pos_n if pos_n else float("nan")
    neg = neg_sum / neg_n if neg_n else float("nan")
    return {
        "scl_loss": scl_sum / n_mb,
        "pos_cos": pos,
        "neg_cos": neg,
        "cos_gap": pos - neg,
        "scl_anchors": int(anchors),
    }


def _megabytes(value: int | None) -> str:
    return "not measured" if value is None else f"{value / 2**20:.2f} MB"


def layout_summary(tp: int, pp: int, dp: int, zero_stage: int, virtual: int = 1) -> str:
    interleaved = f" (interleaved, {virtual} chunks per stage)" if virtual > 1 else ""
    return f"TP{tp} x PP{pp} x DP{dp}, ZeRO-{zero_stage}{interleaved}"


# model.* settings that decide the shapes (or the function) of the weights in a checkpoint
SHAPE_KEYS = (
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "ffn_hidden_size",
    "head_dim",
    "qkv_bias",
    "tie_embeddings",
    "vocab_size",
)


def _effective_shape(model: dict[str, Any]) -> dict[str, Any]:
    """The shape settings with their defaults resolved (an unset FFN width or head size is
    the same model as the value it defaults to)."""
    shape = {k: model.get(k) for k in SHAPE_KEYS}
    if shape["ffn_hidden_size"] is None and shape["hidden_size"] is not None:
        shape["ffn_hidden_size"] = llama_ffn_size(shape["hidden_size"])
    if shape["head_dim"] is None and shape["hidden_size"] and shape["num_attention_heads"]:
        shape["head_dim"] = shape["hidden_size"] // shape["num_attention_heads"]
    return shape


def check_same_shape(saved: dict[str, Any], cfg: Config, where: Path) -> None:
    """checkpoint.init_from must hold a model of this run's shape; name every difference."""
    now = _effective_shape(config_to_dict(cfg)["model"])
    was = _effective_shape({**config_to_dict(cfg)["model"], **saved})
    differ = [k for k in SHAPE_KEYS if was[k] != now[k]]
    if differ:
        detail = ", ".join(f"model.{k}: {was[k]} there, {now[k]} here" for k in differ)
        raise CheckpointError(f"checkpoint.init_from={where} holds another model shape ({detail})")


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


def runtime_summary(model: SCIGPTModel, cfg: Config) -> str:
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


class Trainer:
    """``resume``: False starts fresh, True continues from ``latest`` (an error when there is
    none), "auto" continues when a checkpoint exists and starts fresh otherwise (what a job
    that may be requeued wants)."""

    def __init__(self, cfg: Config, resume: bool | Literal["auto"] = False) -> None:
        self.cfg = cfg
        self.resume = resume
        self.run_dir = Path(cfg.run.dir)
        self.signal_received: str | None = None
        self.started = time.monotonic()

    # -- setup ---------------------------------------------------------------------------
    def setup(self) -> None:
        cfg, t = self.cfg, self.cfg.train
        # Checked on every rank before any process group exists: nothing can hang on it.
        data_parallel_size(cfg, read_dist_env()[1])
        check_master_weights(cfg)
        self.env = init_distributed(
            cfg.parallel.tensor,
            cfg.parallel.pipeline,
            cfg.parallel.virtual_pipeline,
            device=cfg.runtime.device,
        )
        dp = parallel_state.get_data_parallel_world_size()
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = dp
        self.num_microbatches = t.global_batch_size // (t.micro_batch_size * dp)
        self.is_main = self.env.is_main
        seed_everything(t.seed)
        # What this machine cannot serve (TE, flash on a CPU, ...) fails before the data build.
        resolve_implementation(cfg, self.env.device)
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with open(self.run_dir / "config.yaml", "w") as handle:
                yaml.safe_dump(config_to_dict(cfg), handle, sort_keys=False)

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
        n_params = sum(p.numel() for p in self.model.parameters())
        n_sci = sum(p.numel() for n, p in self.model.named_parameters() if ".sci." in f".{n}")
        log.info(
            "model: %s spec, %.2fM parameters (SCI branch %.2fM), sci.mode=%s",
            self.sci_model.spec_name,
            n_params / 1e6,
            n_sci / 1e6,
            cfg.sci.mode,
        )
        log.info("runtime: %s", runtime_summary(self.sci_model, cfg))
        log.info(
            "layout: %s (%d process%s)",
            layout_summary(
                cfg.parallel.tensor,
                cfg.parallel.pipeline,
                dp,
                cfg.parallel.zero_stage,
                cfg.parallel.virtual_pipeline,
            ),
            self.env.world_size,
            "" if self.env.world_size == 1 else "es",
        )
        self.freeze = FreezeSchedule(cfg.phases, self.chunks, cfg.model.num_layers)
        if self.freeze.active:
            log.info(
                "phases: backbone frozen to step %d, last %d layer(s) train to step %d, then joint",
                cfg.phases.backbone_frozen_until,
                cfg.phases.unfreeze_last_n,
                cfg.phases.partial_until,
            )
        self.tied_weights = [w for c in self.chunks if (w := mark_tied_output_copy(c)) is not None]
        self.checkpoints = CheckpointManager(self.run_dir / "checkpoints", cfg.checkpoint.keep_last)
        self.forward_backward = get_forward_backward_func()
        self.counter = BatchCounter()
        self.memory: dict[str, int | None] | None = None

        # Weights first (before DeepSpeed: ZeRO-3 partitions what it is handed), then the engine,
        # then the optimizer state that lives in it.
        self.step, self.consumed_samples = 0, 0
        resume_from = latest_checkpoint(self.checkpoints.root) if self.resume else None
        if self.resume == "auto":
            self.resume = resume_from is not None
            if not self.resume:
                log.info("no checkpoint under %s: starting a new run", self.checkpoints.root)
        if self.resume:
            if resume_from is None:
                raise CheckpointError(
                    f"--resume: no checkpoint under {self.checkpoints.root} (nothing to resume)"
                )
            state = load_weights(resume_from, self.model)
            self._check_resumable(state)
            self.step, self.consumed_samples = state.step, state.consumed_samples
        elif cfg.checkpoint.init_from:
            init = Path(cfg.checkpoint.init_from)
            check_same_shape(read_run_state(init).config.get("model", {}), cfg, init)
            load_weights(init, self.model, allow_missing_sci=True)
            log.info("initial weights from %s", cfg.checkpoint.init_from)

        self.optimizer = build_optimizer(self.model, cfg)
        self.engine = None
        self.schedule_models: list[Any] = list(self.chunks)
        if cfg.parallel.zero_stage > 0:
            self.engine, _ = build_engine(self.model, self.optimizer, cfg)
            self.schedule_models = [ScheduleView(self.engine)]
        self.first_step = self.step + 1
        if resume_from is not None:
            same = load_training_state(
                resume_from, self.optimizer, self.engine, self._same_layout(state)
            )
            log.info(
                "resumed from %s: step %d, %d samples consumed%s",
                resume_from,
                self.step,
                self.consumed_samples,
                "" if same else " (optimizer state reinitialised)",
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

    def _same_layout(self, state: RunState) -> bool:
        saved = state.config.get("parallel", {})
        now = self.cfg.parallel
        return (
            saved.get("tensor") == now.tensor
            and saved.get("pipeline") == now.pipeline
            and saved.get("zero_stage") == now.zero_stage
            and saved.get("virtual_pipeline", 1) == now.virtual_pipeline
            and state.world_size == self.env.world_size
        )

    def _check_resumable(self, state: RunState) -> None:
        ours = tokenizer_identity(self.data.tokenizer.model_path)
        if state.tokenizer.get("sha256") != ours["sha256"]:
            raise CheckpointError(
                f"--resume: the checkpoint was trained with tokenizer {state.tokenizer}, "
                f"this run has {ours}"
            )

    def _run_state(self) -> RunState:
        return RunState(
            step=self.step,
            consumed_samples=self.consumed_samples,
            world_size=self.env.world_size,
            config=config_to_dict(self.cfg),
            tokenizer=tokenizer_identity(self.data.tokenizer.model_path),
        )

    def _save(self) -> Path:
        t0 = time.perf_counter()
        path = self.checkpoints.save(self.model, self.optimizer, self._run_state(), self.engine)
        log.info("checkpoint %s (%.1fs)", path, time.perf_counter() - t0)
        return path

    # -- one step ------------------------------------------------------------------------
    def _global_tokens(self, microbatches: list[dict[str, torch.Tensor]]) -> float:
        tokens = sum(float(b["loss_mask"].sum()) for b in microbatches)
        if self.dp_size > 1:
            (tokens,) = collectives.all_reduce_values(
                [tokens], parallel_state.get_data_parallel_group()
            )
        return max(tokens, 1.0)

    def _reduce_lm(self, lm_sums: float, global_tokens: float) -> float:
        """The step's mean LM loss, known on every rank (the last stage computes it)."""
        value = lm_sums / global_tokens
        if self.dp_size > 1:
            (value,) = collectives.all_reduce_values(
                [value], parallel_state.get_data_parallel_group()
            )
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            (value,) = collectives.all_reduce_values(
                [value], parallel_state.get_pipeline_model_parallel_group()
            )
        return value

    def _run_schedule(self, dataset: Any, start: int, num_mb: int, forward_only: bool):
        """Micro-batches ``start..`` of ``dataset`` through megatron's schedule.

        Returns (summed LM loss of this rank's micro-batches, global token count, counter)."""
        t = self.cfg.train
        source = MicroBatches(
            dataset, start, t.micro_batch_size, self.dp_rank, self.dp_size, wrap=forward_only
        )
        microbatches = [next(source) for _ in range(num_mb)]
        global_tokens = self._global_tokens(microbatches)
        counter = self.counter if not forward_only else BatchCounter()
        counter.reset(loss_scale=num_mb * self.dp_size / global_tokens)
        losses = self.forward_backward(
            forward_step_func=make_forward_step(counter),
            # one iterator per model chunk: each chunk reads every micro-batch once
            data_iterator=[iter(microbatches) for _ in self.schedule_models],
            model=self.schedule_models,
            num_microbatches=num_mb,
            seq_length=self.cfg.model.seq_length,
            micro_batch_size=t.micro_batch_size,
            forward_only=forward_only,
        )
        return sum_of(losses, "lm_sum"), global_tokens, counter

    def _apply_gradients(self) -> float:
        """Reduce, clip and apply the accumulated gradients; returns the global grad norm."""
        clip = self.cfg.train.clip_grad
        for weight in self.tied_weights:
            allreduce_tied_embedding_grads(weight)
        measure = self.memory is None
        if measure:  # the first step: gradients are at their peak now, optimizer state after
            grads = state_bytes(self.model, self.optimizer, self.engine)["grads"]
        if self.engine is not None:
            self.engine.step()
            norm = self.engine.get_global_grad_norm()
            norm = float(norm) if norm is not None else float("nan")
        else:
            params = [p for p in self.model.parameters() if p.requires_grad]
            allreduce_data_parallel_grads(params)
            self.freeze.drop_frozen_grads(self.step + 1)
            norm = clip_grad_norm(params, clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        if measure:
            after = state_bytes(self.model, self.optimizer, self.engine)
            self.memory = {
                "params": after["params"],
                "grads": grads,
                "optimizer": after["optimizer"],
            }
            log.info(
                "memory of rank %d: parameters %s, gradients %s, optimizer state %s",
                self.env.rank,
                *(_megabytes(self.memory[k]) for k in ("params", "grads", "optimizer")),
            )
        return norm

    def train_step(self) -> dict[str, Any]:
        cfg, t = self.cfg, self.cfg.train
        step = self.step + 1
        lr = lr_at(step, cfg)
        set_lr(self.optimizer, lr)
        alpha = alpha_at(step, cfg.sci.alpha, cfg.sci.alpha_warmup_steps)
        self.sci_model.scl_scale = alpha / self.num_microbatches
        self.sci_model.take_records()
        start = time.perf_counter()
        lm_sums, global_tokens, counter = self._run_schedule(
            self.data.train, self.consumed_samples, self.num_microbatches, forward_only=False
        )
        grad_norm = self._apply_gradients()
        elapsed = time.perf_counter() - start
        self.step = step
        self.consumed_samples += t.global_batch_size
        blocks = [counter.blocks, counter.pair_blocks, counter.tokens]
        if self.dp_size > 1:
            blocks = collectives.all_reduce_values(blocks, parallel_state.get_data_parallel_group())
        record: dict[str, Any] = {
            "step": step,
            "lm_loss": self._reduce_lm(lm_sums, global_tokens),
            "scl_loss": None,
            "tokens_per_s": int(blocks[2]) / elapsed,
            "step_time_s": elapsed,
            "lr": lr,
            "alpha": alpha,
            "grad_norm": grad_norm,
            "pair_blocks": int(blocks[1]),
            "blocks": int(blocks[0]),
            "consumed_samples": self.consumed_samples,
        }
        record.update(_sci_summary(self.sci_model.take_records()))
        if step == self.first_step:
            record.update(
                {f"mem_{k}_mb": None if v is None else v / 2**20 for k, v in self.memory.items()}
            )
        return record

    # -- eval ----------------------------------------------------------------------------
    def _forward_only(self, dataset: Any, batches: int) -> tuple[float, dict[str, float]]:
        self.model.eval()
        self.sci_model.take_records()
        with torch.no_grad():
            lm_sums, global_tokens, _ = self._run_schedule(dataset, 0, batches, forward_only=True)
        self.model.train()
        records = self.sci_model.take_records()
        return self._reduce_lm(lm_sums, global_tokens), _sci_summary(records)

    def evaluate(self) -> dict[str, float]:
        batches = self.cfg.train.eval_batches
        lm, _ = self._forward_only(self.data.valid_corpus, batches)
        out = {"eval_lm_loss": lm, "eval_ppl": math.exp(min(lm, 50.0))}
        if self.cfg.sci.mode != "off" and self.data.heldout_pairs is not None:
            self.sci_model.collected = []
            try:
                _, sci = self._forward_only(self.data.heldout_pairs, batches)
                collected = self._gather_embeddings(self.sci_model.collected)
            finally:
                self.sci_model.collected = None
            out.update({f"eval_{k}": v for k, v in sci.items()})
            out.update(self._representation_metrics(collected))
        return out

    def _gather_embeddings(self, local: list[tuple[torch.Tensor, torch.Tensor]]):
        """Every data-parallel rank's held-out embeddings, on the first pipeline stage."""
        if not parallel_state.is_pipeline_first_stage():
            return []
        if self.dp_size == 1:
            return local
        # every first-stage rank enters the collective, with or without embeddings of its own
        gathered = collectives.all_gather_object(local, parallel_state.get_data_parallel_group())
        return [item for part in gathered for item in part]

    def _representation_metrics(self, collected) -> dict[str, float]:
        """Alignment, uniformity, RankMe, alpha-ReQ, cosine AUROC, Recall@1/5, MRR of the
        held-out pair embeddings (rank 0 logs them), and a warning on collapse."""
        if not self.is_main or not collected:
            return {}
        z = torch.cat([c[0] for c in collected])
        templates = torch.cat([c[1] for c in collected])
        try:
            metrics = representation_metrics(z, templates)
        except ValueError as exc:  # e.g. a held-out set without a negative pair
            log.warning("no SCI representation metrics: %s", exc)
            return {}
        warning = collapse_warning(metrics)
        if warning:
            log.warning("%s at step %d", warning, self.step)
        return {f"eval_sci_{k}": v for k, v in metrics.items()}

    # -- loop ----------------------------------------------------------------------------
    def _on_signal(self, signum: int, _frame: Any) -> None:
        name = signal.Signals(signum).name
        log.warning("received %s: saving a checkpoint after this step", name)
        self.signal_received = name

    def _stop_reason(self) -> str | None:
        """Why to stop after this step, agreed by every rank.

        Slurm signals each task on its own, so ranks may see a signal one step apart; the wall
        clock is read on rank 0. One max-reduction of two flags makes every rank stop (and save)
        at the same step, which a collective checkpoint needs.
        """
        limit = self.cfg.train.max_wall_minutes
        over_time = (
            self.is_main and limit is not None and time.monotonic() - self.started >= limit * 60
        )
        flags = [self.signal_received is not None, over_time]
        if self.env.world_size > 1:
            flags = collectives.all_reduce_values(flags, op=collectives.ReduceOp.MAX)
        if flags[0]:
            return f"signal {self.signal_received or 'on another rank'}"
        if flags[1]:
            return f"train.max_wall_minutes={limit} reached"
        return None

    def _log_console(self, window: list[dict[str, Any]]) -> None:
        """One line for the last ``log_interval`` steps: the latest LM loss, the window's mean
        SCL and cosine gap (pair blocks are rare, so one step's SCL is often absent), the eval
        LM loss on eval steps, and throughput and ETA from the window's mean step time."""
        t, record = self.cfg.train, window[-1]
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
            f"ETA {_fmt_duration(eta)}",
        ]
        log.info(" | ".join(parts))

    def run(self, max_steps: int | None = None) -> TrainResult:
        """Train to ``train.steps`` (or ``max_steps`` more steps, then checkpoint and stop)."""
        wall = time.perf_counter()
        self.setup()
        cfg, t = self.cfg, self.cfg.train
        result = TrainResult(
            self.run_dir, self.step, pair_rate_realised=self.data.pair_rate_realised
        )
        previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
        for s in STOP_SIGNALS:
            try:
                signal.signal(s, self._on_signal)
            except ValueError:  # not the main thread: leave the handlers to the host
                previous.pop(s)
        window: list[dict[str, Any]] = []
        last_saved = self.step if self.resume else -1
        if cfg.checkpoint.save_initial and self.step == 0:
            result.checkpoint = self._save()
            last_saved = 0
        stop_at = t.steps if max_steps is None else min(t.steps, self.step + max_steps)
        if self.step >= t.steps:
            log.info("nothing to do: step %d already reached train.steps=%d", self.step, t.steps)
        try:
            log.info(
                "training steps %d..%d: %d micro-batch(es) of %d x %d tokens per step",
                self.step + 1,
                stop_at,
                self.num_microbatches,
                t.micro_batch_size,
                cfg.model.seq_length,
            )
            while self.step < stop_at:
                record = self.train_step()
                window = [*window, record][-t.log_interval :]
                if self.step % t.eval_interval == 0 or self.step == t.steps:
                    record.update(self.evaluate())
                result.history.append(record)
                if self.metrics is not None:
                    self.metrics.write(record)
                if cfg.logging.console and (
                    self.step % t.log_interval == 0 or self.step in (1, t.steps)
                ):
                    self._log_console(window)
                if not math.isfinite(record["lm_loss"]):
                    raise FloatingPointError(f"LM loss is {record['lm_loss']} at step {self.step}")
                stop_reason = self._stop_reason() if self.step < stop_at else None
                if self.step % cfg.checkpoint.interval == 0 or stop_reason:
                    result.checkpoint = self._save()
                    last_saved = self.step
                if stop_reason:
                    result.stop_reason = stop_reason
                    if self.is_main:
                        log.warning(
                            "stopping at step %d (%s); continue with --resume",
                            self.step,
                            stop_reason,
                        )
                    break
            finished = self.step >= t.steps
            if last_saved != self.step and (
                max_steps is not None or (finished and cfg.checkpoint.save_final)
            ):
                result.checkpoint = self._save()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            if self.metrics is not None:
                self.metrics.close()
            destroy_distributed()
        result.step = self.step
        result.wall_time_s = time.perf_counter() - wall
        log.info(
            "done: step %d in %s; run directory %s",
            self.step,
            _fmt_duration(result.wall_time_s),
            self.run_dir,
        )
        return result


def train(
    cfg: Config, resume: bool | Literal["auto"] = False, max_steps: int | None = None
) -> TrainResult:
    return Trainer(cfg, resume=resume).run(max_steps=max_steps)
