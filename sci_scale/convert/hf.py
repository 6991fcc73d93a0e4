"""``sci-scale convert``: Hugging Face <-> sci-scale checkpoints, and a logits check between them.

Import builds the sci-scale model once in one process, copies the weights in (``weights``),
and saves a weights-only megatron distributed checkpoint. Such a checkpoint reshards to any
tensor/pipeline layout when it is loaded, so ``--tp``/``--pp`` only check that the layout fits
the model and record it as the layout to train with; they never change the tensors.
Export loads a checkpoint whole (TP=1) and writes safetensors, ``config.json``,
``generation_config.json`` and the tokenizer files.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from sci_scale.checkpoint.load import (
    checkpoint_config,
    inference_config,
    load_whole_model,
    sci_logits,
    single_process,
    tokenizer_source,
    vocab_rows,
    whole_model_config,
)
from sci_scale.checkpoint.manager import load_weights, save_weights
from sci_scale.checkpoint.state import RunState
from sci_scale.config import Config, config_from_dict, config_to_dict, validate
from sci_scale.convert.hf_config import (
    HF_CONFIG_FILE,
    UnsupportedModelError,
    hf_config_from_model,
    model_section_from_hf,
    read_hf_config,
    read_json,
)
from sci_scale.convert.hf_io import SAFETENSORS, read_hf_weights
from sci_scale.convert.weights import hf_to_megatron, megatron_to_hf, sci_branch_to_hf
from sci_scale.data.hf_tokenizer import TOKENIZER_FILES, HFTokenizer, is_hf_tokenizer_dir
from sci_scale.data.tokenizer import load_tokenizer, tokenizer_identity
from sci_scale.model.gpt import SCIGPTModel, model_vocab_size
from sci_scale.model.shapes import padded_vocab_size
from sci_scale.runtime.distributed import destroy_distributed, init_distributed, seed_everything

log = logging.getLogger(__name__)

ORIGINAL_HF_CONFIG = "hf_config.json"  # kept beside an imported checkpoint for the export
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# The transformers model class of exports whose SCI branch is fused (copied into the export).
REMOTE_MODEL_FILE = Path(__file__).resolve().parent / "remote" / "modeling_sci_scale.py"


def import_config(
    hf_dir: Path, tp: int = 1, pp: int = 1, seq_length: int | None = None, dtype: str = "fp32"
) -> Config:
    """The sci-scale config of an HF model: its shape, its tokenizer, SCI off, the layout."""
    hf = read_hf_config(hf_dir)
    section = model_section_from_hf(hf, seq_length)
    section["params_dtype"] = dtype
    rows = section["vocab_size"]
    if rows % tp:
        raise UnsupportedModelError(
            f"vocab_size ({rows}) is not divisible by --tp ({tp}): the vocabulary would need "
            "padding rows, which would change the softmax against the original model"
        )
    data: dict[str, Any] = (
        {"tokenizer": str(hf_dir.resolve())} if is_hf_tokenizer_dir(hf_dir) else {}
    )
    cfg = config_from_dict(
        {
            "model": section,
            "sci": {"mode": "off"},
            "data": data,
            "parallel": {"tensor": tp, "pipeline": pp},
        }
    )
    validate(cfg)
    if data:
        model_vocab_size(cfg, HFTokenizer(hf_dir).vocab_size)  # the tokenizer must fit
    return cfg


def hf_to_sci(
    hf_dir: str | Path,
    out: str | Path,
    tp: int = 1,
    pp: int = 1,
    seq_length: int | None = None,
    dtype: str = "fp32",
) -> Path:
    """Import an HF Llama/Mistral/Qwen2/SmolLM2 model as a sci-scale checkpoint at ``out``."""
    hf_dir, out = Path(hf_dir), Path(out)
    t0 = time.perf_counter()
    cfg = import_config(hf_dir, tp, pp, seq_length, dtype)
    # Kept in the file's dtype: load_state_dict casts while copying into the model, so the
    # weights are never held twice at full precision.
    weights = read_hf_weights(hf_dir)
    rows = cfg.model.vocab_size
    assert rows is not None
    whole = whole_model_config(cfg)
    with single_process():
        model = SCIGPTModel(whole, vocab_size=rows)
        padded = padded_vocab_size(rows, whole.model.make_vocab_size_divisible_by, 1)
        result = model.load_state_dict(hf_to_megatron(weights, cfg.model, padded), strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
        if missing or result.unexpected_keys:
            raise UnsupportedModelError(
                f"weights do not match the model: missing {missing[:5]}, unexpected "
                f"{result.unexpected_keys[:5]}"
            )
        del weights
        identity = (
            tokenizer_identity(Path(cfg.data.tokenizer) / "tokenizer.json")
            if cfg.data.tokenizer
            else {"path": "", "sha256": ""}
        )
        state = RunState(0, 0, 1, config_to_dict(cfg), identity)
        save_weights(out, model, state)
    shutil.copyfile(hf_dir / HF_CONFIG_FILE, out / ORIGINAL_HF_CONFIG)
    log.info(
        "imported %s (%s, %d layers, %.1fM parameters) -> %s in %.1fs",
        hf_dir,
        read_hf_config(hf_dir)["architectures"][0],
        cfg.model.num_layers,
        sum(p.numel() for p in model.parameters()) / 1e6,
        out,
        time.perf_counter() - t0,
    )
    return out


def sci_to_hf(ckpt: str | Path, out: str | Path, dtype: str = "fp32") -> Path:
    """Export a sci-scale checkpoint as a Hugging Face model directory."""
    ckpt, out = Path(ckpt), Path(out)
    t0 = time.perf_counter()
    with single_process():
        loaded = load_whole_model(ckpt)
        cfg, rows = loaded.cfg, loaded.rows
        state_dict = loaded.model.state_dict()
        backbone = {k: v for k, v in state_dict.items() if k.startswith("gpt.")}
        tensors = megatron_to_hf(backbone, cfg.model, rows)
        fused = cfg.sci.mode != "off" and cfg.sci.fuse
        if fused:  # the branch changes the logits: export it with the model class that runs it
            if cfg.model.tie_embeddings:  # stored explicitly: the wrapper does not tie
                tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
            tensors = {f"backbone.{k}": v for k, v in tensors.items()}
            tensors.update(sci_branch_to_hf(state_dict, cfg.sci))
        tensors = {k: v.to(DTYPES[dtype]) for k, v in tensors.items()}
    template_path = ckpt / ORIGINAL_HF_CONFIG
    template = read_json(template_path) if template_path.is_file() else None
    hf_config = hf_config_from_model(cfg.model, rows, template, dtype)
    if template is None:  # a model sci-scale trained: its sentencepiece tokenizer's ids
        hf_config.update(_special_ids(tokenizer_source(cfg, loaded.state)))
    remote_code: Path | None = None
    if fused:
        hf_config, remote_code = fused_hf_config(cfg, hf_config, dtype), REMOTE_MODEL_FILE
    tmp = out.with_name(f".tmp-{out.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(tensors, tmp / SAFETENSORS, metadata={"format": "pt"})
    if remote_code is not None:
        shutil.copyfile(remote_code, tmp / remote_code.name)
    (tmp / HF_CONFIG_FILE).write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    generation = {
        k: hf_config[k]
        for k in ("bos_token_id", "eos_token_id", "pad_token_id")
        if hf_config.get(k) is not None
    }
    (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    _copy_tokenizer(tokenizer_source(cfg, loaded.state), tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    log.info("exported %s -> %s (%s) in %.1fs", ckpt, out, dtype, time.perf_counter() - t0)
    return out


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
        "bos_token_id": backbone.get("bos_token_id"),
        "eos_token_id": backbone.get("eos_token_id"),
        "torch_dtype": {"bf16": "bfloat16", "fp32": "float32"}[dtype],
    }


def _copy_tokenizer(source: Path | None, out: Path) -> None:
    if source is None or not source.exists():
        log.warning("no tokenizer to export (source %s is gone)", source)
        return
    if source.is_dir():
        for name in TOKENIZER_FILES:
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


def hf_logits(hf_dir: Path, tokens: torch.Tensor, trust_remote_code: bool = False) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        hf_dir, dtype=torch.float32, trust_remote_code=trust_remote_code
    )
    model.eval()
    with torch.no_grad():
        return model(tokens).logits.float()


def _pipeline_logits(model: SCIGPTModel, tokens: torch.Tensor, rows: int) -> torch.Tensor | None:
    """Logits through megatron's pipeline schedule (forward only); None off the last stage."""
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.pipeline_parallel import get_forward_backward_func

    positions = torch.arange(tokens.size(1)).expand_as(tokens)

    def forward_step(data_iterator, chunk):
        batch = next(data_iterator)
        output = chunk(batch["tokens"], batch["position_ids"]).lm
        return output, lambda out, non_loss_data=False: out

    model.eval()
    with torch.no_grad():
        collected = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter([{"tokens": tokens, "position_ids": positions}]),
            model=[model],
            num_microbatches=1,
            seq_length=tokens.size(1),
            micro_batch_size=tokens.size(0),
            forward_only=True,
            collect_non_loss_data=True,
        )
    if not parallel_state.is_pipeline_last_stage():
        return None
    logits = tensor_parallel.gather_from_tensor_model_parallel_region(collected[0])
    return logits[..., :rows].float().cpu()


def verify(
    ckpt: str | Path,
    hf_dir: str | Path,
    batch: int = 2,
    seq: int = 32,
    seed: int = 0,
    trust_remote_code: bool = False,
    pipeline: int = 1,
) -> float | None:
    """Max |logits(sci-scale) - logits(transformers)| on a random token batch.

    Runs at the layout of the launch: N processes (torchrun or srun) are TP = N / ``pipeline``
    x PP = ``pipeline``, the checkpoint resharded by megatron as it loads. Returns the
    difference on the rank that compares (the last pipeline stage's first tensor-parallel
    rank), None on the others.
    """
    from megatron.core import parallel_state

    from sci_scale.runtime.launch_env import read_dist_env

    ckpt, hf_dir = Path(ckpt), Path(hf_dir)
    cfg, state = checkpoint_config(ckpt)
    _, world, _ = read_dist_env()
    if world % pipeline:
        raise UnsupportedModelError(f"--pp {pipeline} does not divide {world} processes")
    tp = world // pipeline
    cfg = inference_config(cfg, tp, pipeline)
    validate(cfg)
    rows = vocab_rows(cfg, state)
    init_distributed(tp, pipeline, 1)
    seed_everything(seed)
    try:
        generator = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, rows, (batch, seq), generator=generator)
        model = SCIGPTModel(
            cfg,
            vocab_size=rows,
            pre_process=parallel_state.is_pipeline_first_stage(),
            post_process=parallel_state.is_pipeline_last_stage(),
        )
        load_weights(ckpt, model)
        log.info("logits at TP%d x PP%d on %d token(s)", tp, pipeline, tokens.numel())
        if pipeline == 1:
            ours = sci_logits(model, tokens, rows)
        else:
            ours = _pipeline_logits(model, tokens, rows)
        if ours is None or parallel_state.get_tensor_model_parallel_rank() != 0:
            return None
        theirs = hf_logits(hf_dir, tokens, trust_remote_code)
        if theirs.shape != ours.shape:
            raise UnsupportedModelError(f"logits shapes differ: {ours.shape} vs {theirs.shape}")
        return float((ours - theirs).abs().max())
    finally:
        destroy_distributed()
