"""``submit`` makes every path in the config absolute against the directory it runs in and
refuses, before anything is queued, a job whose inputs are missing (one line naming the key).

A fake ``sbatch`` stands in for Slurm here; tests/test_slurm.py runs a job submitted this way
on the real cluster.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml
from launchers import sci_scale_cli

from sci_scale.config import load_config
from sci_scale.launch.inputs import check_inputs, resolve_paths


def submit(cwd: Path, bin_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return sci_scale_cli("submit", *args, "--gpus-per-node", "0", cwd=cwd, path_dir=bin_dir)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A user's directory with a JSONL corpus, a tokenizer file, pair files and a checkpoint."""
    root = tmp_path / "project"
    (root / "data").mkdir(parents=True)
    (root / "data" / "corpus.jsonl").write_text('{"text": "hello"}\n')
    (root / "data" / "shard.bin").write_bytes(b"")
    (root / "data" / "shard.idx").write_bytes(b"")
    (root / "tok").mkdir()
    (root / "tok" / "spm.model").write_bytes(b"m")
    (root / "pairs.jsonl").write_text("")
    (root / "ckpt").mkdir()
    (root / "ckpt" / "run_state.pt").write_bytes(b"s")
    return root


def test_relative_paths_become_absolute_against_the_submitting_directory(
    project: Path, recording_sbatch, tmp_path: Path
) -> None:
    bin_dir, calls = recording_sbatch
    args = [
        *("run.dir=runs/r1", "data.corpus=jsonl", "data.corpus_paths=[data/corpus.jsonl]"),
        *("data.tokenizer=tok/spm.model", "data.user_pairs_path=pairs.jsonl"),
        *("checkpoint.init_from=ckpt", "data.cache_dir=cache"),
    ]
    proc = submit(project, bin_dir, *args)
    assert proc.returncode == 0, proc.stderr
    run_dir = project / "runs" / "r1"
    assert f"run directory {run_dir}" in proc.stdout
    script = Path(calls.read_text().split()[-1])
    frozen = script.with_suffix(".yaml")
    assert script.parent == run_dir / "slurm" and frozen.is_file()  # the config beside it
    assert f"CONFIG={frozen}" in script.read_text()
    cfg = yaml.safe_load(frozen.read_text())
    assert cfg["run"]["dir"] == str(run_dir)
    assert cfg["data"]["corpus_paths"] == [str(project / "data" / "corpus.jsonl")]
    assert cfg["data"]["tokenizer"] == str(project / "tok" / "spm.model")
    assert cfg["data"]["user_pairs_path"] == str(project / "pairs.jsonl")
    assert cfg["data"]["cache_dir"] == str(project / "cache")
    assert cfg["checkpoint"]["init_from"] == str(project / "ckpt")
    assert yaml.safe_load((run_dir / "config.yaml").read_text()) == cfg


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            ["data.corpus=indexed", "data.corpus_paths=[data/shard, data/missing]",
             "data.tokenizer=tok/spm.model"],
            "data.corpus_paths[1]: {p}/data/missing.bin does not exist (a prefix written by "
            "sci-scale preprocess)",
        ),
        (["data.corpus=jsonl", "data.corpus_paths=[nope.jsonl]"],
         "data.corpus_paths[0]: {p}/nope.jsonl does not exist (a JSONL corpus file)"),
        (["data.corpus=jsonl", "data.corpus_paths=[data]"],
         "data.corpus_paths[0]: {p}/data is a directory, not a JSONL file"),
        (["data.tokenizer=tok/other.model"],
         "data.tokenizer: {p}/tok/other.model does not exist (a sentencepiece .model or a "
         "model directory)"),
        (["data.cogs_path=cogs"], "data.cogs_path: {p}/cogs does not exist (a pair file)"),
        (["checkpoint.init_from=tok"],
         "checkpoint.init_from: {p}/tok is not a sci-scale checkpoint (no run_state.pt)"),
    ],
    ids=["indexed-prefix", "jsonl", "jsonl-dir", "tokenizer", "cogs", "init-from"],
)  # fmt: skip
def test_a_missing_input_is_refused_at_submit_naming_it(
    project: Path, recording_sbatch, overrides: list[str], expected: str
) -> None:
    bin_dir, calls = recording_sbatch
    proc = submit(project, bin_dir, "run.dir=runs/r2", *overrides)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == ["sci-scale submit: error: " + expected.format(p=project)]
    assert not calls.exists() and not (project / "runs").exists()  # nothing queued or written


def test_resolution_keeps_absolute_paths_and_expands_the_home(tmp_path: Path) -> None:
    home = Path.home()
    cfg = load_config(None, ["run.dir=~/runs/x", f"data.cache_dir={tmp_path}/c/../cache"])
    resolved = resolve_paths(cfg, Path("/somewhere/else"))
    assert resolved.run.dir == str(home / "runs" / "x")
    assert resolved.data.cache_dir == str(tmp_path / "cache")
    assert resolved.checkpoint.init_from is None and resolved.data.tokenizer is None
    check_inputs(resolved)  # the default job reads nothing from disk
