"""Conversion at real size: the streamed import and the sharded export, proved on what they
write and on the memory they take.

The acceptance run (slow) makes a random Llama-shaped model of ~2 GB, converts it HF ->
sci-scale -> HF as the CLI does, samples each conversion's resident memory, and requires it
under 1.5x the largest shard + 1 GB (the model itself would not fit that), every tensor equal,
and the sharded export loaded by transformers. The fast tests pin each piece on tiny models:
the shard plan and index, dtypes, tokenizer files, the model card, and the errors.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hf_models import build_hf_model, transformers_lm_loss
from launchers import REPO
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_bad_inputs import one_line_error

from sci_scale.cli.main import main
from sci_scale.convert import hf
from sci_scale.convert.weights import WeightMappingError

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stream")
    src = build_hf_model("llama", root / "hf")
    return {"hf": src, "ckpt": hf.hf_to_sci(src, root / "ckpt")}


def tensors_of(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("*.safetensors")):
        out.update(load_file(path))
    return out


def test_sharded_export_follows_max_shard_size_and_loads_in_transformers(
    llama: dict[str, Path], tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    limit = 100_000
    out = hf.sci_to_hf(llama["ckpt"], tmp_path / "out", dtype="keep", max_shard_size="100KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and not (out / "model.safetensors").exists()
    assert files == [
        f"model-{k:05d}-of-{len(files):05d}.safetensors" for k in range(1, len(files) + 1)
    ]
    assert sorted(p.name for p in out.glob("*.safetensors")) == files
    sizes = 0
    for name in files:
        with safe_open(out / name, "pt") as f:
            keys = list(f.keys())
            assert all(index["weight_map"][k] == name for k in keys)
            data = sum(f.get_tensor(k).numel() * 4 for k in keys)
        sizes += data
        assert data <= limit or len(keys) == 1, (name, data)  # one oversized tensor: its own file
    assert index["metadata"]["total_size"] == sizes
    original = load_file(llama["hf"] / "model.safetensors")
    exported = tensors_of(out)
    assert set(exported) == set(index["weight_map"]) == set(original)
    assert all(torch.equal(exported[k], v) for k, v in original.items())
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in original.items())


def test_default_export_is_one_bf16_file_with_a_model_card(
    llama: dict[str, Path], tmp_path: Path
) -> None:
    out = hf.sci_to_hf(llama["ckpt"], tmp_path / "out")
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    assert not (out / "model.safetensors.index.json").exists()
    exported, original = (
        load_file(out / "model.safetensors"),
        load_file(llama["hf"] / "model.safetensors"),
    )
    assert all(t.dtype == torch.bfloat16 for t in exported.values())
    assert all(torch.equal(exported[k], v.to(torch.bfloat16)) for k, v in original.items())
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    card = (out / "README.md").read_text()
    assert "LlamaForCausalLM" in card and "| training steps | 0 |" in card
    assert "imported" in card and "| SCI branch | off |" in card


def test_import_reads_transformers_shards_tensor_by_tensor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """transformers' own sharded layout, large tensors read a block of rows at a time (here
    blocks of 4 KB, so every matrix is read in several)."""
    from transformers import AutoModelForCausalLM

    from sci_scale.convert import hf_io

    monkeypatch.setattr(hf_io, "READ_BLOCK_BYTES", 4096)

    src = build_hf_model("qwen2", tmp_path / "one")
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(src).save_pretrained(sharded, max_shard_size="60KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (sharded / name).write_bytes((src / name).read_bytes())
    assert len(list(sharded.glob("model-*.safetensors"))) > 1
    ckpt = hf.hf_to_sci(sharded, tmp_path / "ckpt")
    diff = hf.verify(ckpt, src)
    assert diff is not None and diff <= TOLERANCE, diff


@pytest.mark.slow
def test_large_tensors_are_stored_in_pieces_that_load_at_any_layout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pieces of at most STORED_CHUNK_BYTES (here 8 KB): megatron loads them at TP=1, TP=2 and
    PP=2 with transformers' logits, and the export gives every tensor back."""
    from launchers import free_port
    from torch.distributed.checkpoint import FileSystemReader

    from sci_scale.checkpoint import streaming

    monkeypatch.setattr(streaming, "STORED_CHUNK_BYTES", 8192)
    src = build_hf_model("qwen3", tmp_path / "hf")
    ckpt = hf.hf_to_sci(src, tmp_path / "ckpt")
    stored = FileSystemReader(str(ckpt / "model")).read_metadata().state_dict_metadata
    embedding = stored["gpt.embedding.word_embeddings.weight"]
    assert len(embedding.chunks) == 256 * 64 * 4 // 8192  # rows of 8 KB
    assert len(stored["gpt.decoder.layers.mlp.linear_fc1.weight"].chunks) > 2 * 2
    diff = hf.verify(ckpt, src)
    assert diff is not None and diff <= TOLERANCE, diff
    for pp in ("1", "2"):
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
             f"--master_port={free_port()}", "-m", "sci_scale", "convert", "verify",
             "--ckpt", str(ckpt), "--hf", str(src), "--pp", pp],
            cwd=REPO, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert proc.returncode == 0 and "(within tolerance" in proc.stdout, proc.stderr[-2000:]
    exported = load_file(hf.sci_to_hf(ckpt, tmp_path / "out", dtype="keep") / "model.safetensors")
    original = load_file(src / "model.safetensors")
    assert all(torch.equal(exported[k], v) for k, v in original.items())


def test_import_writes_a_config_to_continue_pretraining_from(
    llama: dict[str, Path], tmp_path: Path
) -> None:
    from sci_scale.config import load_config, validate

    cfg = load_config(llama["ckpt"] / "continue.yaml", [f"run.dir={tmp_path}"])
    validate(cfg)
    imported = hf.import_config(llama["hf"])
    assert cfg.model == imported.model
    assert cfg.checkpoint.init_from == str(llama["ckpt"].resolve())
    assert cfg.data.tokenizer == str(llama["hf"].resolve())
    assert cfg.sci.mode == "joint"


def _rewrite(src: Path, change) -> None:
    tensors = load_file(src / "model.safetensors")
    change(tensors)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})


def test_an_unmapped_weight_is_an_error_naming_it(tmp_path: Path) -> None:
    src = build_hf_model("llama", tmp_path / "src")
    _rewrite(src, lambda t: t.update({"model.layers.0.self_attn.rel_bias.weight": torch.zeros(4)}))
    with pytest.raises(WeightMappingError, match=r"model\.layers\.0\.self_attn\.rel_bias\.weight"):
        hf.hf_to_sci(src, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_a_missing_weight_is_an_error_naming_it(tmp_path: Path) -> None:
    src = build_hf_model("qwen3", tmp_path / "src")
    _rewrite(src, lambda t: t.pop("model.layers.1.self_attn.k_norm.weight"))
    with pytest.raises(WeightMappingError, match=r"model\.layers\.1\.self_attn\.k_norm\.weight"):
        hf.hf_to_sci(src, tmp_path / "ckpt")


def test_special_tokens_and_chat_template_survive_the_export(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    src = build_hf_model("llama", tmp_path / "src")
    template = (
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant:{% endif %}"
    )
    config = json.loads((src / "tokenizer_config.json").read_text())
    config.update(additional_special_tokens=["<pad>"], model_max_length=256)
    (src / "tokenizer_config.json").write_text(json.dumps(config))
    (src / "chat_template.jinja").write_text(template)
    (src / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>"})
    )
    out = hf.sci_to_hf(hf.hf_to_sci(src, tmp_path / "ckpt"), tmp_path / "out")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "chat_template.jinja"):  # fmt: skip
        assert (out / name).read_bytes() == (src / name).read_bytes(), name
    messages = [{"role": "user", "content": "w1 w2"}]
    ours, theirs = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(src)
    assert ours.apply_chat_template(messages, add_generation_prompt=True) == (
        theirs.apply_chat_template(messages, add_generation_prompt=True)
    )
    assert ours.eos_token == "</s>" and ours.bos_token == "<s>"


def test_a_failed_export_leaves_the_previous_one_whole(
    llama: dict[str, Path], tmp_path: Path
) -> None:
    import shutil

    from sci_scale.checkpoint.index import CheckpointError

    out = hf.sci_to_hf(llama["ckpt"], tmp_path / "out", dtype="keep")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    damaged = tmp_path / "damaged"
    shutil.copytree(llama["ckpt"], damaged)
    shard = next((damaged / "model").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="distcp"):
        hf.sci_to_hf(damaged, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_the_backbones_generation_settings_survive_the_export(tmp_path: Path) -> None:
    src = build_hf_model("llama", tmp_path / "src")
    generation = {"bos_token_id": 1, "eos_token_id": [2, 3], "do_sample": True,
                  "temperature": 0.6, "top_p": 0.9}  # fmt: skip
    (src / "generation_config.json").write_text(json.dumps(generation))
    out = hf.sci_to_hf(hf.hf_to_sci(src, tmp_path / "ckpt"), tmp_path / "out")
    assert json.loads((out / "generation_config.json").read_text()) == generation


def test_export_options_are_checked_before_anything_is_read(
    llama: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    argv = ["export", "--ckpt", str(llama["ckpt"]), "--out", str(tmp_path / "o"),
            "--max-shard-size", "lots"]  # fmt: skip
    assert "--max-shard-size 'lots'" in one_line_error(capsys, argv, "export")
    assert not (tmp_path / "o").exists()
    assert main(["export", "--ckpt", str(llama["ckpt"]), "--out", str(tmp_path / "o"),
                 "--max-shard-size", "1MB"]) == 0  # fmt: skip
    assert (tmp_path / "o" / "model.safetensors").is_file()


def test_export_takes_a_run_directory_and_sizes_in_bytes(tmp_path: Path) -> None:
    """As a user types it: ``sci-scale export RUN_DIR --out DIR`` exports the latest checkpoint."""
    from sci_scale.checkpoint.index import LATEST

    src = build_hf_model("smollm2", tmp_path / "src")
    run = tmp_path / "run"
    ckpt = hf.hf_to_sci(src, run / "checkpoints" / "step_0000000")
    (run / "checkpoints" / LATEST).write_text(ckpt.name)
    assert main(["export", str(run), "--out", str(tmp_path / "out"), "--dtype", "keep",
                 "--max-shard-size", "50000"]) == 0  # fmt: skip
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    original = load_file(src / "model.safetensors")
    exported = tensors_of(tmp_path / "out")
    assert set(exported) == set(original)
    assert all(torch.equal(exported[k], v) for k, v in original.items())


def test_export_of_a_directory_that_is_no_checkpoint_names_it(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    message = one_line_error(capsys, ["export", str(tmp_path), "--out", str(tmp_path / "o")],
                             "export")  # fmt: skip
    assert str(tmp_path) in message and "not a checkpoint" in message


def test_import_reads_a_legacy_pytorch_bin(tmp_path: Path) -> None:
    src = build_hf_model("qwen3", tmp_path / "src")
    tensors = load_file(src / "model.safetensors")
    torch.save(tensors, src / "pytorch_model.bin")
    (src / "model.safetensors").unlink()
    ckpt = hf.hf_to_sci(src, tmp_path / "ckpt")
    exported = load_file(hf.sci_to_hf(ckpt, tmp_path / "out", dtype="keep") / "model.safetensors")
    assert set(exported) == set(tensors)
    assert all(torch.equal(exported[k], v) for k, v in tensors.items())


@pytest.mark.slow
def test_a_two_gigabyte_model_round_trips_in_bounded_memory(tmp_path: Path) -> None:
    """The acceptance run: ~2 GB of fp32 Llama, 500 MB shards in and out."""
    from transformers import AutoConfig

    proc = subprocess.run(
        [sys.executable, "tools/convert_memory.py", "--workdir", str(tmp_path / "work"),
         "--hidden", "2048", "--layers", "8", "--shard-size", "500MB"],
        cwd=REPO, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(proc.stdout)  # the figures, in the test log
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert figures["model_gb"] > 1.9
    assert figures["tensors_compared"] == 2 + 8 * 9 + 1 and figures["tensors_different"] == 0
    for step in ("import", "export"):
        # the sampler's maximum and the kernel's high-water mark (which no sampling misses)
        peak = max(figures[f"{step}_peak_rss_gb"], figures[f"{step}_reported_peak_gb"])
        assert peak < figures[f"{step}_bound_gb"], (step, figures)
        assert peak < figures["model_gb"] * 0.75  # far from holding the whole model
    out = tmp_path / "work" / "out"
    assert figures["export_files"] == len(list(out.glob("model-*-of-*.safetensors"))) >= 4
    assert all(p.stat().st_size <= 500_000_000 + 100_000 for p in out.glob("*.safetensors"))
    # transformers reads the export (config, index, every shard) into the model class.
    from transformers import AutoModelForCausalLM

    config = AutoConfig.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert type(model).__name__ == "LlamaForCausalLM" and config.num_hidden_layers == 8
    assert sum(p.numel() for p in model.parameters()) == figures["parameters"]
    with safe_open(out / f"model-00001-of-{figures['export_files']:05d}.safetensors", "pt") as f:
        name = next(iter(f.keys()))
        assert torch.equal(model.state_dict()[name], f.get_tensor(name))
    assert re.search(r"\d+ tensors compared, 0 differ", proc.stdout)


def _batches_and_reference_loss(cfg, hf_dir: Path) -> float:
    """The first step's batches as a one-process run draws them (data parallel size 1, as in
    TP2 x PP2 on four processes), scored by the original model in transformers."""
    from sci_scale.data.loader import MicroBatches
    from sci_scale.runtime.distributed import destroy_distributed
    from sci_scale.train.trainer import Trainer

    trainer = Trainer(cfg)
    trainer.setup()
    source = MicroBatches(trainer.data.train, 0, cfg.train.micro_batch_size, 0, 1)
    batches = [next(source) for _ in range(trainer.num_microbatches)]
    destroy_distributed()
    return transformers_lm_loss(hf_dir, batches)


@pytest.mark.slow
def test_continued_pretraining_at_tp2_pp2_from_hf_and_back(tmp_path: Path) -> None:
    """The documented sequence: import (recording TP2 x PP2), train on four processes with the
    backbone's tokenizer and SCI joint from the written continue.yaml, export. Step 1's LM
    loss is the backbone's loss in transformers on the same batch (the branch's gate starts at
    zero); the export of the TP2 x PP2 checkpoint gives sci-scale's logits in transformers."""
    from launchers import failure_summary, torchrun
    from test_convert import corpus_file

    from sci_scale.config import load_config

    src = build_hf_model("llama", tmp_path / "hf")
    ckpt = tmp_path / "imported"
    assert main(["convert", "hf-to-sci", "--hf", str(src), "--out", str(ckpt),
                 "--tp", "2", "--pp", "2"]) == 0  # fmt: skip
    corpus = corpus_file(tmp_path / "corpus.jsonl")
    overrides = [
        f"data.cache_dir={tmp_path / 'cache'}", "data.corpus=jsonl",
        f"data.corpus_paths=[{corpus}]", "model.seq_length=128", "sci.hidden_size=32",
        "sci.num_layers=1", "sci.embed_dim=16", "data.pair_rate=0.25",
        "data.arithmetic_per_template=8",
        "train.steps=2", "train.micro_batch_size=2", "train.global_batch_size=4",
        "train.warmup_steps=1", "train.log_interval=1", "train.eval_interval=100",
        "logging.wandb_mode=disabled",
    ]  # fmt: skip
    run = tmp_path / "run"
    proc = torchrun(4, [str(ckpt / "continue.yaml"), f"run.dir={run}", *overrides])
    assert proc.returncode == 0, failure_summary(proc)
    assert "layout: TP2 x PP2 x DP1" in proc.stdout, proc.stdout[-2000:]
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1
    cfg = load_config(ckpt / "continue.yaml", [f"run.dir={tmp_path / 'ref'}", *overrides])
    cfg = cfg.replace(parallel=cfg.parallel.replace(tensor=1, pipeline=1))
    assert first["lm_loss"] == pytest.approx(_batches_and_reference_loss(cfg, src), rel=1e-5)
    final = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    out = tmp_path / "export"
    assert main(["export", "--ckpt", str(final), "--out", str(out), "--dtype", "keep"]) == 0
    diff = hf.verify(final, out, trust_remote_code=True)
    assert diff is not None and diff <= TOLERANCE, diff
    # The backbone's ids and settings, found through the run's tokenizer (its HF directory).
    config = json.loads((out / "config.json").read_text())
    assert config["backbone"]["eos_token_id"] == 2 and config["backbone"]["bos_token_id"] == 1
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2 and generation["use_cache"] is False
    card = (out / "README.md").read_text()
    assert "| training steps | 2 |" in card and "joint, fused" in card
    assert f"`{ckpt.resolve()}`" in card  # started from the import
