"""``sci-scale export``: a sci-scale checkpoint as a Hugging Face model directory, at any size.

The checkpoint is read one layer at a time (megatron reads just that layer's bytes, whatever
TP/PP layout wrote it) and each tensor goes straight into its planned safetensors shard
(``safetensors_out``), so memory holds one layer, not the model. Written beside the weights:
``config.json`` (the imported original's, shape fields rewritten; or a fresh Llama/Qwen one),
``generation_config.json``, the tokenizer files (special tokens and chat template as the
backbone had them), and ``README.md``, a model card naming the training run.

A model whose SCI branch is fused into the backbone changes the logits through the branch, so
it is exported with the model class that runs it (``remote/modeling_sci_scale.py``, loaded with
``trust_remote_code=True``); any other model is a plain Llama/Qwen that needs no code.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from sci_scale.checkpoint.index import RUN_STATE, CheckpointError, latest_checkpoint
from sci_scale.checkpoint.load import checkpoint_config, model_skeleton, single_process, vocab_rows
from sci_scale.checkpoint.load import tokenizer_source as checkpoint_tokenizer_source
from sci_scale.checkpoint.state import RunState
from sci_scale.checkpoint.streaming import Progress, load_group, weight_names
from sci_scale.config import Config
from sci_scale.convert.hf_config import (
    ARCHITECTURES,
    HF_CONFIG_FILE,
    hf_config_from_model,
    read_json,
)
from sci_scale.convert.model_card import model_card
from sci_scale.convert.safetensors_out import (
    ExportOptionError,
    ShardedSafetensorsWriter,
    parse_shard_size,
)
from sci_scale.convert.weights import (
    Recipe,
    check_model_names,
    hf_tensors,
    model_recipes,
    sci_branch_recipes,
)
from sci_scale.data.hf_tokenizer import TOKENIZER_FILES
from sci_scale.data.tokenizer import load_tokenizer
from sci_scale.model.shapes import padded_vocab_size

log = logging.getLogger(__name__)

# The backbone's config.json and generation_config.json, kept beside an imported checkpoint.
ORIGINAL_HF_CONFIG = "hf_config.json"
ORIGINAL_GENERATION_CONFIG = "hf_generation_config.json"
GENERATION_CONFIG = "generation_config.json"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
EXPORT_DTYPES = (*DTYPES, "keep")
DEFAULT_MAX_SHARD_SIZE = "5GB"  # transformers' default
# The transformers model class of exports whose SCI branch is fused (copied into the export).
REMOTE_MODEL_FILE = Path(__file__).resolve().parent / "remote" / "modeling_sci_scale.py"
# Tokenizer files beyond the vocabulary: the chat template lives in one of these.
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json", "added_tokens.json")
_LAYER = re.compile(r"^(.*\.layers\.\d+)\.")


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]


def _groups(names: list[str]) -> Iterator[list[str]]:
    """Consecutive parameters of one layer together; the rest (embedding, final norm, output
    layer, the branch's projections) in runs between layers."""
    group: list[str] = []
    key: str | None = None
    for name in names:
        match = _LAYER.match(name)
        this = match.group(1) if match else None
        if group and this != key:
            yield group
            group = []
        group.append(name)
        key = this
    if group:
        yield group


class _Exporter:
    """What the export writes, from the checkpoint's config: the recipes of the tensors to
    export, and their HF names."""

    def __init__(self, cfg: Config, rows: int) -> None:
        self.cfg, self.rows = cfg, rows
        padded = padded_vocab_size(rows, cfg.model.make_vocab_size_divisible_by, 1)
        self.fused = cfg.sci.mode != "off" and cfg.sci.fuse
        self.recipes: dict[str, Recipe] = model_recipes(cfg.model, rows, padded)
        if self.fused:
            self.recipes.update(sci_branch_recipes(cfg.sci))

    def hf(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The HF tensors of some megatron tensors, named as the export's model class names
        them (in the checkpoint's dtype: the writer casts them)."""
        out = hf_tensors(self.recipes, tensors)
        if self.fused:  # the backbone nested under ``backbone.``; the branch as it is
            named: dict[str, torch.Tensor] = {}
            for name, tensor in out.items():
                if name.startswith("sci."):
                    named[name] = tensor
                    continue
                named[f"backbone.{name}"] = tensor
                if name == "model.embed_tokens.weight" and self.cfg.model.tie_embeddings:
                    named["backbone.lm_head.weight"] = tensor  # the wrapper does not tie
            out = named
        return out


def export_source(path: Path) -> Path:
    """The checkpoint to export: ``path`` itself, or the latest checkpoint of a run directory
    (``RUN_DIR`` or ``RUN_DIR/checkpoints``)."""
    if (path / RUN_STATE).is_file():
        return path
    for root in (path / "checkpoints", path):
        latest = latest_checkpoint(root)
        if latest is not None:
            log.info("exporting %s, the latest checkpoint of %s", latest.name, path)
            return latest
    raise CheckpointError(
        f"{path} is not a checkpoint (no {RUN_STATE}) nor a run directory with one "
        "(no checkpoints/latest)"
    )


def sci_to_hf(
    ckpt: str | Path,
    out: str | Path,
    dtype: str = "bf16",
    max_shard_size: str = DEFAULT_MAX_SHARD_SIZE,
) -> Path:
    """Export a sci-scale checkpoint (any TP/PP layout) as a Hugging Face model directory.

    ``dtype``: bf16 (default), fp16, fp32, or ``keep`` (the checkpoint's own dtype)."""
    ckpt, out = Path(ckpt), Path(out)
    if dtype not in EXPORT_DTYPES:
        raise ExportOptionError(f"--dtype {dtype!r}: choose one of {', '.join(EXPORT_DTYPES)}")
    max_bytes = parse_shard_size(max_shard_size)
    t0 = time.perf_counter()
    cfg, state = checkpoint_config(ckpt)
    rows = vocab_rows(cfg, state)
    target = DTYPES["fp32" if cfg.model.params_dtype == "fp32" else "bf16"]
    if dtype != "keep":
        target = DTYPES[dtype]
    exporter = _Exporter(cfg, rows)
    tmp = out.with_name(f".tmp-{out.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    with single_process():
        skeleton = model_skeleton(cfg, rows)
        names = [n for n in skeleton if n in exporter.recipes]
        check_model_names(weight_names(skeleton), exporter.recipes)
        groups = list(_groups(names))
        layout = {  # planned group by group, as they are produced below: the same order
            name: (tuple(t.shape), target)
            for group in groups
            for name, t in exporter.hf({n: skeleton[n].data for n in group}).items()
        }
        writer = ShardedSafetensorsWriter(tmp, layout, max_bytes)
        progress = Progress(len(groups), "groups (a layer, the embedding, ...) exported")
        for group in groups:
            tensors = exporter.hf(load_group(skeleton, group, ckpt / "model"))
            for name, tensor in tensors.items():
                writer.write(name, tensor)
            progress.advance(sum(t.nbytes for t in tensors.values()))
            del tensors
        files = writer.finish()
    hf_config = _hf_config(cfg, state, ckpt, rows, exporter.fused, target)
    _write_metadata(tmp, hf_config, exporter.fused, cfg, state, ckpt)
    imported = (ckpt / ORIGINAL_HF_CONFIG).is_file() and state.step == 0
    (tmp / "README.md").write_text(model_card(ckpt, cfg, state, hf_config, writer, imported))
    _replace(out, tmp)
    log.info(
        "exported %s -> %s: %.1fM parameters in %d file(s), %s, %.1fs, peak memory %.2f GB",
        ckpt,
        out,
        writer.total_parameters / 1e6,
        len(files),
        _dtype_name(target),
        time.perf_counter() - t0,
        peak_rss_gb(),
    )
    return out


def _replace(out: Path, new: Path) -> None:
    """Put the complete export ``new`` at ``out``; a previous export there stays whole until
    the new one is in place."""
    if not out.exists():
        new.rename(out)
        return
    old = out.with_name(f".old-{out.name}")
    if old.exists():
        shutil.rmtree(old)
    out.rename(old)
    new.rename(out)
    shutil.rmtree(old)


def peak_rss_gb() -> float:
    """This process's peak resident memory (the kernel's high-water mark)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def _original(ckpt: Path, cfg: Config, state: RunState, kept: str, name: str) -> Any:
    """One of the backbone's own JSON files: kept beside an imported checkpoint, else in the
    Hugging Face directory the run's tokenizer comes from (a continued-pretraining run, whose
    checkpoints descend from an import); None for a model sci-scale trained from scratch."""
    if (ckpt / kept).is_file():
        return read_json(ckpt / kept)
    source = checkpoint_tokenizer_source(cfg, state)
    if source is not None and (source / name).is_file():
        found = read_json(source / name)
        if name != HF_CONFIG_FILE or any(
            a in ARCHITECTURES for a in found.get("architectures", [])
        ):
            return found
    return None


def _hf_config(
    cfg: Config, state: RunState, ckpt: Path, rows: int, fused: bool, dtype: torch.dtype
) -> dict[str, Any]:
    template = _original(ckpt, cfg, state, ORIGINAL_HF_CONFIG, HF_CONFIG_FILE)
    hf_config = hf_config_from_model(cfg.model, rows, template, _dtype_name(dtype))
    if template is None:  # a model sci-scale trained: its sentencepiece tokenizer's ids
        hf_config.update(_special_ids(checkpoint_tokenizer_source(cfg, state)))
    if fused:
        hf_config = fused_hf_config(cfg, hf_config, _dtype_name(dtype))
    return hf_config


def _write_metadata(
    directory: Path,
    hf_config: dict[str, Any],
    fused: bool,
    cfg: Config,
    state: RunState,
    ckpt: Path,
) -> None:
    if fused:
        shutil.copyfile(REMOTE_MODEL_FILE, directory / REMOTE_MODEL_FILE.name)
    (directory / HF_CONFIG_FILE).write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    ids = hf_config.get("backbone", hf_config)
    # The backbone's own generation settings (eos lists, sampling defaults) when there are any.
    generation: dict[str, Any] = _original(
        ckpt, cfg, state, ORIGINAL_GENERATION_CONFIG, GENERATION_CONFIG
    ) or {
        k: ids[k]
        for k in ("bos_token_id", "eos_token_id", "pad_token_id")
        if ids.get(k) is not None
    }
    if fused:  # the branch reads the whole sequence at every step: no KV cache
        generation["use_cache"] = False
    (directory / GENERATION_CONFIG).write_text(json.dumps(generation, indent=2) + "\n")
    _copy_tokenizer(checkpoint_tokenizer_source(cfg, state), directory)


def _special_ids(source: Path | None) -> dict[str, int]:
    if source is None or not source.is_file():  # a sentencepiece model sci-scale trained
        return {}
    tok = load_tokenizer(source)
    return {"bos_token_id": tok.bos, "eos_token_id": tok.eos, "pad_token_id": tok.pad}


def fused_hf_config(cfg: Config, backbone: dict[str, Any], dtype: str) -> dict[str, Any]:
    """config.json of a model whose SCI branch is fused: the backbone's config nested, the
    branch's shape, and the ``auto_map`` that points transformers at ``modeling_sci_scale``."""
    s = cfg.sci
    module = REMOTE_MODEL_FILE.stem
    return {
        "architectures": ["SciScaleForCausalLM"],
        "model_type": "sci_scale",
        "auto_map": {
            "AutoConfig": f"{module}.SciScaleConfig",
            "AutoModelForCausalLM": f"{module}.SciScaleForCausalLM",
        },
        "backbone": backbone,
        "sci": {
            "hidden_size": s.hidden_size,
            "num_attention_heads": s.num_attention_heads,
            "num_layers": s.num_layers,
            "ffn_hidden_size": s.ffn_hidden_size or 4 * s.hidden_size,
            "norm_epsilon": cfg.model.norm_epsilon,
            "rope_theta": 10000.0,
            "max_position_embeddings": cfg.model.seq_length,
            "fuse_layer": s.fuse_layer,
        },
        "tie_word_embeddings": False,
        "use_cache": False,
        "bos_token_id": backbone.get("bos_token_id"),
        "eos_token_id": backbone.get("eos_token_id"),
        "torch_dtype": dtype,
    }


def _copy_tokenizer(source: Path | None, out: Path) -> None:
    """The backbone's tokenizer files as they were (special tokens, chat template and all), or
    a tokenizer config for the sentencepiece model sci-scale trained."""
    if source is None or not source.exists():
        log.warning("no tokenizer to export (source %s is gone)", source)
        return
    if source.is_dir():
        for name in (*TOKENIZER_FILES, *CHAT_TEMPLATE_FILES):
            if (source / name).is_file():
                shutil.copyfile(source / name, out / name)
        return
    # A sentencepiece model trained by sci-scale: Llama's tokenizer class reads it.
    shutil.copyfile(source, out / "tokenizer.model")
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "LlamaTokenizer",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "pad_token": "<pad>",
                "unk_token": "<unk>",
                "add_bos_token": False,
                "add_eos_token": False,
            },
            indent=2,
        )
        + "\n"
    )
