"""The memory planner: ``sci-scale plan``, ``submit`` refusing what does not fit, and the
planned terms against what a real model holds on the CPU.

The state terms are compared with the trainer's own accounting of one training step; the
activation term with the bytes of every tensor storage autograd keeps for backward during one
forward of the real model (each storage once, weights excluded).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from activation_memory import saved_for_backward

from sci_scale.cli.main import main
from sci_scale.config import load_config
from sci_scale.data.loader import collate
from sci_scale.launch.memory_plan import (
    GB,
    GIB,
    LABELS,
    SciBatch,
    in_flight_per_chunk,
    parse_memory,
    plan_memory,
)
from sci_scale.model.attention import example_layout
from sci_scale.runtime.distributed import destroy_distributed
from sci_scale.train.trainer import Trainer, train

REPO = Path(__file__).resolve().parents[1]
CLUSTER_70B = REPO / "configs" / "bench" / "llama-70b-cluster.yaml"
# the shipped GPU configs and the nodes x GPUs they are meant for
SHIPPED = [
    ("bench/llama-8b-cluster.yaml", 4, 8),
    ("bench/llama-70b-cluster.yaml", 32, 8),
    ("continue/llama3-8b.yaml", 4, 8),
    ("continue/smollm2-135m.yaml", 1, 8),
    ("bench/llama-1b.yaml", 1, 1),
    ("bench/llama-3b.yaml", 1, 1),
]
ROWS = ("parameters", "gradients", "optimizer state", "activations", "of which SCI branch")


def test_plan_prints_every_term_for_the_default_config(capsys) -> None:
    assert main(["plan", "--nodes", "1", "--gpus-per-node", "1"]) == 0
    out = capsys.readouterr().out
    for row in (*ROWS, "total", "GPU memory", "headroom"):
        assert f"  {row} " in out, row
    assert "TP1 x PP1 x DP1, ZeRO-0" in out and "recompute none" in out
    assert 'docs/parallel.md, "Memory planner"' in out


def test_the_70b_config_fits_80gb_at_its_node_count(tmp_path: Path, capsys) -> None:
    out_json = tmp_path / "plan.json"
    args = ["plan", str(CLUSTER_70B), "--nodes", "32", "--gpus-per-node", "8"]
    assert main([*args, "--json", str(out_json)]) == 0
    assert "TP8 x PP4 x DP8, ZeRO-1" in capsys.readouterr().out
    plan = json.loads(out_json.read_text())
    assert plan["fits"] and plan["total"] < 80 * GB and plan["gpu_memory"] == 80 * GB
    assert plan["stage"] == 0  # embedding, SCI branch and 4 micro-batches in flight
    terms = ("parameters", "gradients", "optimizer", "activations")
    assert plan["total"] == sum(plan[t] for t in terms)


@pytest.mark.parametrize(("config", "nodes", "gpus"), SHIPPED)
def test_shipped_configs_fit_and_their_headers_say_what_is_planned(
    config: str, nodes: int, gpus: int
) -> None:
    path = REPO / "configs" / config
    plan = plan_memory(load_config(path), nodes * gpus)
    assert plan.fits, plan.refusal()
    header = "".join(line for line in path.read_text().splitlines() if line.startswith("#"))
    assert f"{plan.total / GIB:.1f} GiB" in header, "update the header's planned total"


def test_a_layout_over_memory_is_refused_by_plan_and_submit(tmp_path: Path, capsys) -> None:
    over = ["parallel.tensor=1", "parallel.pipeline=1", "parallel.sequence_parallel=false"]
    plan = plan_memory(load_config(CLUSTER_70B, over), 8)
    assert not plan.fits
    reason = f"the largest term is {LABELS[plan.dominant]}"
    run_dir = tmp_path / "run"
    args = [str(CLUSTER_70B), *over, f"run.dir={run_dir}", "--nodes", "1", "--gpus-per-node", "8"]
    assert main(["plan", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and reason in err and "does not fit a 80 GB GPU" in err

    assert main(["submit", *args, "--dry-run"]) == 2
    captured = capsys.readouterr()
    assert reason in captured.err and "#SBATCH" not in captured.out
    assert not run_dir.exists()


def test_activations_too_large_name_the_knobs(tmp_path: Path, capsys) -> None:
    big = ["model.seq_length=4096", "train.micro_batch_size=16", "train.global_batch_size=16"]
    args = [*big, f"run.dir={tmp_path / 'run'}", "--nodes", "1", "--gpus-per-node", "1"]
    assert main(["submit", *args, "--gpu-memory", "2GB", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "the largest term is activations" in err and "a lower train.micro_batch_size" in err
    assert main(["submit", *args, "--gpu-memory", "141GB", "--dry-run"]) == 0  # an H200 fits


def test_gpu_memory_units() -> None:
    assert parse_memory("80GB") == 80 * GB
    assert parse_memory("80GiB") == 80 * GIB
    assert parse_memory("141gb") == 141 * GB
    assert parse_memory("141") == 141 * GB
    with pytest.raises(ValueError, match=r"expected e\.g\. 80GB"):
        parse_memory("eighty")


def test_1f1b_keeps_fewer_micro_batches_on_later_stages() -> None:
    assert [in_flight_per_chunk(r, 4, 1, 128)[0] for r in range(4)] == [4, 3, 2, 1]
    assert in_flight_per_chunk(0, 4, 1, 2) == [2]  # never more than a step's micro-batches
    # interleaved: L (1 + (p - 1) / (p v)) layers' worth on the first rank (Korthikanti et al.)
    pp, vp, layers = 4, 2, 32
    held = sum(in_flight_per_chunk(0, pp, vp, 64)) * layers // (pp * vp)
    assert held == layers * (1 + (pp - 1) / (pp * vp))


# -- planned against measured (CPU) ------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        (),
        ("model.tie_embeddings=false", "sci.pooling=attention", "sci.learnable_tau=true"),
        ("sci.mode=frozen", "model.qkv_bias=true"),
    ],
    ids=["default", "untied", "sci-frozen"],
)
def test_state_terms_equal_what_training_holds(make_config, tmp_path: Path, overrides) -> None:
    cfg = make_config(
        "train.steps=1", "checkpoint.save_final=false", "parallel.zero_stage=0", *overrides
    )
    train(cfg)
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    plan = plan_memory(cfg, 1, device="cpu")
    for term, key in (("parameters", "params"), ("gradients", "grads"), ("optimizer", "optimizer")):
        assert getattr(plan, term) == round(first[f"mem_{key}_mb"] * 2**20), term


def _saved_for_backward(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd keeps during one forward (weights excluded)."""
    return saved_for_backward(
        lambda: model(
            batch["tokens"],
            batch["position_ids"],
            labels=batch["labels"],
            loss_mask=batch["loss_mask"],
            example_ids=batch["example_ids"],
            template_ids=batch["template_ids"],
        ),
        exclude=[*model.parameters(), *model.buffers()],
    )


def _micro_batch(dataset, size: int, pairs: bool) -> dict[str, torch.Tensor]:
    """``size`` blocks of one kind: pair blocks, or corpus blocks only."""
    blocks = (dataset[i] for i in range(len(dataset)))
    chosen = [b for b in blocks if (b["template_ids"][0] >= 0) == pairs][:size]
    assert len(chosen) == size
    return collate(chosen)


@pytest.mark.parametrize(
    ("overrides", "pairs", "scores"),
    [
        ((), False, False),
        (("model.recompute=selective", "model.seq_length=256"), True, False),
        (("model.attention_backend=unfused",), False, True),  # SDPA's math kernel
        (("model.recompute=full", "sci.fuse_layer=0"), True, False),
    ],
    ids=["none-s128-corpus", "selective-s256-pairs", "math-kernel-s128", "full-s128-pairs"],
)
def test_activations_match_the_tensors_saved_for_backward(
    make_config, overrides: tuple[str, ...], pairs: bool, scores: bool
) -> None:
    cfg = make_config("train.global_batch_size=4", *overrides)
    trainer = Trainer(cfg)
    try:
        trainer.setup()
        batch = _micro_batch(trainer.data.train, cfg.train.micro_batch_size, pairs)
        measured = _saved_for_backward(trainer.model, batch)
    finally:
        destroy_distributed()
    sci = SciBatch(pairs=False)
    if pairs:  # the padding of this micro-batch's unpacked examples
        layout = example_layout(batch["example_ids"])
        assert layout is not None
        rows = sum(g.index.numel() for g in layout.groups)
        sci = SciBatch(pairs=True, padding=rows / batch["tokens"].numel())
    plan = plan_memory(cfg, 1, device="cpu", attention_stores_scores=scores, sci_batch=sci)
    planned = plan.worst.activations_per_microbatch
    # one micro-batch in flight and fp32 logits: only full recompute adds a transient (the
    # layer re-run in backward), which no forward keeps
    assert (plan.activations > planned) == (cfg.model.recompute == "full")
    print(f"activations {overrides}: measured {measured:,} B, planned {planned:,} B")
    assert abs(planned - measured) <= 0.2 * measured, (planned, measured)
