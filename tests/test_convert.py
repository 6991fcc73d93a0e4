"""Hugging Face conversion, proved against ``transformers`` itself.

Every family gets a small random model built by transformers (``hf_models``); its import must
give transformers' logits at TP=1 and TP=2, its export must load in transformers with the same
logits, and HF -> sci-scale -> HF must give back every tensor bit for bit.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import small_overrides
from hf_models import ARCHS, VOCAB, build_hf_model, transformers_lm_loss, write_tokenizer
from launchers import REPO, failure_summary
from safetensors.torch import load_file

from sci_scale.checkpoint import load
from sci_scale.config import ConfigError, load_config, validate
from sci_scale.convert import hf
from sci_scale.convert.hf_config import UnsupportedModelError
from sci_scale.runtime.distributed import destroy_distributed
from sci_scale.train.trainer import Trainer

TOLERANCE = 1e-4  # fp32, max |logits difference|


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    """Each family: its HF directory and its imported sci-scale checkpoint."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for name in ARCHS:
        hf_dir = build_hf_model(name, root / name)
        out[name] = {"hf": hf_dir, "ckpt": hf.hf_to_sci(hf_dir, root / f"{name}-ckpt")}
    return out


@pytest.mark.parametrize("name", list(ARCHS))
def test_import_matches_transformers(models: dict, name: str) -> None:
    diff = hf.verify(models[name]["ckpt"], models[name]["hf"])
    assert diff is not None and diff <= TOLERANCE, diff


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
@pytest.mark.parametrize("name", list(ARCHS))
@pytest.mark.slow
def test_import_matches_transformers_at_tp2_and_pp2(models: dict, name: str, layout: str) -> None:
    """The same checkpoint, resharded by megatron at load to two tensor or pipeline ranks."""
    from launchers import free_port

    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
        f"--master_port={free_port()}", "-m", "sci_scale", "convert", "verify",
        "--ckpt", str(models[name]["ckpt"]), "--hf", str(models[name]["hf"]),
        "--tolerance", str(TOLERANCE), "--pp", "2" if layout == "pp2" else "1",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, failure_summary(proc)
    expected = "TP1 x PP2" if layout == "pp2" else "TP2 x PP1"
    assert f"logits at {expected}" in proc.stdout
    match = re.search(r"max \|logits difference\| = (\S+) \(within", proc.stdout)
    assert match, proc.stdout
    assert float(match.group(1)) <= TOLERANCE


@pytest.mark.parametrize("name", list(ARCHS))
def test_export_round_trip_is_exact_and_loads_in_transformers(
    models: dict, name: str, tmp_path: Path
) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    src = models[name]["hf"]
    out = hf.sci_to_hf(models[name]["ckpt"], tmp_path / "export", dtype="keep")
    original, exported = load_file(src / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(exported) == set(original)
    for key, tensor in original.items():
        assert torch.equal(exported[key], tensor), key
    # Same class and configuration as the original, so transformers builds the same model.
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == json.loads((src / "config.json").read_text())["architectures"][0]
    exported_config, source_config = (
        {k: v for k, v in AutoConfig.from_pretrained(d).to_dict().items() if k != "_name_or_path"}
        for d in (out, src)
    )
    assert exported_config == source_config
    diff = hf.verify(models[name]["ckpt"], out)
    assert diff is not None and diff <= TOLERANCE
    for name_ in ("generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name_).is_file(), name_


def test_bf16_export_keeps_bf16_weights_exactly(tmp_path: Path) -> None:
    src = build_hf_model("llama", tmp_path / "src")
    model = load_file(src / "model.safetensors")
    bf16 = {k: v.to(torch.bfloat16) for k, v in model.items()}
    from safetensors.torch import save_file

    save_file(bf16, src / "model.safetensors", metadata={"format": "pt"})
    ckpt = hf.hf_to_sci(src, tmp_path / "ckpt")  # fp32 inside: bf16 -> fp32 is exact
    out = hf.sci_to_hf(ckpt, tmp_path / "out", dtype="bf16")
    exported = load_file(out / "model.safetensors")
    assert all(
        exported[k].dtype == torch.bfloat16 and torch.equal(exported[k], v) for k, v in bf16.items()
    )
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def corpus_file(path: Path, docs: int = 200) -> Path:
    gen = torch.Generator().manual_seed(0)
    with path.open("w") as handle:
        for _ in range(docs):
            words = torch.randint(
                4, 200, (int(torch.randint(20, 120, (1,), generator=gen)),), generator=gen
            )
            handle.write(json.dumps({"text": " ".join(f"w{int(w) - 4}" for w in words)}) + "\n")
    return path


def continued_config(models: dict, name: str, tmp_path: Path, *overrides: str):
    """Continued pretraining of an imported backbone: its shape, its tokenizer, SCI joint."""
    imported = load.checkpoint_config(models[name]["ckpt"])[0]
    corpus = corpus_file(tmp_path / "corpus.jsonl")
    cfg = load_config(
        None,
        [
            *small_overrides(tmp_path / "run", tmp_path / "cache"),
            f"checkpoint.init_from={models[name]['ckpt']}",
            f"data.tokenizer={models[name]['hf']}",
            "data.corpus=jsonl",
            f"data.corpus_paths=[{corpus}]",
            "sci.mode=joint",
            "sci.fuse_layer=1",
            "train.micro_batch_size=2",
            "train.global_batch_size=4",
            *overrides,
        ],
    )
    cfg.model = imported.model.replace(seq_length=64)
    validate(cfg)
    return cfg


@pytest.mark.parametrize("name", ["llama", "qwen2", "smollm2"])
def test_first_step_loss_with_sci_attached_equals_transformers(
    models: dict, name: str, tmp_path: Path
) -> None:
    """Gate at zero: the backbone computes exactly what it did in transformers."""
    from sci_scale.data.loader import MicroBatches

    cfg = continued_config(models, name, tmp_path, "train.steps=1")
    trainer = Trainer(cfg)
    trainer.setup()
    source = MicroBatches(trainer.data.train, 0, cfg.train.micro_batch_size, 0, 1)
    batches = [next(source) for _ in range(trainer.num_microbatches)]
    assert any(int(b["template_ids"].ge(0).sum()) for b in batches if "template_ids" in b)
    record = trainer.train_step()
    destroy_distributed()
    expected = transformers_lm_loss(models[name]["hf"], batches)
    assert record["lm_loss"] == pytest.approx(expected, rel=1e-5, abs=0)
    assert record["scl_loss"] is not None  # the SCI branch took part


def test_heldout_perplexity_of_an_imported_backbone_equals_transformers(
    models: dict, tmp_path: Path
) -> None:
    """`sci-scale eval --task ppl --corpus FILE` on an imported model scores the blocks exactly
    as transformers' original model does."""
    from transformers import AutoModelForCausalLM

    from sci_scale.cli.main import main
    from sci_scale.data.pipeline import heldout_corpus
    from sci_scale.eval.suite import eval_cache_dir

    ckpt, corpus, out = models["llama"]["ckpt"], corpus_file(tmp_path / "c.jsonl"), tmp_path / "p"
    argv = ["eval", str(ckpt), "--task", "ppl", "--corpus", str(corpus), "--ppl-blocks", "3",
            "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    figures = json.loads(out.read_text())
    cfg, state = load.checkpoint_config(ckpt)
    cfg.data = cfg.data.replace(corpus="jsonl", corpus_paths=[str(corpus)], split="0,0,1")
    with load.single_process():
        tok = load.checkpoint_tokenizer(cfg, state)
        blocks = heldout_corpus(cfg, eval_cache_dir(cfg, ckpt), tok)
        samples = [blocks[i] for i in range(3)]
    reference = AutoModelForCausalLM.from_pretrained(models["llama"]["hf"], dtype=torch.float32)
    tokens = torch.stack([torch.as_tensor(s["tokens"]) for s in samples])
    labels = torch.stack([torch.as_tensor(s["labels"]) for s in samples])
    mask = torch.stack([torch.as_tensor(s["loss_mask"]) for s in samples]).flatten().double()
    with torch.no_grad():
        logits = reference(tokens).logits.double()
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
    assert figures["heldout_nll"] == pytest.approx(float((ce * mask).sum() / mask.sum()), rel=1e-5)


def changed(before: dict, after: dict) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


def test_phases_freeze_what_they_say(models: dict, tmp_path: Path) -> None:
    """Steps 1-2: backbone frozen; 3-4: last two layers unfrozen; 5: everything trains."""
    cfg = continued_config(
        models,
        "llama",
        tmp_path,
        "train.steps=5",
        "phases.backbone_frozen_until=2",
        "phases.unfreeze_last_n=1",
        "phases.partial_until=4",
        "train.warmup_steps=0",
    )
    trainer = Trainer(cfg)
    trainer.setup()

    def snapshot() -> dict:
        return {k: v.detach().clone() for k, v in trainer.model.named_parameters()}

    history = []
    for _ in range(5):
        before = snapshot()
        trainer.train_step()
        history.append(changed(before, snapshot()))
    destroy_distributed()
    sci = {k for k in history[0] if not k.startswith("gpt.")}
    assert sci, "the SCI branch trains from the first step"
    last_layer = "gpt.decoder.layers.1."  # 2-layer model, unfreeze_last_n=1
    for step in (0, 1):
        assert not any(k.startswith("gpt.") for k in history[step]), history[step]
    for step in (2, 3):
        backbone = {k for k in history[step] if k.startswith("gpt.")}
        layer_params = {k for k, _ in trainer.model.named_parameters() if k.startswith(last_layer)}
        assert backbone == layer_params, backbone ^ layer_params
    all_backbone = {k for k, _ in trainer.model.named_parameters() if k.startswith("gpt.")}
    assert {k for k in history[4] if k.startswith("gpt.")} == all_backbone


def test_unfreeze_last_two_layers_changes_exactly_those(models: dict, tmp_path: Path) -> None:
    cfg = continued_config(
        models,
        "qwen2",
        tmp_path,
        "train.steps=2",
        "phases.unfreeze_last_n=2",
        "phases.partial_until=2",
        "train.warmup_steps=0",
    )
    trainer = Trainer(cfg)
    trainer.setup()
    before = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    trainer.train_step()
    trainer.train_step()
    after = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    destroy_distributed()
    moved = changed(before, after)
    layers = {k for k in before if k.startswith(("gpt.decoder.layers.0.", "gpt.decoder.layers.1."))}
    assert {k for k in moved if k.startswith("gpt.")} == layers
    assert "gpt.embedding.word_embeddings.weight" not in moved
    assert any(not k.startswith("gpt.") for k in moved)  # SCI trained too


def test_directory_without_weights_is_a_clear_error(tmp_path: Path) -> None:
    src = build_hf_model("llama", tmp_path / "src")
    (src / "model.safetensors").unlink()
    with pytest.raises(UnsupportedModelError, match=r"has no weights: expected model\.safetensors"):
        hf.hf_to_sci(src, tmp_path / "ckpt")


def test_unsupported_architecture_is_a_clear_error(tmp_path: Path) -> None:
    src = build_hf_model("llama", tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    config["architectures"] = ["GPTNeoXForCausalLM"]
    (src / "config.json").write_text(json.dumps(config))
    # the message names the class and the supported ones (Qwen3 among them)
    with pytest.raises(
        UnsupportedModelError, match=r"GPTNeoXForCausalLM is not supported.*Qwen3ForCausalLM"
    ):
        hf.hf_to_sci(src, tmp_path / "ckpt")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("hidden_act", "gelu", "hidden_act='gelu' is not supported"),
        ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}, "rope type='yarn'"),
        ("attention_bias", True, "attention_bias=True is not supported"),
    ],
)
def test_unsupported_config_field_is_a_clear_error(
    tmp_path: Path, field: str, value: object, message: str
) -> None:
    src = build_hf_model("llama", tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    config.pop("rope_parameters", None)
    config[field] = value
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match=re.escape(message)):
        hf.hf_to_sci(src, tmp_path / "ckpt")


def test_tokenizer_larger_than_the_vocabulary_is_a_clear_error(tmp_path: Path) -> None:
    src = build_hf_model("llama", tmp_path / "src")
    write_tokenizer(src, words=VOCAB + 10)
    with pytest.raises(ConfigError, match=f"the tokenizer has {VOCAB + 10} tokens but"):
        hf.hf_to_sci(src, tmp_path / "ckpt")


def test_import_never_runs_code_from_the_directory(tmp_path: Path) -> None:
    """A model directory asking for remote code is read as data: its .py is never imported."""
    src = build_hf_model("llama", tmp_path / "src")
    (src / "modeling_evil.py").write_text("raise SystemExit('remote code ran')\n")
    config = json.loads((src / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.Evil"}
    (src / "config.json").write_text(json.dumps(config))
    ckpt = hf.hf_to_sci(src, tmp_path / "ckpt")
    assert (ckpt / "run_state.pt").is_file()


@pytest.mark.slow
def test_cli_round_trip(tmp_path: Path) -> None:
    src = build_hf_model("smollm2", tmp_path / "src")

    def run(*args: str) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [sys.executable, "-m", "sci_scale", "convert", *args],
            cwd=REPO, capture_output=True, text=True,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    run("hf-to-sci", "--hf", str(src), "--out", str(tmp_path / "ckpt"), "--tp", "2")
    run("sci-to-hf", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out"),
        "--dtype", "keep")  # fmt: skip
    a, b = load_file(src / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    state = load.checkpoint_config(tmp_path / "ckpt")[0]
    assert state.parallel.tensor == 2  # the recorded layout to train with
    shutil.rmtree(tmp_path / "out")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, data_cache: Path) -> dict[str, Path]:
    """sci-scale models trained a few steps: SCI fused (gate moved off zero), and aux-only."""
    from sci_scale.train.trainer import train

    root = tmp_path_factory.mktemp("trained")
    out = {}
    for name, extra in (("fused", "sci.fuse=true"), ("aux_only", "sci.fuse=false")):
        cfg = load_config(None, [*small_overrides(root / name, data_cache), "train.steps=6", extra])
        out[name] = train(cfg).checkpoint
    return out


def test_fused_sci_export_loads_with_remote_code_and_matches(
    trained: dict[str, Path], tmp_path: Path
) -> None:
    out = hf.sci_to_hf(trained["fused"], tmp_path / "fused", dtype="keep")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["SciScaleForCausalLM"]
    assert (out / "modeling_sci_scale.py").is_file()
    gate = load_file(out / "model.safetensors")["sci.gate"]
    assert float(gate.abs().max()) > 0  # the branch changes the logits
    diff = hf.verify(trained["fused"], out, trust_remote_code=True)
    assert diff is not None and diff <= TOLERANCE, diff
    # Without the flag transformers refuses to run the directory's code.
    with pytest.raises(ValueError, match="trust_remote_code"):
        hf.hf_logits(out, torch.zeros(1, 4, dtype=torch.long))


def test_aux_only_sci_export_is_a_plain_model(trained: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    out = hf.sci_to_hf(trained["aux_only"], tmp_path / "plain", dtype="keep")
    assert not (out / "modeling_sci_scale.py").exists()
    assert type(AutoModelForCausalLM.from_pretrained(out)).__name__ == "LlamaForCausalLM"
    diff = hf.verify(trained["aux_only"], out)
    assert diff is not None and diff <= TOLERANCE, diff
    # The sentencepiece tokenizer sci-scale trained loads in transformers and encodes alike.
    from transformers import AutoTokenizer

    from sci_scale.data.tokenizer import SentencePieceTokenizer

    ours = SentencePieceTokenizer(out / "tokenizer.model")
    theirs = AutoTokenizer.from_pretrained(out)
    text = "walk twice and jump left\nIN: 3 + 4 OUT: 7"
    assert theirs(text, add_special_tokens=False).input_ids == ours.tokenize(text)
    assert (theirs.eos_token_id, theirs.pad_token_id) == (ours.eos, ours.pad)


def test_init_from_a_checkpoint_of_another_shape_names_the_difference(
    models: dict, tmp_path: Path
) -> None:
    from sci_scale.checkpoint.index import CheckpointError

    cfg = continued_config(models, "llama", tmp_path, "train.steps=1")
    cfg.model = cfg.model.replace(ffn_hidden_size=192)
    with pytest.raises(CheckpointError, match=r"model\.ffn_hidden_size: 160 there, 192 here"):
        Trainer(cfg).setup()
    destroy_distributed()


# The published configurations of the backbones the recipes in configs/continue/ are for.
PUBLISHED = {
    "smollm2-135m.yaml": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
        "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
        "num_key_value_heads": 3, "rms_norm_eps": 1e-5, "rope_theta": 100000,
        "tie_word_embeddings": True, "vocab_size": 49152, "max_position_embeddings": 8192,
        "hidden_act": "silu",
    },
    "llama3-8b.yaml": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "rope_scaling": {
            "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192, "rope_type": "llama3",
        },
        "tie_word_embeddings": False, "vocab_size": 128256, "max_position_embeddings": 131072,
        "hidden_act": "silu",
    },
}  # fmt: skip


@pytest.mark.parametrize("recipe", list(PUBLISHED))
def test_continued_pretraining_recipes_have_their_backbones_shape(recipe: str) -> None:
    from sci_scale.convert.hf_config import model_section_from_hf

    cfg = load_config(REPO / "configs" / "continue" / recipe)
    imported = model_section_from_hf(PUBLISHED[recipe])
    for key, value in imported.items():
        if key in ("seq_length", "hidden_dropout", "attention_dropout"):
            continue  # training choices, not the backbone's
        assert getattr(cfg.model, key) == value, (recipe, key)
    assert cfg.phases.backbone_frozen_until > 0 and cfg.phases.partial_until > 0


def test_a_requeueable_job_starts_from_the_imported_backbone(models: dict, tmp_path: Path) -> None:
    """``--auto-resume`` (what Slurm jobs run) with no checkpoint yet still loads init_from."""
    cfg = continued_config(models, "llama", tmp_path, "train.steps=1")
    trainer = Trainer(cfg, resume="auto")
    trainer.setup()
    embedding = trainer.model.state_dict()["gpt.embedding.word_embeddings.weight"]
    destroy_distributed()
    original = load_file(models["llama"]["hf"] / "model.safetensors")["model.embed_tokens.weight"]
    assert torch.equal(embedding, original)
