"""What a rank keeps for backward: per-layer saved activations, the SCI branch's, and how many
micro-batches are in flight at the peak of the pipeline schedule.

Activations follow Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
Transformer Models"), adapted to this Llama-style block (RMSNorm, RoPE, SwiGLU, grouped-query
attention, no biases, no dropout) and to the tensors megatron-core, Transformer Engine and SDPA
actually keep, which the CPU check measures storage by storage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sci_scale.config.schema import Config
from sci_scale.launch.memory_plan.state import Block, sci_block

# Template slots per block (sci_scale.data.blocks.MAX_EXAMPLES): the SCI pooling weights
SCI_EXAMPLE_SLOTS = 64
Device = Literal["cuda", "cpu"]


@dataclass(frozen=True)
class Kernels:
    """What the kernels keep for backward, which differs between implementations.

    ``transformer_engine``: TE's fused norm+linear keeps the norm's input and output (the local
    spec's torch RMSNorm also keeps the unweighted normalised input) and its attention takes the
    grouped keys/values as they are (SDPA on the local spec gets them repeated to every head).
    ``fused_swiglu``: megatron's SwiGLU kernel (GPU) keeps only its input; unfused, silu's
    output and a copy of the linear half are kept too. ``fused_rope``: TE's RoPE (GPU) keeps
    no per-layer cos/sin.
    ``attention_stores_scores``: the kernel keeps the [b, heads, s, s] probabilities (SDPA's
    math kernel, megatron's own softmax attention) instead of a log-sum-exp per row (flash,
    cuDNN, the CPU flash kernel SDPA picks for causal attention).
    """

    transformer_engine: bool
    fused_swiglu: bool
    fused_rope: bool
    attention_stores_scores: bool
    compute_bytes: int  # activations: the autocast dtype
    residual_bytes: int  # the residual stream: the weights' dtype (autocast adds promote)


def kernels_for(
    cfg: Config, device: Device = "cuda", attention_stores_scores: bool | None = None
) -> Kernels:
    """The kernels ``cfg`` runs on ``device``: on "cuda", Transformer Engine unless the config
    says local, and bf16 compute for ``model.compute_dtype=auto``; on "cpu", the local spec."""
    m = cfg.model
    gpu = device == "cuda"
    te = gpu and m.transformer_impl != "local"
    compute = m.compute_dtype if m.compute_dtype != "auto" else ("bf16" if gpu else "fp32")
    if attention_stores_scores is None:
        attention_stores_scores = m.attention_backend in ("unfused", "local")
    weights = 2 if m.params_dtype == "bf16" else 4
    return Kernels(
        transformer_engine=te,
        fused_swiglu=gpu,
        fused_rope=te,
        attention_stores_scores=attention_stores_scores,
        compute_bytes=2 if compute == "bf16" else 4,
        residual_bytes=weights,
    )


@dataclass(frozen=True)
class SciBatch:
    """The micro-batch the SCI branch is planned for. With pair blocks the SCI attention runs
    within each example: on the local spec each example is unpacked into a row padded to a
    power of two (at most twice its tokens: ``padding``), on Transformer Engine the examples
    are packed sequences (no padding); their embeddings are then pooled and contrasted. With
    corpus blocks only, the branch runs plain causal attention over whole rows."""

    pairs: bool
    padding: float = 2.0


def _attention(blk: Block, k: Kernels, recompute: str, tp: int, width: int) -> float:
    """Bytes per token the core attention and its inputs keep (see ``layer_activations``)."""
    e, d = k.compute_bytes, blk.head_dim
    a, g = blk.heads / tp, blk.groups / tp
    grouped = blk.groups < blk.heads
    if k.transformer_engine or recompute == "selective" or not grouped:
        out = (3 * a + 3 * g) * d * e
    else:
        out = 4 * a * d * e
    if recompute != "selective":
        out += a * width * e if k.attention_stores_scores else 4 * a
    return out


def _per_example_attention(blk: Block, k: Kernels, tp: int, width: int, padding: float) -> float:
    """Bytes per token of the local spec's attention within each example: per padded row
    token the gathered q, k, v (and SDPA's output with its log-sum-exp, or the probabilities);
    per token the scattered output (linear_proj's input) and its int64 positions."""
    e, d, a = k.compute_bytes, blk.head_dim, blk.heads / tp
    per_row = 3 * a * d * e + a * width * e if k.attention_stores_scores else 4 * a * d * e + 4 * a
    return padding * per_row + a * d * e + 8


def layer_activations(
    blk: Block,
    tokens: float,
    width: int,
    k: Kernels,
    recompute: str,
    tp: int,
    sp: int,
    residual: int,
    attention: float | None = None,
) -> float:
    """Bytes one layer keeps for backward over ``tokens`` tokens in rows ``width`` long.

    Per token (e: compute dtype, r: residual dtype, a, g, f per tensor-parallel rank):
    norms and their linears' inputs 2 x (2h e + 4) with TE, 2 x (2h r + h e + 4) local, over
    the sequence-parallel size; attention (3a + 3g) d e with TE or selective recompute (q, k,
    the qkv output that v views, the output), local SDPA 4a d e (k and v repeated to every
    head; 3a + 3g without grouping), plus 4a (log-sum-exp) or a s e (the probabilities) unless
    selective; SwiGLU 3f e fused (fc1's output, fc2's input), 5f e unfused. RoPE adds
    4 s d e per layer unless fused. Full recompute keeps the layer's input only, h r / sp.
    ``attention`` replaces the attention's bytes per token (the SCI branch's per-example path).
    """
    e = k.compute_bytes
    h, d = blk.hidden, blk.head_dim
    if recompute == "full":
        return tokens * h * residual / sp
    f = blk.ffn / tp
    # TE: the norm's input and output; local: also the unweighted normalised input
    norms = 2 * (2 * h * e + 4) if k.transformer_engine else 2 * (2 * h * residual + h * e + 4)
    if attention is None:
        attention = _attention(blk, k, recompute, tp, width)
    mlp = (3 if k.fused_swiglu else 5) * f * e
    rope = 0 if k.fused_rope else 4 * width * d * e
    return tokens * (norms / sp + attention + mlp) + rope


def sci_activations(
    cfg: Config, k: Kernels, tokens: int, width: int, tp: int, batch: SciBatch
) -> float:
    """The SCI branch over one micro-batch: its blocks (no recompute, no sequence
    parallelism: it sees whole examples), the final norm, proj_out's input and output, the
    gathered or cast copy of the embeddings it reads, and, for pair blocks, the per-example
    attention's padded rows and shared row indices and the pooling weights."""
    s, m = cfg.sci, cfg.model
    if s.mode == "off" or (not s.fuse and not batch.pairs):
        return 0.0  # no branch, or nothing to fuse and nothing to contrast
    e, r = k.compute_bytes, k.residual_bytes
    blk = sci_block(cfg)
    attention = None
    if batch.pairs and not k.transformer_engine:  # TE packs the examples (THD): no padding
        attention = _per_example_attention(blk, k, tp, width, batch.padding)
    out = s.num_layers * layer_activations(blk, tokens, width, k, "none", tp, 1, e, attention)
    out += tokens * ((3 if not k.transformer_engine else 2) * blk.hidden * e + 4)  # final norm
    out += tokens * m.hidden_size * e  # proj_out's output, kept by the gate's product
    if cfg.parallel.sequence_parallel or r != e:
        out += tokens * m.hidden_size * e  # proj_in's input: gathered / cast embeddings
    elif s.fuse_layer == 0:
        out += tokens * m.hidden_size * r  # the embeddings, beside layer 0's fused input
    if batch.pairs:
        if attention is not None:
            out += 9 * tokens * batch.padding  # the rows' int64 positions and valid masks
        out += SCI_EXAMPLE_SLOTS * tokens * e  # pooling weights [b, examples, s]
    return out


def in_flight_per_chunk(rank: int, pp: int, vp: int, microbatches: int) -> list[int]:
    """Micro-batches each model chunk of pipeline ``rank`` holds for backward at the peak of
    megatron's 1F1B schedule: min(pp - rank, m) without virtual stages; with them, the
    interleaved warm-up's forwards, which visit the chunks in groups of pp micro-batches."""
    if vp == 1:
        return [min(pp - rank, microbatches)]
    total = min((pp - rank - 1) * 2 + (vp - 1) * pp + 1, microbatches * vp)
    counts = [0] * vp
    for step in range(total):
        counts[(step // pp) % vp] += 1
    return counts
