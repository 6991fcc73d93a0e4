"""The ``README.md`` of an exported model: what it is and the run that made it.

A model shared on the Hub without its provenance cannot be trusted or reproduced; the card
lists what a reader needs from the checkpoint's own run state: steps, tokens, data blend,
whether the SCI branch was trained and whether it is fused into the export.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from sci_scale.checkpoint.state import RunState
from sci_scale.config import Config


class _Written(Protocol):
    total_parameters: int
    total_bytes: int

    @property
    def files(self) -> list[str]: ...


def _data_blend(cfg: Config) -> str:
    d = cfg.data
    if d.corpus == "task":
        corpus = f"task `{d.task}`"
    elif d.corpus_paths:
        weights = d.corpus_weights or [1.0] * len(d.corpus_paths)
        total = sum(weights)
        corpus = ", ".join(
            f"`{Path(p).name}` ({w / total:.0%})"
            for p, w in zip(d.corpus_paths, weights, strict=False)
        )
    else:
        corpus = f"`{d.corpus}`"
    pairs = (
        f"; structural pairs ({', '.join(d.pair_sources)}) in {d.pair_rate:.0%} of the blocks"
        if cfg.sci.mode != "off" and d.pair_rate > 0
        else ""
    )
    return corpus + pairs


def _origin(cfg: Config, imported: bool) -> str:
    if imported:
        return f"the Hugging Face model `{cfg.data.tokenizer or '?'}` (imported)"
    if cfg.checkpoint.init_from:
        return f"`{cfg.checkpoint.init_from}`"
    return "random initialisation"


def model_card(
    ckpt: Path,
    cfg: Config,
    state: RunState,
    hf_config: dict[str, Any],
    written: _Written,
    imported: bool = False,
) -> str:
    """``imported``: the checkpoint is a Hugging Face model imported as it was (not trained)."""
    tokens = state.consumed_samples * cfg.model.seq_length
    fused = hf_config.get("model_type") == "sci_scale"
    arch = hf_config.get("architectures", ["?"])[0]
    backbone = hf_config.get("backbone", hf_config)
    sci = (
        "off"
        if cfg.sci.mode == "off"
        else f"{cfg.sci.mode}, "
        + (
            "fused into the backbone (layer "
            f"{cfg.sci.fuse_layer}): load with `trust_remote_code=True`"
            if fused
            else "auxiliary loss only: not part of this export, a plain model"
        )
    )
    lines = [
        "---",
        "library_name: transformers",
        "tags: [sci-scale]",
        "---",
        f"# {ckpt.parent.parent.name if ckpt.parent.name == 'checkpoints' else ckpt.name}",
        "",
        f"A `{arch}` exported by sci-scale from `{ckpt.name}`.",
        "",
        "| | |",
        "|---|---|",
        f"| parameters | {written.total_parameters / 1e6:,.1f}M "
        f"({backbone.get('num_hidden_layers')} layers, hidden {backbone.get('hidden_size')}) |",
        f"| weights | {hf_config.get('torch_dtype')}, {len(written.files)} file(s), "
        f"{written.total_bytes / 1e9:.2f} GB |",
        f"| training steps | {state.step:,} |",
        f"| training tokens | {tokens:,} ({state.consumed_samples:,} sequences of "
        f"{cfg.model.seq_length}) |",
        f"| data | {_data_blend(cfg) if state.step else 'none (not trained by sci-scale)'} |",
        f"| SCI branch | {sci} |",
        f"| started from | {_origin(cfg, imported)} |",
        "",
    ]
    return "\n".join(lines) + "\n"
