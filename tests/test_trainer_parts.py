"""The trainer's parts, each on its own: console, stopping, checkpointing, SCI health, memory,
and the SCI component's contract with the model (typed output, owned parameters, checkpoint keys).
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from sci_scale.checkpoint.index import CheckpointError
from sci_scale.data.blocks import pack_block
from sci_scale.data.loader import collate
from sci_scale.model.gpt import ModelOutput, SCIGPTModel
from sci_scale.model.sci_branch import SCIStats, is_sci_parameter
from sci_scale.runtime.distributed import destroy_distributed, init_distributed, seed_everything
from sci_scale.train.checkpointing import RunCheckpoints, check_same_shape
from sci_scale.train.console import ProgressLog, fmt_duration, layout_summary
from sci_scale.train.memory import FirstStepMemory
from sci_scale.train.sci_health import heldout_representation, sci_step_summary
from sci_scale.train.stopping import StopConditions


@pytest.fixture
def single_process():
    init_distributed()
    yield
    destroy_distributed()


def record(step: int, **extra: float) -> dict:
    return {"step": step, "lm_loss": 5.0 - step / 10, "lr": 1e-3, "step_time_s": 0.5, **extra}


# -- console -------------------------------------------------------------------------------
def test_progress_line_summarises_the_window(make_config, caplog) -> None:
    cfg = make_config("train.steps=100", "train.log_interval=4")
    progress = ProgressLog(cfg)
    with caplog.at_level(logging.INFO, logger="sci_scale.train"):
        progress.add(record(1))  # the first step always prints
        progress.add(record(2, scl_loss=2.0, cos_gap=0.2))
        progress.add(record(3))  # not an interval step: silent
        progress.add(record(4, scl_loss=1.0, cos_gap=float("nan"), eval_lm_loss=4.25))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and lines[0].startswith("step 1/100 | lm 4.9000")
    tokens_per_s = cfg.train.global_batch_size * cfg.model.seq_length / 0.5
    assert lines[1] == (
        "step 4/100 | lm 4.6000 | scl 1.5000 (2 step(s) gap +0.200) | eval lm 4.2500 | "
        f"lr 1.00e-03 | {tokens_per_s:,.0f} tok/s | ETA {fmt_duration(0.5 * 96)}"
    )
    progress.add(record(5))
    assert [r["step"] for r in progress.window] == [2, 3, 4, 5]  # the last log_interval steps


def test_console_off_prints_nothing(make_config, caplog) -> None:
    progress = ProgressLog(make_config("logging.console=false"))
    with caplog.at_level(logging.INFO, logger="sci_scale.train"):
        progress.add(record(1))
    assert not caplog.records


def test_durations_and_layouts_read_as_written() -> None:
    assert fmt_duration(59) == "0m59s" and fmt_duration(3725) == "1h02m"
    assert fmt_duration(-3) == "0m00s"
    assert layout_summary(2, 4, 8, 1) == "TP2 x PP4 x DP8, ZeRO-1"
    assert (
        layout_summary(1, 2, 1, 0, 2) == "TP1 x PP2 x DP1, ZeRO-0 (interleaved, 2 chunks per stage)"
    )


# -- stopping ------------------------------------------------------------------------------
def test_a_signal_stops_after_the_step_and_the_handlers_are_restored() -> None:
    before = signal.getsignal(signal.SIGUSR1)
    stops = StopConditions(max_wall_minutes=None, is_main=True, world_size=1)
    with stops:
        assert stops.reason() is None
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stops.reason() == "signal SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) is before


def test_the_wall_clock_limit_is_read_on_the_main_rank() -> None:
    long_ago = time.monotonic() - 120
    over = StopConditions(max_wall_minutes=1, is_main=True, world_size=1, started=long_ago)
    assert over.reason() == "train.max_wall_minutes=1 reached"
    assert StopConditions(1, is_main=False, world_size=1, started=long_ago).reason() is None
    assert StopConditions(None, is_main=True, world_size=1, started=long_ago).reason() is None


# -- checkpointing -------------------------------------------------------------------------
def test_resume_needs_a_checkpoint_and_auto_resume_starts_fresh(tmp_path: Path, make_config):
    cfg = make_config()
    tokenizer = tmp_path / "tok.model"
    tokenizer.write_bytes(b"a tokenizer")
    with pytest.raises(CheckpointError, match=r"--resume: no checkpoint under .*nothing to resume"):
        RunCheckpoints(cfg, tmp_path / "run", 1, tokenizer, resume=True)
    fresh = RunCheckpoints(cfg, tmp_path / "run", 1, tokenizer, resume="auto")
    assert not fresh.resuming
    assert fresh.restore_weights(torch.nn.Linear(2, 2)) == (0, 0)  # nothing loaded, step 0


def test_init_from_of_another_shape_names_every_difference(make_config) -> None:
    cfg = make_config()
    same = {"hidden_size": cfg.model.hidden_size, "ffn_hidden_size": None}
    check_same_shape(same, cfg, Path("ckpt"))  # an unset FFN width is its default
    other = {"hidden_size": cfg.model.hidden_size * 2, "num_layers": cfg.model.num_layers + 1}
    with pytest.raises(CheckpointError) as err:
        check_same_shape(other, cfg, Path("ckpt"))
    message = str(err.value)
    assert f"model.num_layers: {cfg.model.num_layers + 1} there, {cfg.model.num_layers} here" in (
        message
    )
    assert "model.hidden_size" in message and "model.ffn_hidden_size" in message


# -- SCI health ----------------------------------------------------------------------------
def test_step_summary_averages_what_was_measured(single_process) -> None:
    assert sci_step_summary([]) == {}
    stats = [
        SCIStats(scl=2.0, num_anchors=4, pos_cos=0.8, neg_cos=0.2),
        SCIStats(scl=1.0, num_anchors=2, pos_cos=float("nan"), neg_cos=0.4),
    ]
    summary = sci_step_summary(stats)
    assert summary["scl_loss"] == 1.5 and summary["scl_anchors"] == 6
    assert summary["pos_cos"] == pytest.approx(0.8) and summary["neg_cos"] == pytest.approx(0.3)
    assert summary["cos_gap"] == pytest.approx(0.5)


def test_collapsed_heldout_embeddings_warn(caplog) -> None:
    z = torch.ones(6, 4)
    templates = torch.tensor([0, 0, 1, 1, 2, 2])
    with caplog.at_level(logging.WARNING, logger="sci_scale.train"):
        metrics = heldout_representation([(z[:3], templates[:3]), (z[3:], templates[3:])], 7)
    assert metrics["eval_sci_cos_gap"] == pytest.approx(0.0)
    assert any(
        "SCI collapse" in r.getMessage() and "step 7" in r.getMessage() for r in caplog.records
    )
    assert heldout_representation([], 7) == {}


# -- memory --------------------------------------------------------------------------------
def test_first_step_memory_is_measured_once_around_the_update() -> None:
    model = torch.nn.Linear(64, 32, bias=False)
    optimizer = torch.optim.AdamW(model.parameters(), foreach=False)
    memory = FirstStepMemory(rank=0)
    weights = 64 * 32 * 4
    for step in range(2):
        model(torch.randn(3, 64)).sum().backward()
        memory.before_update(model, optimizer, None)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # gradients gone after the update
        memory.after_update(model, optimizer, None)
        if step == 0:
            figures = dict(memory.figures)
    assert memory.figures == figures  # measured at the first step only
    assert figures["params"] == weights and figures["grads"] == weights
    assert figures["optimizer"] >= 2 * weights  # AdamW's two moments
    assert memory.record_fields()["mem_params_mb"] == weights / 2**20


# -- the SCI component's contract --------------------------------------------------------
def _pair_batch(seq: int, vocab: int) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(0)
    lengths = [12, 15, 9, 14]
    pieces = [rng.integers(7, vocab, size=n) for n in lengths]
    owners = [np.full(n, i) for i, n in enumerate(lengths)]
    return collate([pack_block(pieces, owners, [10, 10, 20, 20], seq, pad_id=0)])


def test_forward_returns_the_lm_output_and_the_branch_statistics(make_config, single_process):
    cfg = make_config()
    seed_everything(3)
    model = SCIGPTModel(cfg, vocab_size=300)
    batch = _pair_batch(cfg.model.seq_length, 300)
    inputs = (batch["tokens"], batch["position_ids"])
    ids = {"example_ids": batch["example_ids"], "template_ids": batch["template_ids"]}
    out = model(*inputs, labels=batch["labels"], loss_mask=batch["loss_mask"], **ids)
    assert isinstance(out, ModelOutput) and out.lm.shape == batch["tokens"].shape
    assert out.sci is not None and out.sci.num_anchors == 4 and out.sci.embeddings is None
    assert math.isfinite(out.sci.scl) and out.sci.scl > 0
    collected = model(*inputs, **ids, collect_sci_embeddings=True).sci
    assert collected.embeddings.shape == (4, cfg.sci.embed_dim)
    assert collected.templates.tolist() == [10, 10, 20, 20]
    corpus = model(*inputs)  # no template ids: nothing to contrast
    assert corpus.sci is None and corpus.lm.shape[-1] >= 300


def test_the_branch_owns_its_parameters_and_keeps_its_checkpoint_keys(make_config, single_process):
    cfg = make_config("sci.learnable_tau=true")
    model = SCIGPTModel(cfg, vocab_size=300)
    owned = {n for n, _ in model.named_parameters() if is_sci_parameter(n)}
    assert owned == {f"sci.{n}" for n, _ in model.sci.named_parameters()}
    assert "sci.temperature.log_tau" in owned and "sci.gate" in owned
    assert not any(is_sci_parameter(n) for n, _ in model.gpt.named_parameters())
    assert is_sci_parameter("0.sci.gate")  # chunk lists prefix the names
    keys = {v.key for v in model.sharded_state_dict().values() if hasattr(v, "key")}
    # the temperature's key predates its move into the branch; checkpoints keep it
    assert "temperature.log_tau" in keys and "sci.temperature.log_tau" not in keys
    assert {"sci.gate", "sci.proj_in.weight"} <= keys
