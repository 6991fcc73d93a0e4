"""The generalization protocol: task data, dev/test separation, target-only loss, the study."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import small_overrides

from sci_scale.config import ConfigError, load_config
from sci_scale.config.task import parse_task
from sci_scale.data.build import build_data, config_task_parts
from sci_scale.data.pairs.scan import scan_split
from sci_scale.data.task import task_parts
from tests.launchers import sci_scale_cli

COGS_DIR = Path(__file__).parent / "data" / "cogs"


def task_overrides(tmp_path: Path, task: str = "scan:simple", *extra: str) -> list[str]:
    """The shared small model, trained on a benchmark task."""
    return [
        *small_overrides(tmp_path / "run", tmp_path / "cache"),
        "model.hidden_size=32",
        "data.corpus=task",
        f"data.task={task}",
        "data.tokenizer_model_type=word",
        "data.target_loss_only=true",
        "data.reset_attention_mask=true",
        "train.steps=40",
        "train.eval_interval=20",
        *extra,
    ]


def _examples_of_block(block: dict, detok) -> list[str]:
    """The text of each example packed in a block (inputs + the last label)."""
    ids = np.concatenate([block["tokens"], block["labels"][-1:]])
    owner = np.concatenate([block["example_ids"], [block["example_ids"][-1]]])
    return [detok(ids[owner == k].tolist()) for k in sorted(set(owner.tolist()) - {-1})]


@pytest.mark.parametrize("task", ["scan:simple", "scan:length+addprim_jump"])
def test_no_test_example_reaches_training_dev_or_tokenizer(tmp_path, task, monkeypatch):
    import sci_scale.data.pipeline as pipeline

    seen_texts: list[str] = []
    real = pipeline.train_sentencepiece

    def spy(texts, *args, **kwargs):
        texts = list(texts)
        seen_texts.extend(texts)
        return real(texts, *args, **kwargs)

    monkeypatch.setattr(pipeline, "train_sentencepiece", spy)
    cfg = load_config(None, task_overrides(tmp_path, task))
    parts = config_task_parts(cfg)
    test_sources = {ex.source for ex in parts.test}
    published_test = {c for c, _ in scan_split(task.split(":")[1], "test")}
    assert test_sources == published_test  # the published test part is the one scored
    dev_sources = {ex.source for ex in parts.dev}
    train_sources = {ex.source for ex in parts.train}
    assert dev_sources and not dev_sources & train_sources and not dev_sources & test_sources
    assert not train_sources & test_sources

    bundle = build_data(cfg, tmp_path / "run")
    assert seen_texts, "the tokenizer was trained on something"
    assert not {t.removeprefix("IN: ").partition(" OUT: ")[0] for t in seen_texts} & (
        test_sources | dev_sources
    )
    tok = bundle.tokenizer
    trained: set[str] = set()
    for i in range(len(bundle.train)):  # every block of the run, task and pair blocks alike
        for text in _examples_of_block(bundle.train[i], tok.detokenize):
            trained.add(text.removeprefix("IN: ").partition(" OUT:")[0].strip())
    assert trained and trained <= train_sources
    assert bundle.pair_rate_realised > 0  # pair blocks were among them


def test_cogs_task_parts_are_disjoint(tmp_path):
    import shutil

    shutil.copy(COGS_DIR / "train.tsv", tmp_path / "train.tsv")
    shutil.copy(COGS_DIR / "dev.tsv", tmp_path / "test.tsv")
    # a training line that is also a test line must not train
    test_line = (tmp_path / "test.tsv").read_text().splitlines()[0]
    with open(tmp_path / "train.tsv", "a") as handle:
        handle.write(test_line + "\n")
    parts = task_parts(parse_task("cogs:test"), 100, str(tmp_path))
    test = {ex.source for ex in parts.test}
    assert len(parts.test) == len((tmp_path / "test.tsv").read_text().splitlines())
    assert not test & {ex.source for ex in parts.train} and not test & {
        ex.source for ex in parts.dev
    }
    with pytest.raises(Exception, match=r"gen\.tsv"):
        task_parts(parse_task("cogs"), 100, str(tmp_path))


def test_dev_set_never_takes_the_repeated_primitive():
    parts = task_parts(parse_task("scan:addprim_jump"), 500)
    assert "jump" not in {ex.source for ex in parts.dev}
    assert sum(ex.source == "jump" for ex in parts.train) == 1467


def test_scan_test_part_is_seed_independent_and_published_simple():
    assert scan_split("simple", "test", 0) == scan_split("simple", "test", 1234)
    assert len(scan_split("simple", "test")) == 4182
    assert len(scan_split("simple", "train")) == 16728
    assert scan_split("simple", "train", 1) != scan_split("simple", "train", 2)  # order only
    assert sorted(scan_split("simple", "train", 1)) == sorted(scan_split("simple", "train", 2))


def test_loss_is_on_target_tokens_only(tmp_path):
    cfg = load_config(None, task_overrides(tmp_path, "scan:simple", "data.pair_rate=0.5"))
    bundle = build_data(cfg, tmp_path / "run")
    tok = bundle.tokenizer
    targets = {ex.source: ex.target for ex in config_task_parts(cfg).train}
    checked = 0
    for i in range(40):
        block = bundle.train[i]
        mask, labels, owner = block["loss_mask"] > 0, block["labels"], block["example_ids"]
        for k in sorted(set(owner.tolist()) - {-1}):
            # labels of example k: those predicted from its own tokens (owner of the input)
            rows = owner == k
            text = tok.detokenize(np.concatenate([block["tokens"][rows][:1], labels[rows]]))
            source = text.removeprefix("IN: ").partition(" OUT:")[0].strip()
            trained = labels[rows & mask].tolist()
            if not rows[-1]:  # a whole example: its trained labels are the target + the end
                assert trained[-1] == tok.eod
                assert tok.detokenize(trained[:-1]).split() == targets[source].split()
                checked += 1
    assert checked > 50


def test_without_target_only_the_prompt_is_trained_too(tmp_path):
    cfg = load_config(None, task_overrides(tmp_path, "scan:simple", "data.target_loss_only=false"))
    bundle = build_data(cfg, tmp_path / "run")
    for i in range(10):
        block = bundle.train[i]
        # a label is trained wherever it belongs to an example (its owner is the next input)
        owner_of_label = np.concatenate([block["example_ids"][1:], [-1]])
        expected = owner_of_label >= 0
        expected[-1] = block["labels"][-1] != bundle.tokenizer.pad
        assert ((block["loss_mask"] > 0) == expected).all()


def test_per_document_attention_matches_each_document_alone(tmp_path):
    """With data.reset_attention_mask, a document's logits in a packed block equal its logits
    when it is run alone; without it, the neighbour changes them."""
    import torch

    from sci_scale.checkpoint.load import single_process
    from sci_scale.model.gpt import SCIGPTModel

    def logits(cfg, ids, example_ids):
        model = SCIGPTModel(cfg, vocab_size=64)
        model.eval()
        with torch.no_grad():
            pos = torch.arange(ids.size(1))[None]
            return model(ids, pos, example_ids=example_ids).lm

    a = torch.randint(0, 64, (1, 20))
    b = torch.randint(0, 64, (1, 30))
    packed = torch.cat([a, b], 1)
    ids = torch.cat([torch.zeros(1, 20, dtype=torch.long), torch.ones(1, 30, dtype=torch.long)], 1)
    with single_process():
        on = load_config(None, task_overrides(tmp_path, "scan:simple", "sci.mode=off"))
        off = load_config(None, [*task_overrides(tmp_path), "sci.mode=off",
                                 "data.reset_attention_mask=false"])  # fmt: skip
        alone = logits(on, b, torch.zeros_like(b))
        together = logits(on, packed, ids)[:, 20:]
        leaky = logits(off, packed, ids)[:, 20:]
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    assert (leaky - alone).abs().max() > 1e-3


def test_task_config_errors():
    with pytest.raises(ConfigError, match=r"data\.task is not set"):
        load_config(None, ["data.corpus=task"])
    with pytest.raises(ConfigError, match="benchmark must be one of"):
        load_config(None, ["data.corpus=task", "data.task=wiki:x"])
    with pytest.raises(ConfigError, match=r"needs data\.cogs_path"):
        load_config(None, ["data.corpus=task", "data.task=cogs"])
    with pytest.raises(ConfigError, match=r"only read with data\.corpus=task"):
        load_config(None, ["data.task=scan:simple"])


def test_unknown_split_and_variant_are_one_line_errors(tmp_path):
    out = sci_scale_cli("experiment", "generalization", "--splits", "simple,lenght",
                        "--out", str(tmp_path))  # fmt: skip
    assert out.returncode == 2 and "'lenght' is not a scan split" in out.stderr
    out = sci_scale_cli("experiment", "generalization", "--variants", "vanila",
                        "--out", str(tmp_path))  # fmt: skip
    assert out.returncode == 2 and "unknown vanila" in out.stderr


@pytest.mark.slow
def test_study_writes_results_json_and_resumes(tmp_path):
    """A small study through the CLI: the results.json schema, the report, a rerun that
    skips finished runs, and the dev/test separation of the selection."""
    overrides = [
        o for o in task_overrides(tmp_path) if not o.startswith(("run.dir", "data.cache_dir"))
    ]
    overrides += ["train.steps=6", "train.eval_interval=3", "experiment.dev_limit=8",
                  "experiment.test_limit=12", "experiment.sci_only_steps=2",
                  "experiment.eval_batch_size=16"]  # fmt: skip
    out = tmp_path / "study"
    args = ["experiment", "generalization", "--splits", "simple", "--variants",
            "vanilla,sci_joint,pairs_no_scl,sci_pretrain_joint", "--seeds", "1",
            "--out", str(out), *overrides]  # fmt: skip
    run = sci_scale_cli(*args)
    assert run.returncode == 0, run.stderr[-3000:]
    records = json.loads((out / "results.json").read_text())
    assert len(records) == 4
    for r in records:
        assert {"variant", "split", "seed", "exact_match", "examples", "steps", "wall_s"} <= set(r)
        assert r["split"] == "simple" and r["examples"] == 12 and r["steps"] == 6
        assert 0.0 <= r["exact_match"] <= 1.0 and r["wall_s"] > 0
        assert r["selected_step"] in (3, 6) and [c[0] for c in r["dev_curve"]] == [3, 6]
    assert {(r["variant"], r["seed"]) for r in records} == {
        (v, 1) for v in ("vanilla", "sci_joint", "pairs_no_scl", "sci_pretrain_joint")
    }
    assert (out / "runs/simple/sci_pretrain_joint-sci_only/seed1/checkpoints").is_dir()
    report = (out / "REPORT.md").read_text()
    assert "Sanity gate: **FAILED**" in report  # 6 steps cannot learn SCAN
    again = sci_scale_cli(*args)
    assert again.returncode == 0
    assert "done before" in again.stdout and "study run 1/4" in again.stdout
    assert "training steps" not in again.stdout  # nothing retrained


def test_submit_queues_an_array_and_a_report_after_it(tmp_path, recording_sbatch):
    bin_dir, calls = recording_sbatch
    out = tmp_path / "study dir"
    run = sci_scale_cli("experiment", "generalization", "--preset", "full", "--submit",
                        "--out", str(out), "--max-parallel", "8", "--partition", "gpu",
                        path_dir=bin_dir)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    lines = calls.read_text().splitlines()
    assert len(lines) == 2 and "--dependency=afterany:4242" in lines[1]
    scripts = sorted((out / "slurm").glob("study-*-runs.sbatch"))
    assert len(scripts) == 1
    text = scripts[0].read_text()
    assert "#SBATCH --array=0-99%8" in text and "#SBATCH --partition=gpu" in text
    assert '--run-index "$SLURM_ARRAY_TASK_ID"' in text
    assert f"--out '{out}'" in text  # a path with a space stays one argument
    frozen = sorted((out / "slurm").glob("study-*.yaml"))
    assert len(frozen) == 1 and str(frozen[0]) in text
    listed = sci_scale_cli("experiment", "generalization", "--preset", "full", "--list")
    assert len(listed.stdout.splitlines()) == 100


def test_submit_refuses_a_bad_time_before_queueing(tmp_path, recording_sbatch):
    bin_dir, calls = recording_sbatch
    run = sci_scale_cli("experiment", "generalization", "--submit", "--time", "4 hours",
                        "--out", str(tmp_path / "s"), path_dir=bin_dir)  # fmt: skip
    assert run.returncode == 2 and "--time '4 hours'" in run.stderr
    assert not calls.exists()


def test_statistics_of_a_cell_and_the_paired_test():
    from sci_scale.experiment.stats import paired_test, sign_flip_p, summarise

    s = summarise([0.1, 0.2, 0.3, 0.4, 0.5])
    assert s.n == 5 and abs(s.mean - 0.3) < 1e-12 and abs(s.std - 0.158113883) < 1e-6
    assert 0.1 <= s.ci_low < s.mean < s.ci_high <= 0.5
    one = summarise([0.7])
    assert one.std == 0.0 and np.isnan(one.ci_low)
    # every difference positive: the sign-flip test reaches its floor, 2 / 2^n
    assert sign_flip_p([0.1, 0.2, 0.1, 0.3, 0.2]) == 2 / 32
    assert sign_flip_p([0.1, -0.1]) == 1.0
    t = paired_test(
        {1: 0.5, 2: 0.6, 3: 0.7, 4: 0.65, 5: 0.55}, {1: 0.1, 2: 0.2, 3: 0.15, 4: 0.1, 5: 0.2}
    )
    assert t is not None and t.n == 5 and t.significant and t.t_p < 1e-3
    assert abs(t.mean_diff - 0.45) < 1e-9 and t.min_sign_flip_p == 2 / 32
    same = paired_test({1: 0.5, 2: 0.4, 3: 0.6}, {1: 0.45, 2: 0.5, 3: 0.55})
    assert same is not None and not same.significant
    assert paired_test({1: 0.5}, {2: 0.5}) is None


def test_a_failed_gate_reports_no_comparison(tmp_path):
    from sci_scale.experiment.generalization_report import write_study_report
    from sci_scale.experiment.study import VARIANTS, Study

    cfg = load_config(None, [])
    study = Study(cfg, tmp_path, "scan", ["simple", "length"],
                  [VARIANTS["vanilla"], VARIANTS["sci_joint"]], [1])  # fmt: skip

    def rec(split, variant, em):
        return {"split": split, "variant": variant, "seed": 1, "exact_match": em,
                "wall_s": 1.0, "dev_curve": [[10, em]]}  # fmt: skip

    failed = [rec("simple", "vanilla", 0.4), rec("simple", "sci_joint", 0.0),
              rec("length", "vanilla", 0.0), rec("length", "sci_joint", 0.0)]  # fmt: skip
    text = write_study_report(study, failed).read_text()
    assert "**FAILED**" in text and "40.0%" in text and "## Test exact match" not in text
    passed = [rec("simple", "vanilla", 0.97), *failed[1:]]
    text = write_study_report(study, passed).read_text()
    assert "**passed**" in text and "## Test exact match" in text and "97.0%" in text
    assert (tmp_path / "exact_match.png").is_file()


def test_selection_decodes_dev_only_and_keeps_the_latest_best(tmp_path, monkeypatch):
    import sci_scale.experiment.selection as selection
    from sci_scale.eval.generalization import EvalResult

    cfg = load_config(None, task_overrides(tmp_path))
    parts = config_task_parts(cfg)
    dev, test = {ex.source for ex in parts.dev}, {ex.source for ex in parts.test}
    for step in (10, 20, 30):
        (tmp_path / "run" / "checkpoints" / f"step_{step:07d}").mkdir(parents=True)
    decoded: list[tuple[str, list[str]]] = []
    scores = {"step_0000010": 5, "step_0000020": 9, "step_0000030": 9}

    def fake(ckpt, pairs, task, batch_size):
        decoded.append((ckpt.name, [source for source, _ in pairs]))
        return EvalResult(task, len(pairs), scores.get(ckpt.name, 0))

    monkeypatch.setattr(selection, "exact_match_of", fake)
    chosen = selection.select_on_dev(cfg, batch_size=8, limit=None)
    assert chosen.step == 30 and [c[0] for c in chosen.curve] == [10, 20, 30]
    assert all(set(sources) == dev for _, sources in decoded)  # dev, all of it, only it
    decoded.clear()
    selection.score_test(cfg, chosen.checkpoint, batch_size=8)
    assert [name for name, _ in decoded] == ["step_0000030"]
    assert set(decoded[0][1]) == test and not test & dev
