"""The ablation study end to end at test size, its resumption, and the eval command on one of
its checkpoints."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from sci_scale.config import load_config
from sci_scale.config.errors import ConfigError
from sci_scale.experiment.ablation import run_ablation
from sci_scale.experiment.variants import ablation_variants

REPO = Path(__file__).resolve().parents[1]
COGS_DIR = Path(__file__).resolve().parent / "data" / "cogs"  # train + dev excerpts
SEEDS = [1, 2]

TEST_SIZE = [
    "model.num_layers=2",
    "model.hidden_size=64",
    "sci.hidden_size=32",
    "sci.num_layers=1",
    "sci.embed_dim=16",
    "data.max_docs=300",
    "data.tokenizer_vocab_size=512",
    "data.arithmetic_per_template=8",
    "data.pair_sources=[scan,arithmetic,cogs]",
    f"data.cogs_path={COGS_DIR}",
    "train.steps=4",
    "train.warmup_steps=1",
    "train.log_interval=2",
    "train.eval_interval=2",
    "train.eval_batches=1",
    f"experiment.seeds={SEEDS}",
    "experiment.pair_rates=[0.0,0.25]",
    "experiment.pair_rate=0.25",
    "experiment.sci_only_steps=2",
    "experiment.eval_limit=4",
    "experiment.ppl_blocks=2",
    "experiment.probe_templates=6",
]


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("ablation")
    cfg = load_config(REPO / "configs" / "ablation.yaml", TEST_SIZE)
    report = run_ablation(cfg, out, "sci-scale experiment ablation (test size)")
    return report, cfg


def _table_rows(report: str, heading: str) -> list[list[str]]:
    section = report.split(heading, 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    return [[c.strip() for c in row.strip("|").split("|")] for row in rows[1:]]


@pytest.mark.slow
def test_ablation_report_has_every_row_filled(study) -> None:
    report_path, cfg = study
    out = report_path.parent
    variants = ablation_variants(cfg)
    assert [v.key for v in variants] == [
        "vanilla", "pairs_no_scl", "sci_joint_0pct", "sci_joint_25pct", "sci_frozen"
    ]  # fmt: skip
    assert len(list((out / "results").glob("*.json"))) == len(variants) * len(SEEDS)
    text = report_path.read_text()
    header = next(line for line in text.splitlines() if line.startswith("| variant | held-out"))
    for column in ("SCAN simple", "SCAN length", "SCAN template_around_right", "COGS"):
        assert column in header
    rows = _table_rows(text, "## Results")
    assert [r[0] for r in rows] == [f"{v.label} (n={len(SEEDS)})" for v in variants]
    for row, variant in zip(rows, variants, strict=True):
        assert "n/a" not in row and all(row), row
        for value in row[1:]:  # every figure is "mean ± sd" (or a stated absence)
            assert re.fullmatch(r"[+-]?[\d.]+%? ± [\d.]+( ?%| pts)?", value) or value in (
                "(baseline)", "no branch"
            ), value  # fmt: skip
        assert ("no branch" in row) == (not variant.has_branch)
    probe_rows = _table_rows(text, "## Structural probe")
    assert len(probe_rows) == len(variants) + sum(v.has_branch for v in variants)
    for name in ("loss_curves.png", "metric_curves.png", "rate_sweep.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({name})" in text


@pytest.mark.slow
def test_ablation_runs_are_what_the_variants_say(study) -> None:
    report_path, _ = study
    out = report_path.parent
    record = json.loads((out / "results" / "sci_frozen-seed1.json").read_text())
    assert record["sci_mode"] == "frozen" and record["lm_tokens"] == 4 * 8 * 256
    from sci_scale.checkpoint.load import checkpoint_config

    cfg, _ = checkpoint_config(Path(record["checkpoint"]))
    assert cfg.sci.mode == "frozen" and cfg.train.seed == 1
    assert cfg.checkpoint.init_from.startswith(str(out / "runs" / "sci_only" / "seed1"))
    assert cfg.data.scan_split == "simple+length+template_around_right"
    vanilla, _ = checkpoint_config(Path(json.loads(
        (out / "results" / "vanilla-seed2.json").read_text())["checkpoint"]))  # fmt: skip
    assert (vanilla.sci.mode, vanilla.data.pair_rate, vanilla.train.seed) == ("off", 0.0, 2)
    figures = record["figures"]
    assert 0.0 <= figures["scan_length"] <= 1.0 and figures["heldout_ppl"] > 1.0
    assert {"backbone_recall_at_1", "sci_recall_at_1", "cogs"} <= set(figures)


@pytest.mark.slow
def test_a_rerun_reads_finished_runs_back(study, caplog: pytest.LogCaptureFixture) -> None:
    report_path, cfg = study
    out = report_path.parent
    before = {p: p.stat().st_mtime_ns for p in (out / "results").glob("*.json")}
    with caplog.at_level("INFO", logger="sci_scale"):
        run_ablation(cfg, out)
    assert {p: p.stat().st_mtime_ns for p in (out / "results").glob("*.json")} == before
    assert sum("done before" in r.getMessage() for r in caplog.records) == len(before)


@pytest.mark.slow
def test_reevaluation_rescores_without_retraining(study) -> None:
    report_path, cfg = study
    out = report_path.parent
    path = out / "results" / "vanilla-seed1.json"
    before = json.loads(path.read_text())
    metrics = Path(before["metrics"]).read_text()
    from sci_scale.config.loader import override_config

    fewer = override_config(cfg, ["experiment.eval_limit=2", "experiment.scan_splits=[length]"])
    run_ablation(fewer, out, reevaluate=True)
    after = json.loads(path.read_text())
    assert Path(before["metrics"]).read_text() == metrics  # no step was trained
    assert after["train_s"] == before["train_s"] and after["checkpoint"] == before["checkpoint"]
    assert "scan_simple" not in after["figures"] and "scan_length" in after["figures"]
    assert after["figures"]["heldout_ppl"] == pytest.approx(before["figures"]["heldout_ppl"])


@pytest.mark.slow
def test_eval_command_runs_every_task_on_a_study_checkpoint(study, tmp_path: Path) -> None:
    from sci_scale.cli.main import main

    out = study[0].parent
    ckpt = json.loads((out / "results" / "sci_joint_25pct-seed2.json").read_text())["checkpoint"]
    dest = tmp_path / "eval.json"
    argv = ["eval", ckpt, "--task", "ppl", "scan", "probe", "--split", "length", "--limit", "3",
            "--ppl-blocks", "2", "--probe-templates", "4", "--json", str(dest)]  # fmt: skip
    assert main(argv) == 0
    figures = json.loads(dest.read_text())
    study_figures = json.loads((out / "results" / "sci_joint_25pct-seed2.json").read_text())
    # the same checkpoint and held-out blocks give the same perplexity as the study measured
    assert figures["heldout_ppl"] == pytest.approx(study_figures["figures"]["heldout_ppl"])
    assert figures["probe_examples"] == 8 and "sci_rankme" in figures
    assert 0.0 <= figures["scan_length"] <= 1.0


def test_experiment_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"experiment.pair_rates must be in \[0, 1\), got 1.5"):
        load_config(None, ["experiment.pair_rates=[0.05,1.5]"])
    with pytest.raises(ConfigError, match=r"experiment.seeds repeats a seed"):
        load_config(None, ["experiment.seeds=[1,1]"])
    from sci_scale.data.pairs import PairDataError
    from sci_scale.experiment.ablation import study_config

    cfg = load_config(None, ["experiment.scan_splits=[length,lenght]"])
    with pytest.raises(PairDataError, match="unknown SCAN split 'lenght'"):
        study_config(cfg, Path("unused"))
