"""Checkpoint integrity: every checkpoint carries a manifest of its files' sizes and hashes;
damage is found before loading, a resume falls back to the newest intact checkpoint, and a
damaged checkpoint loaded on its own is a one-line error."""

from __future__ import annotations

import json
import logging
import shutil
import textwrap
from pathlib import Path

import pytest
import torch
import xxhash
from conftest import small_overrides
from launchers import torchrun_script

from sci_scale.checkpoint import manifest
from sci_scale.checkpoint.index import CheckpointError, latest_checkpoint, resume_candidates
from sci_scale.checkpoint.manifest import Damage, find_damage, require_intact, write_manifest
from sci_scale.cli.main import main
from sci_scale.config import load_config
from sci_scale.train.checkpointing import RunCheckpoints
from sci_scale.train.metrics import read_metrics
from sci_scale.train.trainer import train

RUN = ("train.steps=4", "checkpoint.interval=2", "checkpoint.keep_last=2")
SHARD = "model/__0_0.distcp"


def zero_block(path: Path, size: int = 4096) -> None:
    """Overwrite ``size`` bytes in the middle of a file with zeros (its length unchanged)."""
    with open(path, "r+b") as handle:
        handle.seek(path.stat().st_size // 2)
        handle.write(b"\0" * size)


def truncate(path: Path) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size // 2)


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, data_cache: Path) -> Path:
    """A run of 4 steps with checkpoints at steps 2 and 4, trained once for this module."""
    run_dir = tmp_path_factory.mktemp("integrity") / "run"
    train(load_config(None, [*small_overrides(run_dir, data_cache), *RUN]))
    return run_dir


@pytest.fixture
def run_dir(trained: Path, tmp_path: Path) -> Path:
    """A copy of the trained run for one test to damage."""
    return Path(shutil.copytree(trained, tmp_path / "run"))


def ckpt(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:07d}"


# -- the manifest on small files ---------------------------------------------------------
@pytest.fixture
def small_ckpt(tmp_path: Path) -> Path:
    root = tmp_path / "ckpt"
    (root / "model").mkdir(parents=True)
    (root / "model" / ".metadata").write_bytes(b"m" * 100)
    (root / "model" / "metadata.json").write_text("{}")
    (root / "model" / "common.pt").write_bytes(b"c" * 10)
    (root / "model" / "__0_0.distcp").write_bytes(bytes(range(256)) * 64)
    (root / "deepspeed" / "zero").mkdir(parents=True)
    (root / "deepspeed" / "zero" / "optim_states.pt").write_bytes(b"o" * 3000)
    (root / "run_state.pt").write_bytes(b"state")
    return root


def test_manifest_lists_every_file_with_its_size_and_hash(small_ckpt: Path) -> None:
    entries = write_manifest(small_ckpt)
    body = json.loads((small_ckpt / "manifest.json").read_text())
    assert body["hash"] == "xxh3_128"
    paths = [f["path"] for f in body["files"]]
    assert paths == sorted(
        [
            *("model/.metadata", "model/metadata.json", "model/common.pt", "model/__0_0.distcp"),
            *("deepspeed/zero/optim_states.pt", "run_state.pt"),
        ]
    )
    for entry, listed in zip(entries, body["files"], strict=True):
        data = (small_ckpt / entry.path).read_bytes()
        assert listed == {"path": entry.path, "size": len(data), "xxh3_128": entry.digest}
        assert entry.digest == xxhash.xxh3_128(data).hexdigest()
    assert not list(small_ckpt.glob(".manifest.json.tmp"))
    assert find_damage(small_ckpt) is None
    write_manifest(small_ckpt)  # sealing again never lists the manifest itself
    assert "manifest.json" not in {e.path for e in manifest.read_manifest(small_ckpt)}


def test_hash_in_chunks_equals_the_hash_of_the_whole_file(tmp_path: Path) -> None:
    data = bytes(range(251)) * 41  # not a multiple of the chunk size
    path = tmp_path / "f"
    path.write_bytes(data)
    for chunk in (1, 7, 256, len(data), 1 << 20):
        assert manifest.hash_file(path, chunk) == (len(data), xxhash.xxh3_128(data).hexdigest())


def test_shares_split_files_by_bytes_and_cover_each_once() -> None:
    sizes = [100, 1, 1, 1, 50, 49, 2]
    split = manifest.shares(sizes, 3)
    assert sorted(i for share in split for i in share) == list(range(len(sizes)))
    loads = [sum(sizes[i] for i in share) for share in split]
    assert loads == [100, 52, 52]
    assert manifest.shares(sizes, 1) == [list(range(len(sizes)))]


@pytest.mark.parametrize(
    ("damage", "file", "reason"),
    [
        (lambda p: zero_block(p / "model/__0_0.distcp", 16), "model/__0_0.distcp", "differ"),
        (lambda p: truncate(p / "deepspeed/zero/optim_states.pt"), "deepspeed", "truncated"),
        (lambda p: (p / "model/.metadata").unlink(), "model/.metadata", "missing"),
        (lambda p: (p / "manifest.json").write_text("{not json"), "manifest.json", "unreadable"),
    ],
)
def test_each_kind_of_damage_names_the_file(small_ckpt: Path, damage, file, reason) -> None:
    write_manifest(small_ckpt)
    damage(small_ckpt)
    found = find_damage(small_ckpt)
    assert isinstance(found, Damage) and found.file.startswith(file) and reason in found.reason
    with pytest.raises(CheckpointError, match=reason) as err:
        require_intact(small_ckpt)
    assert str(small_ckpt / found.file) in str(err.value) and "\n" not in str(err.value)


def test_files_added_after_the_save_are_not_damage(small_ckpt: Path) -> None:
    write_manifest(small_ckpt)
    (small_ckpt / "hf_config.json").write_text("{}")
    assert find_damage(small_ckpt) is None


def test_without_manifest_a_warning_or_a_missing_run_state(
    small_ckpt: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        assert find_damage(small_ckpt) is None
    assert "no manifest.json" in caplog.text and "cannot be verified" in caplog.text
    (small_ckpt / "model" / "common.pt").unlink()
    assert find_damage(small_ckpt).file == "model/common.pt"
    (small_ckpt / "run_state.pt").unlink()
    assert find_damage(small_ckpt).file == "run_state.pt"
    assert "no such checkpoint directory" in str(find_damage(small_ckpt / "gone"))


def test_resume_candidates_put_latest_first_and_name_a_dangling_pointer(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        (root / f"step_{step:07d}").mkdir(parents=True)
    (root / ".tmp-step_0000004").mkdir()
    assert resume_candidates(root) == ([root / f"step_{s:07d}" for s in (3, 2, 1)], None)
    (root / "latest").write_text("step_0000002\n")
    assert [p.name[-1] for p in resume_candidates(root)[0]] == ["2", "3", "1"]
    (root / "latest").write_text("step_0000009\n")
    candidates, problem = resume_candidates(root)
    assert [p.name[-1] for p in candidates] == ["3", "2", "1"]
    assert "names 'step_0000009', which does not exist" in problem


MULTI_RANK = """
import json, sys
from pathlib import Path
import torch.distributed as dist
from sci_scale.checkpoint import manifest
from sci_scale.runtime import collective_check, collectives

collective_check.install()
dist.init_process_group("gloo")
rank, ckpt = dist.get_rank(), Path(sys.argv[0]).parent / "ckpt"
hashed = []
real = manifest.hash_file
def spy(path, *args, **kwargs):
    hashed.append(path.relative_to(ckpt).as_posix())
    return real(path, *args, **kwargs)
manifest.hash_file = spy
if rank == 0:
    (ckpt / "model").mkdir(parents=True)
    for i, size in enumerate([5000, 4000, 3000, 10, 20]):
        (ckpt / "model" / f"__{i}.distcp").write_bytes(bytes([i + 1]) * size)
    (ckpt / "run_state.pt").write_bytes(b"state")
collectives.barrier()
entries = manifest.write_manifest(ckpt)
saved, hashed[:] = list(hashed), []
intact = manifest.find_damage(ckpt) is None
checked = list(hashed)
collectives.barrier()
if rank == 0:
    with open(ckpt / "model" / "__3.distcp", "r+b") as handle:
        handle.write(b"\\0")
collectives.barrier()
mine = {"entries": len(entries), "saved": saved, "checked": checked, "intact": intact,
        "damage": str(manifest.find_damage(ckpt))}
gathered = collectives.all_gather_object(mine)
if rank == 0:
    print("RESULT" + json.dumps(gathered))
collectives.barrier()
dist.destroy_process_group()  # a group left to interpreter exit can abort a rank (SIGABRT)
"""


@pytest.mark.slow
def test_ranks_share_the_hashing_and_agree_on_the_damage(tmp_path: Path) -> None:
    script = tmp_path / "manifest_ranks.py"
    script.write_text(textwrap.dedent(MULTI_RANK))
    ranks = torchrun_script(script, nproc=2, timeout_s=120)
    every = sorted(["run_state.pt", *(f"model/__{i}.distcp" for i in range(5))])
    for key in ("saved", "checked"):
        assert not set(ranks[0][key]) & set(ranks[1][key])
        assert sorted(ranks[0][key] + ranks[1][key]) == every
    assert all(r["entries"] == 6 and r["intact"] for r in ranks)
    assert ranks[0]["damage"] == ranks[1]["damage"]
    assert ranks[0]["damage"].endswith("model/__3.distcp: contents differ from manifest.json "
                                       "(xxh3_128 mismatch)")  # fmt: skip


# -- real checkpoints --------------------------------------------------------------------
def test_zeroed_block_falls_back_to_the_previous_checkpoint_and_continues_exactly(
    run_dir: Path, make_config, caplog: pytest.LogCaptureFixture
) -> None:
    uninterrupted = {r["step"]: r for r in read_metrics(run_dir)}
    assert latest_checkpoint(run_dir / "checkpoints") == ckpt(run_dir, 4)
    assert (ckpt(run_dir, 4) / "manifest.json").exists()
    zero_block(ckpt(run_dir, 4) / SHARD)
    with caplog.at_level(logging.WARNING):
        resumed = train(make_config(*RUN, run_dir=run_dir), resume=True)
    assert f"{ckpt(run_dir, 4) / SHARD}: contents differ" in caplog.text
    assert f"resuming from {ckpt(run_dir, 2)}" in caplog.text
    assert [r["step"] for r in resumed.history] == [3, 4]
    for record in resumed.history:
        for key in ("lm_loss", "scl_loss", "grad_norm", "lr"):
            assert record[key] == uninterrupted[record["step"]][key], (record["step"], key)
    assert latest_checkpoint(run_dir / "checkpoints") == ckpt(run_dir, 4)
    assert find_damage(ckpt(run_dir, 4)) is None  # written again, whole


def test_latest_naming_a_missing_directory_falls_back(
    run_dir: Path, make_config, caplog: pytest.LogCaptureFixture
) -> None:
    root = run_dir / "checkpoints"
    (root / "latest").write_text("step_0000006\n")
    cfg = make_config(*RUN, run_dir=run_dir)
    tokenizer = run_dir / "tok"
    tokenizer.write_bytes(b"any tokenizer")
    with caplog.at_level(logging.WARNING):
        chosen = RunCheckpoints(cfg, run_dir, 1, tokenizer, resume=True).resume_from
    assert chosen == ckpt(run_dir, 4)
    assert "names 'step_0000006', which does not exist" in caplog.text
    (root / "latest").unlink()  # a crash between sealing the first checkpoint and the pointer
    assert RunCheckpoints(cfg, run_dir, 1, tokenizer, resume="auto").resume_from == ckpt(run_dir, 4)


def test_every_checkpoint_damaged_is_one_line_and_exit_2(
    run_dir: Path, data_cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    zero_block(ckpt(run_dir, 4) / SHARD)
    truncate(ckpt(run_dir, 2) / "rank_00000.pt")
    status = main(["train", *small_overrides(run_dir, data_cache), *RUN, "--resume"])
    assert status == 2
    line = one_line_error(capsys)
    assert line.startswith("sci-scale train: error: no intact checkpoint under")
    assert f"{ckpt(run_dir, 4) / SHARD}: contents differ" in line
    assert f"{ckpt(run_dir, 2) / 'rank_00000.pt'}: truncated" in line


@pytest.mark.parametrize("file", [SHARD, "model/.metadata"])
def test_truncated_shard_or_metadata_is_one_line_naming_it(
    run_dir: Path, file: str, capsys: pytest.CaptureFixture[str]
) -> None:
    truncate(ckpt(run_dir, 4) / file)
    assert main(["eval", str(ckpt(run_dir, 4)), "--task", "ppl"]) == 2
    line = one_line_error(capsys)
    assert line.startswith(f"sci-scale eval: error: damaged checkpoint: {ckpt(run_dir, 4) / file}")
    assert "truncated" in line


@pytest.mark.parametrize("manifest_too", [False, True])
def test_a_missing_common_pt_is_one_line_naming_it(
    run_dir: Path, manifest_too: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    """With its manifest the file is listed and missing; without one (an older checkpoint) it
    is one of the files every checkpoint has."""
    (ckpt(run_dir, 4) / "model" / "common.pt").unlink()
    if manifest_too:
        (ckpt(run_dir, 4) / "manifest.json").unlink()
    assert main(["eval", str(ckpt(run_dir, 4)), "--task", "ppl"]) == 2
    line = one_line_error(capsys)
    where = ckpt(run_dir, 4) / "model" / "common.pt"
    assert line.startswith(f"sci-scale eval: error: damaged checkpoint: {where}: missing")


def test_damaged_init_from_or_export_is_a_one_line_error(
    run_dir: Path, make_config, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    damaged = ckpt(run_dir, 2)
    zero_block(damaged / SHARD)
    cfg = make_config("train.steps=1", f"checkpoint.init_from={damaged}", run_dir=tmp_path / "new")
    with pytest.raises(CheckpointError) as err:
        train(cfg)
    assert str(err.value) == (
        f"damaged checkpoint: {damaged / SHARD}: contents differ from manifest.json "
        "(xxh3_128 mismatch)"
    )
    out = tmp_path / "hf"
    assert main(["convert", "sci-to-hf", "--ckpt", str(damaged), "--out", str(out)]) == 2
    assert str(damaged / SHARD) in one_line_error(capsys)
    assert not out.exists()


def test_checkpoint_without_manifest_warns_and_loads(
    run_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from sci_scale.checkpoint.load import load_whole_model, single_process

    old, new = ckpt(run_dir, 4), ckpt(run_dir, 2)
    (old / "manifest.json").unlink()
    with single_process():
        with caplog.at_level(logging.WARNING):
            unverified = load_whole_model(old).model.state_dict()
        assert f"{old} has no manifest.json" in caplog.text
        caplog.clear()
        verified = load_whole_model(new).model.state_dict()
        assert "no manifest.json" not in caplog.text
    changed = [k for k, v in unverified.items() if isinstance(v, torch.Tensor) and k in verified
               and v.dtype.is_floating_point and not torch.equal(v, verified[k])]  # fmt: skip
    assert changed  # the step-4 weights really were loaded, not the step-2 ones
