"""A fresh ``train`` never writes over another run: it refuses a run directory that holds
checkpoints or metrics unless told ``--overwrite``; a resume keeps the records it continues."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import small_overrides

from sci_scale.checkpoint.index import latest_checkpoint
from sci_scale.cli.main import main
from sci_scale.config import load_config
from sci_scale.train.metrics import METRICS_FILE, SUPERSEDED_FILE, read_metrics
from sci_scale.train.trainer import train

RUN = ("train.steps=2", "checkpoint.interval=2")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, data_cache: Path) -> Path:
    run_dir = tmp_path_factory.mktemp("rundir") / "run"
    train(load_config(None, [*small_overrides(run_dir, data_cache), *RUN]))
    return run_dir


@pytest.fixture
def run_dir(trained: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(trained, tmp_path / "run"))


def argv(run_dir: Path, data_cache: Path, *extra: str) -> list[str]:
    return ["train", *small_overrides(run_dir, data_cache), *RUN, *extra]


def one_line(capsys: pytest.CaptureFixture[str], args: list[str]) -> str:
    capsys.readouterr()
    assert main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_a_fresh_run_refuses_a_directory_holding_a_run(run_dir, data_cache, capsys) -> None:
    before = (run_dir / METRICS_FILE).read_bytes()
    message = one_line(capsys, argv(run_dir, data_cache))
    assert message == (
        f"sci-scale train: error: run.dir={run_dir} already holds a run (1 checkpoint(s), the "
        f"newest step_0000002, {METRICS_FILE} with 2 record(s)): continue it with --resume or "
        "--auto-resume, start a new one with another run.dir, or replace it with --overwrite"
    )
    assert (run_dir / METRICS_FILE).read_bytes() == before  # nothing truncated
    assert latest_checkpoint(run_dir / "checkpoints").name == "step_0000002"


def test_metrics_alone_are_a_run_too(run_dir, data_cache, capsys) -> None:
    shutil.rmtree(run_dir / "checkpoints")
    message = one_line(capsys, argv(run_dir, data_cache))
    assert f"already holds a run ({METRICS_FILE} with 2 record(s))" in message


def test_overwrite_replaces_the_previous_run(run_dir, data_cache) -> None:
    args = argv(run_dir, data_cache, "train.steps=1", "checkpoint.interval=1", "--overwrite")
    assert main(args) == 0
    assert [r["step"] for r in read_metrics(run_dir)] == [1]
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == ["step_0000001"]
    assert not (run_dir / "checkpoints" / "step_0000002").exists()


def test_overwrite_and_resume_exclude_each_other(run_dir, data_cache, capsys) -> None:
    message = one_line(capsys, argv(run_dir, data_cache, "--overwrite", "--auto-resume"))
    assert "--overwrite starts a new run" in message


def test_a_directory_without_a_run_is_used_as_it_is(tmp_path, data_cache) -> None:
    run_dir = tmp_path / "run"
    (run_dir / "notes").mkdir(parents=True)
    (run_dir / METRICS_FILE).write_text("")  # an empty file from a start that never stepped
    assert main(argv(run_dir, data_cache, "train.steps=1")) == 0
    assert (run_dir / "notes").is_dir()


def test_a_resume_appends_to_the_records_it_continues(run_dir, data_cache) -> None:
    before = read_metrics(run_dir)
    assert main(argv(run_dir, data_cache, "train.steps=3", "--resume")) == 0
    after = read_metrics(run_dir)
    assert after[:2] == before and [r["step"] for r in after] == [1, 2, 3]


def test_records_of_an_interrupted_attempt_are_set_aside_not_lost(run_dir, data_cache) -> None:
    """Records past the checkpoint (a crash between saves), and a line cut short by a kill
    mid-write, move to metrics.superseded.jsonl; metrics.jsonl reads as one run."""
    records = read_metrics(run_dir)
    with open(run_dir / METRICS_FILE, "a") as handle:
        handle.write('{"step": 3, "lm_loss": 1.0}\n{"step": 4, "lm_lo')  # no newline: cut short
    assert main(argv(run_dir, data_cache, "train.steps=3", "--resume")) == 0
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3]
    assert read_metrics(run_dir)[:2] == records
    side = (run_dir / SUPERSEDED_FILE).read_text().splitlines()
    assert side == ['{"step": 3, "lm_loss": 1.0}', '{"step": 4, "lm_lo']
