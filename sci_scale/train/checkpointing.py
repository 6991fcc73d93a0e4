"""The trainer's checkpointing: where a run starts (fresh, ``--resume``, ``--auto-resume``,
``checkpoint.init_from``), the checks that make a resume exact, and saving.

A resume starts from the checkpoint ``latest`` names when it matches its manifest, and
otherwise from the newest ``step_*`` checkpoint that does (a warning names the damaged file);
an explicit ``checkpoint.init_from`` that is damaged is an error, there being nothing else to
load.

Weights are restored before DeepSpeed wraps the model (ZeRO-3 partitions what it is handed),
the optimizer state after (it lives in the engine), hence the two halves
:meth:`RunCheckpoints.restore_weights` and :meth:`RunCheckpoints.restore_training_state`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Literal

import torch

from sci_scale.checkpoint.index import CheckpointError, resume_candidates
from sci_scale.checkpoint.manager import CheckpointManager, load_training_state, load_weights
from sci_scale.checkpoint.manifest import find_damage, is_main_rank, require_intact
from sci_scale.checkpoint.state import RunState, read_run_state
from sci_scale.config import Config, config_to_dict
from sci_scale.data.tokenizer import tokenizer_identity
from sci_scale.model.shapes import llama_ffn_size

log = logging.getLogger("sci_scale.train")

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


def intact_resume_checkpoint(root: Path) -> Path | None:
    """The checkpoint a resume starts from: the one ``latest`` names if it is intact, else the
    newest intact ``step_*`` one; None when there are none. Collective when a process group
    exists (the candidates are checked by every rank together, so all pick the same one).
    Raises a :class:`CheckpointError` naming the damaged files when none is intact."""
    candidates, pointer_problem = resume_candidates(root)
    bad = [pointer_problem] if pointer_problem else []
    if pointer_problem and is_main_rank():
        log.warning("%s: looking for the newest intact checkpoint", pointer_problem)
    for candidate in candidates:
        damage = find_damage(candidate)
        if damage is None:
            if bad and is_main_rank():
                log.warning("resuming from %s, the newest intact checkpoint", candidate)
            return candidate
        if is_main_rank():
            log.warning("damaged checkpoint: %s; trying the previous one", damage)
        bad.append(str(damage))
    if bad:
        raise CheckpointError(f"no intact checkpoint under {root}: {'; '.join(bad)}")
    return None


class RunCheckpoints:
    """``resume``: False starts fresh, True continues from ``latest`` (an error when there is
    none), "auto" continues when a checkpoint exists and starts fresh otherwise (what a job
    that may be requeued wants)."""

    def __init__(
        self,
        cfg: Config,
        run_dir: Path,
        world_size: int,
        tokenizer_path: Path,
        resume: bool | Literal["auto"],
    ) -> None:
        self.cfg = cfg
        self.world_size = world_size
        self.tokenizer = tokenizer_identity(tokenizer_path)
        self.manager = CheckpointManager(run_dir / "checkpoints", cfg.checkpoint.keep_last)
        self.resume_from = intact_resume_checkpoint(self.manager.root) if resume else None
        if resume == "auto" and self.resume_from is None:
            log.info("no checkpoint under %s: starting a new run", self.manager.root)
        elif resume is True and self.resume_from is None:
            raise CheckpointError(
                f"--resume: no checkpoint under {self.manager.root} (nothing to resume)"
            )
        self._state: RunState | None = None

    @property
    def resuming(self) -> bool:
        return self.resume_from is not None

    def restore_weights(self, model: torch.nn.Module) -> tuple[int, int]:
        """Load the weights a run starts with; returns (step, consumed samples)."""
        if self.resume_from is not None:
            state = load_weights(self.resume_from, model)
            self._check_resumable(state)
            self._state = state
            return state.step, state.consumed_samples
        init = self.cfg.checkpoint.init_from
        if init:
            require_intact(Path(init))
            check_same_shape(read_run_state(Path(init)).config.get("model", {}), self.cfg, init)
            load_weights(Path(init), model, allow_missing_sci=True)
            log.info("initial weights from %s", init)
        return 0, 0

    def restore_training_state(self, optimizer: torch.optim.Optimizer, engine: Any) -> None:
        """The optimizer (or DeepSpeed engine) state of the checkpoint resumed from, if any."""
        if self.resume_from is None or self._state is None:
            return
        same = load_training_state(self.resume_from, optimizer, engine, self._same_layout())
        log.info(
            "resumed from %s: step %d, %d samples consumed%s",
            self.resume_from,
            self._state.step,
            self._state.consumed_samples,
            "" if same else " (optimizer state reinitialised)",
        )

    def save(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        engine: Any,
        step: int,
        consumed_samples: int,
    ) -> Path:
        t0 = time.perf_counter()
        state = RunState(
            step=step,
            consumed_samples=consumed_samples,
            world_size=self.world_size,
            config=config_to_dict(self.cfg),
            tokenizer=self.tokenizer,
        )
        if self.cfg.checkpoint.async_save:
            path = self.manager.save_async(model, optimizer, state, engine)
            self.stall_s = time.perf_counter() - t0
            log.info("checkpoint %s started (training stalled %.2fs)", path, self.stall_s)
            return path
        path = self.manager.save(model, optimizer, state, engine)
        self.stall_s = time.perf_counter() - t0
        log.info("checkpoint %s (%.1fs)", path, self.stall_s)
        return path

    def poll(self, blocking: bool = False) -> None:
        """Finish an async checkpoint whose writers are done (collective: every rank, at the
        same points); ``blocking`` waits for them (before exiting)."""
        self.manager.poll(blocking)

    def _same_layout(self) -> bool:
        """Whether the optimizer state can be loaded as saved (same TP/PP/ZeRO/world)."""
        assert self._state is not None
        saved = self._state.config.get("parallel", {})
        now = self.cfg.parallel
        return (
            saved.get("tensor") == now.tensor
            and saved.get("pipeline") == now.pipeline
            and saved.get("zero_stage") == now.zero_stage
            and saved.get("virtual_pipeline", 1) == now.virtual_pipeline
            and self._state.world_size == self.world_size
        )

    def _check_resumable(self, state: RunState) -> None:
        if state.tokenizer.get("sha256") != self.tokenizer["sha256"]:
            raise CheckpointError(
                f"--resume: the checkpoint was trained with tokenizer {state.tokenizer}, "
                f"this run has {self.tokenizer}"
            )
