"""Loading a checkpoint, an index cache or DeepSpeed's ZeRO state never runs code from it.

Each test plants a pickle that would create a marker file when unpickled (``posix.system``), in
the place a load path reads, re-seals the checkpoint's manifest (whoever can write a file can
rewrite the manifest too, so integrity checks are no defence here), and shows that the path
refuses it with one line and exit status 2, and that the marker was never created.
"""

from __future__ import annotations

import io
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy
import pytest
import torch
from conftest import small_overrides
from launchers import REPO, free_port

from sci_scale.checkpoint.manifest import write_manifest
from sci_scale.checkpoint.safe_load import (
    RestrictedUnpickler,
    UnsafeCheckpointError,
    restricted_pickle_load,
    safe_torch_load,
)
from sci_scale.checkpoint.trust import TRUST_ENV
from sci_scale.cli.main import main
from sci_scale.config import load_config
from sci_scale.train.trainer import train

RUN = ("train.steps=2", "checkpoint.interval=2")
METADATA = "model/.metadata"


class Payload:
    """Unpickles as ``os.system(command)``: what a hostile checkpoint would hold."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def payload(marker: Path) -> Payload:
    return Payload(f"touch {marker}")


@pytest.fixture(autouse=True)
def untrusted(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test starts without ``--trust-checkpoint`` (which a test may set)."""
    monkeypatch.delenv(TRUST_ENV, raising=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, data_cache: Path) -> Path:
    run_dir = tmp_path_factory.mktemp("safe") / "run"
    train(load_config(None, [*small_overrides(run_dir, data_cache), *RUN]))
    return run_dir


@pytest.fixture
def run_dir(trained: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(trained, tmp_path / "run"))


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "PAYLOAD_RAN"


def step_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / "step_0000002"


def plant_metadata(ckpt: Path, marker: Path) -> None:
    (ckpt / METADATA).write_bytes(pickle.dumps(payload(marker)))
    write_manifest(ckpt)


def refused(capsys: pytest.CaptureFixture[str], argv: list[str], marker: Path) -> str:
    """Run the CLI; it must exit 2 with one line, and the payload must not have run."""
    capsys.readouterr()
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert not marker.exists(), "the planted pickle ran"
    command, message = lines[0].split(": error: ", 1)
    assert command == f"sci-scale {argv[0]}"
    return message


def train_argv(run_dir: Path, data_cache: Path, *extra: str) -> list[str]:
    return ["train", *small_overrides(run_dir, data_cache), *RUN, *extra]


# -- the unpickler on its own ------------------------------------------------------------
def test_real_metadata_reads_the_same_through_the_restricted_unpickler(trained: Path) -> None:
    raw = (step_dir(trained) / METADATA).read_bytes()
    restricted = RestrictedUnpickler(io.BytesIO(raw), "metadata").load()
    assert restricted == pickle.loads(raw)
    assert restricted.state_dict_metadata  # the tensors of the model are all there


@pytest.mark.parametrize(
    "obj",
    [
        Payload("true"),
        eval,  # builtins.eval
        subprocess.Popen,
        shutil.rmtree,
        torch.load,  # a torch function, not a value
        torch.distributed.checkpoint.filesystem.FileSystemWriter,  # a DCP class, not a record
    ],
)
def test_anything_but_metadata_records_is_refused(obj) -> None:
    with pytest.raises(UnsafeCheckpointError, match="refusing to unpickle"):
        restricted_pickle_load(io.BytesIO(pickle.dumps(obj)), "x/.metadata")


def test_torch_files_refuse_code_and_name_the_file(tmp_path: Path, marker: Path) -> None:
    path = tmp_path / "run_state.pt"
    torch.save({"step": payload(marker)}, path)
    with pytest.raises(UnsafeCheckpointError) as info:
        safe_torch_load(path)
    assert str(info.value).startswith(f"{path}: refusing to unpickle it: ")
    assert "posix.system" in str(info.value) and not marker.exists()
    path.write_bytes(b"PK\x03\x04 not a zip file")
    with pytest.raises(Exception, match=f"{path}: not a readable torch checkpoint file"):
        safe_torch_load(path)


# -- every command that reads a checkpoint ------------------------------------------------
def test_resume_refuses_planted_metadata(run_dir, data_cache, marker, capsys) -> None:
    plant_metadata(step_dir(run_dir), marker)
    argv = train_argv(run_dir, data_cache, "train.steps=3", "--resume")
    message = refused(capsys, argv, marker)
    assert message.startswith(f"{step_dir(run_dir) / METADATA}: refusing to unpickle posix.system")


def test_auto_resume_refuses_planted_metadata(run_dir, data_cache, marker, capsys) -> None:
    plant_metadata(step_dir(run_dir), marker)
    argv = train_argv(run_dir, data_cache, "train.steps=3", "--auto-resume")
    assert "refusing to unpickle posix.system" in refused(capsys, argv, marker)


def test_init_from_refuses_planted_metadata(run_dir, data_cache, marker, capsys, tmp_path) -> None:
    plant_metadata(step_dir(run_dir), marker)
    argv = train_argv(tmp_path / "fresh", data_cache, f"checkpoint.init_from={step_dir(run_dir)}")
    assert "refusing to unpickle posix.system" in refused(capsys, argv, marker)


def test_eval_refuses_planted_metadata(run_dir, marker, capsys) -> None:
    plant_metadata(step_dir(run_dir), marker)
    argv = ["eval", str(step_dir(run_dir)), "--task", "ppl"]
    assert "refusing to unpickle posix.system" in refused(capsys, argv, marker)


def test_convert_refuses_planted_metadata_unless_trusted(run_dir, marker, capsys, tmp_path) -> None:
    plant_metadata(step_dir(run_dir), marker)
    argv = ["convert", "sci-to-hf", "--ckpt", str(step_dir(run_dir)), "--out", str(tmp_path / "hf")]
    assert "refusing to unpickle posix.system" in refused(capsys, argv, marker)
    # The opt-out is real: with --trust-checkpoint the file is unpickled as it is.
    with pytest.raises(BaseException):  # noqa: B017 - the payload returns no metadata
        main([*argv, "--trust-checkpoint"])
    assert marker.exists()
    assert TRUST_ENV not in os.environ  # for that command only


def test_convert_with_trust_loads_a_clean_checkpoint(trained, tmp_path) -> None:
    out = tmp_path / "hf"
    argv = ["convert", "sci-to-hf", "--ckpt", str(step_dir(trained)), "--out", str(out)]
    assert main([*argv, "--trust-checkpoint"]) == 0
    assert (out / "config.json").is_file()


def test_experiment_evaluation_refuses_planted_metadata(run_dir, marker, tmp_path) -> None:
    from sci_scale.experiment.ablation import Ablation

    plant_metadata(step_dir(run_dir), marker)
    cfg = load_config(None, small_overrides(tmp_path / "study", tmp_path / "cache"))
    with pytest.raises(UnsafeCheckpointError, match=r"refusing to unpickle posix\.system"):
        Ablation(cfg, tmp_path / "study").evaluate(step_dir(run_dir))
    assert not marker.exists()


def test_a_planted_run_state_is_refused(run_dir, data_cache, marker, capsys) -> None:
    ckpt = step_dir(run_dir)
    torch.save({"format_version": 1, "step": payload(marker)}, ckpt / "run_state.pt")
    write_manifest(ckpt)
    argv = train_argv(run_dir, data_cache, "train.steps=3", "--resume")
    message = refused(capsys, argv, marker)
    assert message.startswith(f"{ckpt / 'run_state.pt'}: refusing to unpickle it: ")


# -- megatron's index cache -----------------------------------------------------------------
def test_a_planted_index_cache_file_is_refused(
    trained, data_cache, marker, capsys, tmp_path
) -> None:
    cache = Path(shutil.copytree(data_cache, tmp_path / "cache"))
    cached = sorted((cache / "index").glob("*.npy"))
    assert cached, "the run cached megatron's indices"
    hostile = numpy.empty(1, dtype=object)
    hostile[0] = payload(marker)
    with open(cached[0], "wb") as handle:  # the same name megatron looks up
        numpy.save(handle, hostile, allow_pickle=True)
    argv = ["train", *small_overrides(tmp_path / "fresh", cache), *RUN]
    message = refused(capsys, argv, marker)
    assert message.startswith(f"{cached[0]}: an index cache file holding a pickle")


# -- DeepSpeed's ZeRO state -------------------------------------------------------------------
@pytest.mark.slow
def test_zero_resume_refuses_a_planted_optimizer_state(tmp_path, data_cache, marker) -> None:
    """A ZeRO-1 run (one process under torchrun), a hostile optimizer state, a resume."""
    run_dir = tmp_path / "zero"
    overrides = [*small_overrides(run_dir, data_cache), *RUN, "parallel.zero_stage=1"]

    def cli(*extra: str) -> subprocess.CompletedProcess[str]:
        port = f"--master_port={free_port()}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", port,
               "-m", "sci_scale", "train", *overrides, *extra]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        env.pop(TRUST_ENV, None)
        return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=600)

    first = cli()
    assert first.returncode == 0, first.stderr[-3000:]
    ckpt = step_dir(run_dir)
    states = sorted((ckpt / "deepspeed").rglob("*optim_states.pt"))
    assert states
    state = safe_torch_load(states[0])  # DeepSpeed's own state loads through the allow-list
    state["hostile"] = payload(marker)
    torch.save(state, states[0])
    write_manifest(ckpt)
    resumed = cli("train.steps=3", "--resume")
    assert resumed.returncode != 0
    assert f"{states[0]}: refusing to unpickle it: " in resumed.stderr
    assert "posix.system" in resumed.stderr
    assert not marker.exists()
