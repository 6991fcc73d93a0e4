"""``sci-scale convert``: Hugging Face -> sci-scale checkpoints, and a logits check of the two.

Import never holds the model: the checkpoint's structure comes from the sci-scale model built
on the meta device, and each parameter is made from its HF tensors (read one by one from the
safetensors files) when megatron's writer reaches it, written and dropped
(``checkpoint.streaming``); peak memory is a few of the largest tensors, whatever the model's
size. The checkpoint is a megatron distributed checkpoint, which reshards to any tensor/pipeline
layout when it is loaded, so ``--tp``/``--pp`` check that the layout fits the model and record
it as the layout to train with. Export is ``convert.export``.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from sci_scale.checkpoint.load import (
    checkpoint_config,
    inference_config,
    model_skeleton,
    sci_logits,
    single_process,
    vocab_rows,
)
from sci_scale.checkpoint.manager import load_weights, write_weights
from sci_scale.checkpoint.state import RunState
from sci_scale.checkpoint.streaming import save_streaming, weight_names
from sci_scale.config import Config, config_from_dict, config_to_dict, save_config, validate
from sci_scale.convert.export import (
    DTYPES,
    GENERATION_CONFIG,
    ORIGINAL_GENERATION_CONFIG,
    ORIGINAL_HF_CONFIG,
    peak_rss_gb,
    sci_to_hf,
)
from sci_scale.convert.hf_config import (
    HF_CONFIG_FILE,
    UnsupportedModelError,
    model_section_from_hf,
    read_hf_config,
)
from sci_scale.convert.hf_io import HFWeights
from sci_scale.convert.weights import (
    WeightMappingError,
    check_hf_names,
    check_model_names,
    megatron_tensor,
    model_recipes,
)
from sci_scale.data.hf_tokenizer import HFTokenizer, is_hf_tokenizer_dir
from sci_scale.data.tokenizer import tokenizer_identity
from sci_scale.model.gpt import SCIGPTModel, model_vocab_size
from sci_scale.model.shapes import padded_vocab_size
from sci_scale.runtime.distributed import destroy_distributed, init_distributed, seed_everything

__all__ = ["hf_logits", "hf_to_sci", "import_config", "sci_to_hf", "verify"]

log = logging.getLogger(__name__)
CONTINUE_CONFIG = "continue.yaml"  # written beside an import: the config to train from it


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


def continue_config(cfg: Config, ckpt: Path) -> Config:
    """The training config that continues pretraining from an imported checkpoint: its model
    shape, its tokenizer, the recorded TP/PP layout, ``checkpoint.init_from`` set and the
    SCI branch at the schema's defaults; a run adds its corpus and run directory."""
    base = config_from_dict({})
    first_stage_layers = cfg.model.num_layers // cfg.parallel.pipeline
    return base.replace(
        model=cfg.model,
        # the branch joins on the first pipeline stage
        sci=base.sci.replace(fuse_layer=min(base.sci.fuse_layer, first_stage_layers - 1)),
        parallel=base.parallel.replace(tensor=cfg.parallel.tensor, pipeline=cfg.parallel.pipeline),
        data=base.data.replace(tokenizer=cfg.data.tokenizer),
        checkpoint=base.checkpoint.replace(init_from=str(ckpt.resolve())),
    )


def _check_tied(cfg: Config, weights: HFWeights) -> None:
    """A tied model's file may carry ``lm_head.weight`` too; it must be the embedding."""
    if "lm_head.weight" not in weights.names():
        if not cfg.model.tie_embeddings:
            raise WeightMappingError(f"{weights.hf_dir} has no tensor 'lm_head.weight'")
        return
    if cfg.model.tie_embeddings and not torch.equal(
        weights.get("lm_head.weight"), weights.get("model.embed_tokens.weight")
    ):
        raise WeightMappingError(
            "tie_word_embeddings is true but lm_head.weight differs from embed_tokens.weight"
        )


def hf_to_sci(
    hf_dir: str | Path,
    out: str | Path,
    tp: int = 1,
    pp: int = 1,
    seq_length: int | None = None,
    dtype: str = "fp32",
) -> Path:
    """Import an HF Llama/Mistral/Qwen2/Qwen3/SmolLM2 model as a sci-scale checkpoint, one
    tensor at a time."""
    hf_dir, out = Path(hf_dir), Path(out)
    t0 = time.perf_counter()
    cfg = import_config(hf_dir, tp, pp, seq_length, dtype)
    weights = HFWeights(hf_dir)
    rows = cfg.model.vocab_size
    assert rows is not None
    padded = padded_vocab_size(rows, cfg.model.make_vocab_size_divisible_by, 1)
    recipes = model_recipes(cfg.model, rows, padded)
    check_hf_names(recipes, weights.names(), str(hf_dir))
    _check_tied(cfg, weights)
    identity = (
        tokenizer_identity(Path(cfg.data.tokenizer) / "tokenizer.json")
        if cfg.data.tokenizer
        else {"path": "", "sha256": ""}
    )
    state = RunState(0, 0, 1, config_to_dict(cfg), identity)
    with single_process():
        skeleton = model_skeleton(cfg, rows)
        tensors = weight_names(skeleton)
        check_model_names(tensors, recipes)
        parameters = sum(skeleton[n].data.numel() for n in tensors)

        def produce(name: str) -> torch.Tensor:
            return megatron_tensor(recipes[name], weights.get)

        write_weights(
            out,
            state,
            lambda d: save_streaming(skeleton, d, produce, DTYPES[cfg.model.params_dtype]),
        )
    shutil.copyfile(hf_dir / HF_CONFIG_FILE, out / ORIGINAL_HF_CONFIG)
    if (hf_dir / GENERATION_CONFIG).is_file():
        shutil.copyfile(hf_dir / GENERATION_CONFIG, out / ORIGINAL_GENERATION_CONFIG)
    save_config(continue_config(cfg, out), out / CONTINUE_CONFIG)
    log.info(
        "imported %s (%s, %d layers, %.1fM parameters) -> %s in %.1fs, peak memory %.2f GB",
        hf_dir,
        read_hf_config(hf_dir)["architectures"][0],
        cfg.model.num_layers,
        parameters / 1e6,
        out,
        time.perf_counter() - t0,
        peak_rss_gb(),
    )
    return out


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
