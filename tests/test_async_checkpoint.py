"""Asynchronous checkpoints (``checkpoint.async_save``): the same files as a synchronous save,
``latest`` moved only once the writer is done, and a writer that dies leaves the previous
checkpoint as ``latest``, from which a resume continues exactly."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

import sci_scale.checkpoint.async_writer as writer_module
from sci_scale.checkpoint.index import latest_checkpoint
from sci_scale.checkpoint.manifest import find_damage
from sci_scale.checkpoint.safe_load import safe_torch_load
from sci_scale.cli.main import main
from sci_scale.train.metrics import read_metrics
from sci_scale.train.trainer import train

RUN = ("train.steps=4", "checkpoint.interval=2", "checkpoint.keep_last=5")


def weights(ckpt: Path, out: Path) -> dict[str, torch.Tensor]:
    dcp_to_torch_save(ckpt / "model", out)
    return {k: v for k, v in torch.load(out, weights_only=True).items() if torch.is_tensor(v)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, data_cache: Path) -> dict[str, Path]:
    from conftest import small_overrides

    from sci_scale.config import load_config

    root = tmp_path_factory.mktemp("async")
    out = {}
    for mode in ("sync", "async"):
        run_dir = root / mode
        overrides = [*small_overrides(run_dir, data_cache), *RUN]
        train(load_config(None, [*overrides, f"checkpoint.async_save={mode == 'async'}"]))
        out[mode] = run_dir
    return out


def test_an_async_checkpoint_holds_what_a_synchronous_one_does(runs, tmp_path) -> None:
    for step in (2, 4):
        name = f"step_{step:07d}"
        sync, asyn = (runs[m] / "checkpoints" / name for m in ("sync", "async"))
        assert find_damage(asyn) is None  # sealed with a whole manifest
        assert not list(asyn.glob(".manifest-rank_*"))  # the writers' parts merged
        a, b = weights(sync, tmp_path / f"s{step}.pt"), weights(asyn, tmp_path / f"a{step}.pt")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        rs, ra = (safe_torch_load(c / "rank_00000.pt") for c in (sync, asyn))
        for index, moments in rs["optimizer"]["state"].items():
            for key, value in moments.items():
                assert torch.equal(value, ra["optimizer"]["state"][index][key]), (index, key)
    assert latest_checkpoint(runs["async"] / "checkpoints").name == "step_0000004"
    assert [r["lm_loss"] for r in read_metrics(runs["sync"])] == [
        r["lm_loss"] for r in read_metrics(runs["async"])
    ]


def test_a_writer_that_dies_leaves_the_previous_checkpoint_and_a_resume_continues_exactly(
    runs, data_cache, tmp_path, monkeypatch, capsys
) -> None:
    from conftest import small_overrides

    real = writer_module.write_in_background

    def dying(write, args, kwargs, rank_state, tmp, rank):
        if tmp.name.endswith("step_0000004"):
            write(*args, **kwargs)  # the shards are written, the rest never is
            os._exit(9)  # as a kill -9 of the writer would end it
        real(write, args, kwargs, rank_state, tmp, rank)

    monkeypatch.setattr(writer_module, "write_in_background", dying)
    run_dir = tmp_path / "run"
    argv = ["train", *small_overrides(run_dir, data_cache), *RUN, "checkpoint.async_save=true"]
    capsys.readouterr()
    assert main(argv) == 2
    line = capsys.readouterr().err.strip().splitlines()
    assert len(line) == 1 and "the checkpoint of step 4 was not written" in line[0], line
    assert "exited with rank 0: status 9" in line[0]
    assert latest_checkpoint(run_dir / "checkpoints").name == "step_0000002"
    monkeypatch.setattr(writer_module, "write_in_background", real)
    # What the dead writer had reported must not leak into later saves of this process (a
    # model of another shape here, whose checkpoint must read back whole).
    other = tmp_path / "other"
    assert main(["train", *small_overrides(other, data_cache), "model.hidden_size=96",
                 "train.steps=1", "checkpoint.interval=1"]) == 0  # fmt: skip
    assert weights(other / "checkpoints" / "step_0000001", tmp_path / "o.pt")
    assert main([*argv, "--resume"]) == 0
    uninterrupted = read_metrics(runs["async"])
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4]
    for got, want in zip(read_metrics(run_dir), uninterrupted, strict=True):
        for key in ("lm_loss", "scl_loss", "grad_norm"):
            assert got[key] == want[key], (got["step"], key)
    final = run_dir / "checkpoints" / "step_0000004"
    assert find_damage(final) is None
    expected = weights(runs["async"] / "checkpoints" / "step_0000004", tmp_path / "a.pt")
    got = weights(final, tmp_path / "b.pt")
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
