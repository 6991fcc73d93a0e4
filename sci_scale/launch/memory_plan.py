"""Per-GPU memory of a training layout, planned from the configuration alone.

A layout that cannot fit should be refused at the login node, not discovered as an
out-of-memory error after an hour in the queue. The planner is arithmetic over the config
(no torch.distributed, no GPU): the model's weights per rank, their gradients, the optimizer
state and the activations kept for backward, for the worst pipeline stage. The formulas, their
assumptions and the CPU measurements that check them are in docs/parallel.md, "Memory planner".

Activations follow Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
Transformer Models"), adapted to this Llama-style block (RMSNorm, RoPE, SwiGLU, grouped-query
attention, no biases, no dropout) and to the tensors megatron-core, Transformer Engine and SDPA
actually keep, which the CPU check measures storage by storage.

Optimizer state under ZeRO is DeepSpeed's: its ZeRO optimizer keeps an fp32 copy of the rank's
partition of the weights (a clone even when the weights are fp32: DeepSpeed 0.19's
``single_partition_of_fp32_groups``) and the fp32 Adam moments of that partition, 12 bytes per
parameter over the data-parallel size; at the step it also builds the partition's fp32 gradient
(4 bytes per parameter over data parallel), counted with the gradients.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Literal

from sci_scale.config.errors import ConfigError
from sci_scale.config.layout import data_parallel_size
from sci_scale.config.schema import Config
from sci_scale.train.flops import _layer_matmul_weights

GB = 10**9
GIB = 2**30
DOC = 'docs/parallel.md, "Memory planner"'
DEFAULT_GPU_MEMORY = 80 * GB
# DeepSpeed: fp32 master copy + two fp32 Adam moments per parameter of the rank's partition
ZERO_STATE_BYTES = 12
# DeepSpeed's default reduce_bucket_size (elements): ZeRO-2/3 reduce gradients through it
ZERO_BUCKET_ELEMENTS = 500_000_000
# Template slots per block (sci_scale.data.blocks.MAX_EXAMPLES): the SCI pooling weights
SCI_EXAMPLE_SLOTS = 64
Device = Literal["cuda", "cpu"]
TERMS = ("parameters", "gradients", "optimizer", "activations")
LABELS = {
    "parameters": "parameters",
    "gradients": "gradients",
    "optimizer": "optimizer state",
    "activations": "activations",
}


class LayoutDoesNotFit(ConfigError):
    """The planned memory of a layout exceeds the GPU's."""


def parse_memory(text: str) -> int:
    """Bytes of "80GB" (10^9), "80GiB" (2^30), "141GB" or a plain number (GB)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(GB|GiB|G)?\s*", str(text), flags=re.IGNORECASE)
    if match is None:
        raise ValueError(f"GPU memory {text!r}: expected e.g. 80GB, 80GiB or 141")
    value, unit = float(match.group(1)), (match.group(2) or "GB").lower()
    return int(value * (GIB if unit == "gib" else GB))


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


@dataclass(frozen=True)
class Terms:
    parameters: int = 0
    gradients: int = 0
    optimizer: int = 0
    activations: int = 0

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.activations


@dataclass(frozen=True)
class StagePlan:
    stage: int  # pipeline rank
    terms: Terms  # everything this rank holds, the SCI branch included
    sci: Terms  # the SCI branch's share (first stage only)
    in_flight: int  # micro-batches of this rank's first model chunk held for backward
    holds: str  # what the rank holds besides its layers
    activations_per_microbatch: int  # saved for backward by one forward of its chunks


@dataclass(frozen=True)
class MemoryPlan:
    """The worst rank's memory and the layout it was planned for (bytes)."""

    tensor: int
    pipeline: int
    data: int
    virtual_pipeline: int
    zero_stage: int
    micro_batch_size: int
    microbatches: int  # per step and data-parallel rank
    recompute: str
    sequence_parallel: bool
    params_dtype: str
    compute_bytes: int
    attention_stores_scores: bool
    transformer_engine: bool
    full_recompute_allowed: bool  # the config validation refuses it with sci.fuse_layer > 0
    zero_allowed: bool  # phases and virtual stages run ZeRO-0 only
    gpu_memory: int
    worst: StagePlan
    stages: tuple[StagePlan, ...] = field(repr=False)

    @property
    def stage(self) -> int:
        return self.worst.stage

    @property
    def parameters(self) -> int:
        return self.worst.terms.parameters

    @property
    def gradients(self) -> int:
        return self.worst.terms.gradients

    @property
    def optimizer(self) -> int:
        return self.worst.terms.optimizer

    @property
    def activations(self) -> int:
        return self.worst.terms.activations

    @property
    def sci_branch(self) -> int:
        return self.worst.sci.total

    @property
    def total(self) -> int:
        return self.worst.terms.total

    @property
    def headroom(self) -> int:
        return self.gpu_memory - self.total

    @property
    def fits(self) -> bool:
        return self.total <= self.gpu_memory

    @property
    def dominant(self) -> str:
        return max(TERMS, key=lambda t: getattr(self.worst.terms, t))

    @property
    def layout(self) -> str:
        vp = f" (virtual {self.virtual_pipeline})" if self.virtual_pipeline > 1 else ""
        return f"TP{self.tensor} x PP{self.pipeline}{vp} x DP{self.data}"

    def suggestion(self) -> str:
        """Which knob lowers the dominant term, among those not turned already."""
        term = self.dominant
        split = "raise parallel.tensor or parallel.pipeline"
        if term == "activations":
            knobs = []
            if self.recompute == "none" and self.attention_stores_scores:
                knobs.append("model.recompute=selective")
            if self.recompute != "full" and self.full_recompute_allowed:
                knobs.append("model.recompute=full")
            if self.tensor > 1 and not self.sequence_parallel and self.transformer_engine:
                knobs.append("parallel.sequence_parallel=true")
            if self.micro_batch_size > 1:
                knobs.append("a lower train.micro_batch_size")
            knobs.append("a higher parallel.tensor")
            return "set " + ", or ".join(knobs)
        if term == "optimizer":
            if self.zero_stage == 0:
                if not self.zero_allowed:
                    return split  # phases / virtual stages: ZeRO-0 only
                if self.data == 1:
                    return split + ", or add GPUs for data parallelism with parallel.zero_stage=1"
                return "set parallel.zero_stage=1 (shards it over data parallel), or " + split
            return "raise the data-parallel size (more nodes), or " + split
        zero_more = self.zero_allowed and self.pipeline == 1
        if term == "gradients" and zero_more and self.zero_stage < 2:
            return "set parallel.zero_stage=2 (shards them over data parallel), or " + split
        if term == "parameters" and zero_more and self.zero_stage < 3:
            return split + ", or set parallel.zero_stage=3"
        return split

    def refusal(self) -> str:
        """One line: why the layout does not fit and what to turn."""
        return (
            f"the layout does not fit a {self.gpu_memory / GB:g} GB GPU: "
            f"{self.total / GIB:.1f} GiB planned on pipeline stage {self.stage} "
            f"({self.layout}, ZeRO-{self.zero_stage}, micro-batch {self.micro_batch_size}, "
            f"recompute {self.recompute}); the largest term is {LABELS[self.dominant]} "
            f"({getattr(self, self.dominant) / GIB:.1f} GiB): {self.suggestion()} "
            f"(see sci-scale plan)"
        )

    def to_dict(self) -> dict:
        out = asdict(self)
        out.pop("worst")
        out.update(
            {
                "stage": self.stage,
                **{t: getattr(self, t) for t in TERMS},
                "sci_branch": self.sci_branch,
                "total": self.total,
                "headroom": self.headroom,
                "fits": self.fits,
                "dominant": self.dominant,
                "suggestion": self.suggestion(),
                "formulas": DOC,
            }
        )
        return out


# -- shapes and parameter counts --------------------------------------------------------------


@dataclass(frozen=True)
class _Block:
    """One transformer stack's shape: the backbone's or the SCI branch's."""

    hidden: int
    heads: int
    groups: int
    head_dim: int
    ffn: int
    qkv_bias: bool = False

    def params(self, tp: int) -> int:
        """One layer's parameters on a tensor-parallel rank (norms are replicated)."""
        h, a, g, d = self.hidden, self.heads, self.groups, self.head_dim
        sharded = _layer_matmul_weights(h, a, g, d, self.ffn)
        if self.qkv_bias:
            sharded += (a + 2 * g) * d
        return math.ceil(sharded / tp) + 2 * h

    @property
    def tensors(self) -> int:
        """Parameter tensors per layer: two norms, qkv (+bias), proj, fc1, fc2."""
        return 6 + int(self.qkv_bias)


def _backbone(cfg: Config) -> _Block:
    from sci_scale.model.shapes import llama_ffn_size

    m = cfg.model
    return _Block(
        m.hidden_size,
        m.num_attention_heads,
        m.num_query_groups,
        m.head_dim or m.hidden_size // m.num_attention_heads,
        m.ffn_hidden_size or llama_ffn_size(m.hidden_size),
        m.qkv_bias,
    )


def _sci_block(cfg: Config) -> _Block:
    s = cfg.sci
    heads = s.num_attention_heads
    return _Block(
        s.hidden_size, heads, heads, s.hidden_size // heads, s.ffn_hidden_size or 4 * s.hidden_size
    )


def padded_vocab(cfg: Config) -> int:
    """The embedding's rows as megatron pads them for ``parallel.tensor``."""
    from sci_scale.model.shapes import padded_vocab_size

    m = cfg.model
    rows = m.vocab_size if m.vocab_size is not None else cfg.data.tokenizer_vocab_size
    return padded_vocab_size(rows, m.make_vocab_size_divisible_by, cfg.parallel.tensor)


def _sci_params(cfg: Config, tp: int) -> tuple[int, int, int]:
    """SCI branch per rank: (parameters, trainable parameters, trainable tensors).

    The blocks are tensor-parallel; proj_in, proj_out, the gate and the head are plain torch
    modules, whole on every rank. ``sci.mode=frozen`` fixes all but proj_out and the gate."""
    s, h, hs = cfg.sci, cfg.model.hidden_size, cfg.sci.hidden_size
    blk = _sci_block(cfg)
    attention_pool = s.pooling == "attention"
    # proj_in, the blocks and their final norm, the head's two linears, the pooling query, tau
    fixed = h * hs + s.num_layers * blk.params(tp) + hs + hs * hs + hs + hs * s.embed_dim
    fixed += s.embed_dim + hs * attention_pool + s.learnable_tau
    fixed_tensors = 1 + s.num_layers * blk.tensors + 1 + 4 + attention_pool + s.learnable_tau
    fusion = hs * h + h  # proj_out, gate: trained in every mode
    if s.mode == "frozen":
        return fixed + fusion, fusion, 2
    return fixed + fusion, fixed + fusion, fixed_tensors + 2


# -- activations ------------------------------------------------------------------------------


def _attention(blk: _Block, k: Kernels, recompute: str, tp: int, width: int) -> float:
    """Bytes per token the core attention and its inputs keep (see ``_layer_activations``)."""
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


def _per_example_attention(blk: _Block, k: Kernels, tp: int, width: int, padding: float) -> float:
    """Bytes per token of the local spec's attention within each example: per padded row
    token the gathered q, k, v (and SDPA's output with its log-sum-exp, or the probabilities);
    per token the scattered output (linear_proj's input) and its int64 positions."""
    e, d, a = k.compute_bytes, blk.head_dim, blk.heads / tp
    per_row = 3 * a * d * e + a * width * e if k.attention_stores_scores else 4 * a * d * e + 4 * a
    return padding * per_row + a * d * e + 8


def _layer_activations(
    blk: _Block,
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


def _sci_activations(
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
    blk = _sci_block(cfg)
    attention = None
    if batch.pairs and not k.transformer_engine:  # TE packs the examples (THD): no padding
        attention = _per_example_attention(blk, k, tp, width, batch.padding)
    out = s.num_layers * _layer_activations(blk, tokens, width, k, "none", tp, 1, e, attention)
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


# -- the plan ---------------------------------------------------------------------------------


@dataclass
class _Chunk:
    """One model chunk (global pipeline stage): its weights and what one micro-batch keeps."""

    params: int = 0
    tensors: int = 0
    activations: float = 0.0  # saved for backward by one micro-batch
    transient: float = 0.0  # alive only during backward (a recomputed layer, a logits copy)
    holds: tuple[str, ...] = ()


def _chunk(cfg: Config, k: Kernels, stage: int, chunks: int) -> _Chunk:
    """The backbone's share of global pipeline stage ``stage`` of ``chunks``: its layers, the
    embedding on the first, the final norm and output layer (and the logits) on the last."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    tp = p.tensor
    sp = tp if p.sequence_parallel else 1
    seq, tokens, e, r = (
        m.seq_length,
        m.seq_length * t.micro_batch_size,
        k.compute_bytes,
        k.residual_bytes,
    )
    blk = _backbone(cfg)
    vocab_rows = math.ceil(padded_vocab(cfg) / tp)
    per_chunk = math.ceil(m.num_layers / chunks)
    n_layers = max(0, min(per_chunk, m.num_layers - stage * per_chunk))
    c = _Chunk(n_layers * blk.params(tp), n_layers * blk.tensors)
    c.activations = n_layers * _layer_activations(blk, tokens, seq, k, m.recompute, tp, sp, r)
    if m.recompute == "full" or k.fused_rope:
        c.activations += seq * blk.head_dim * 4  # the rotary frequencies, one fp32 tensor
    if m.recompute == "full" and n_layers:  # the layer being recomputed in backward
        c.transient = _layer_activations(blk, tokens, seq, k, "none", tp, sp, r)
    if stage == 0:
        c.holds += ("embedding",)
        c.params += vocab_rows * m.hidden_size
        c.tensors += 1
        c.activations += tokens * 8  # the token ids the embedding keeps
    if stage == chunks - 1:
        c.holds += ("output layer",)
        c.params += m.hidden_size  # final norm
        c.tensors += 1
        if not m.tie_embeddings or p.pipeline > 1:  # untied, or the last stage's copy
            c.params += vocab_rows * m.hidden_size
            c.tensors += 1
        norm = (2 * e if k.transformer_engine else 2 * r + e) * m.hidden_size + 4
        c.activations += tokens * norm / sp
        c.activations += tokens * vocab_rows * 4 + tokens * 9  # fp32 logits, loss mask/target
        if e != 4:
            c.transient = max(c.transient, tokens * vocab_rows * e)  # the logits' bf16 copy
    return c


def plan_memory(
    cfg: Config,
    world_size: int,
    gpu_memory: int = DEFAULT_GPU_MEMORY,
    *,
    device: Device = "cuda",
    attention_stores_scores: bool | None = None,
    sci_batch: SciBatch | None = None,
) -> MemoryPlan:
    """Every pipeline rank's memory for ``cfg`` on ``world_size`` GPUs; the worst one leads.

    ``device="cpu"`` plans the CPU path (local spec, no fused kernels, fp32 compute for
    ``compute_dtype=auto``), which is how the planner is checked against measurements.
    ``attention_stores_scores`` overrides what ``model.attention_backend`` implies.
    ``sci_batch`` defaults to a micro-batch of pair blocks whenever the config mixes them in.
    """
    p, t, m = cfg.parallel, cfg.train, cfg.model
    dp = data_parallel_size(cfg, world_size)
    k = kernels_for(cfg, device, attention_stores_scores)
    if sci_batch is None:
        sci_batch = SciBatch(pairs=cfg.data.pair_rate > 0)
    tp, pp, vp = p.tensor, p.pipeline, p.virtual_pipeline
    microbatches = t.global_batch_size // (t.micro_batch_size * dp)
    pbytes = 2 if m.params_dtype == "bf16" else 4
    blk = _backbone(cfg)
    largest = max(math.ceil(padded_vocab(cfg) / tp) * m.hidden_size, blk.ffn * blk.hidden // tp * 2)
    lm_trains = cfg.sci.mode != "sci_only"

    stages = []
    for rank in range(pp):
        in_flight = in_flight_per_chunk(rank, pp, vp, microbatches)
        chunks = [_chunk(cfg, k, c * pp + rank, pp * vp) for c in range(vp)]
        params = sum(c.params for c in chunks)
        trainable = params if lm_trains else 0
        tensors = sum(c.tensors for c in chunks) if lm_trains else 0
        saved = sum(n * c.activations for n, c in zip(in_flight, chunks, strict=True))
        per_mb = sum(c.activations for c in chunks)
        transient = max(c.transient for c in chunks)
        holds = [h for c in chunks for h in c.holds]
        sci = Terms()
        if rank == 0 and cfg.sci.mode != "off":  # the branch sits in the first chunk
            holds.insert(1, "SCI branch")
            sci_params, sci_trainable, sci_tensors = _sci_params(cfg, tp)
            one = _sci_activations(
                cfg, k, m.seq_length * t.micro_batch_size, m.seq_length, tp, sci_batch
            )
            state = _state_terms(sci_params, sci_trainable, sci_tensors, pbytes, p.zero_stage, dp)
            sci = Terms(state.parameters, state.gradients, state.optimizer, int(in_flight[0] * one))
            params, trainable, tensors = (
                params + sci_params,
                trainable + sci_trainable,
                tensors + sci_tensors,
            )
            saved, per_mb = saved + in_flight[0] * one, per_mb + one
        state = _state_terms(params, trainable, tensors, pbytes, p.zero_stage, dp, largest)
        terms = Terms(state.parameters, state.gradients, state.optimizer, int(saved + transient))
        stages.append(StagePlan(rank, terms, sci, in_flight[0], ", ".join(holds), int(per_mb)))
    worst = max(stages, key=lambda s: s.terms.total)
    return MemoryPlan(
        tensor=tp,
        pipeline=pp,
        data=dp,
        virtual_pipeline=vp,
        zero_stage=p.zero_stage,
        micro_batch_size=t.micro_batch_size,
        microbatches=microbatches,
        recompute=m.recompute,
        sequence_parallel=p.sequence_parallel,
        params_dtype=m.params_dtype,
        compute_bytes=k.compute_bytes,
        attention_stores_scores=k.attention_stores_scores,
        transformer_engine=k.transformer_engine,
        full_recompute_allowed=cfg.sci.mode == "off" or cfg.sci.fuse_layer == 0,
        zero_allowed=vp == 1 and not (cfg.phases.backbone_frozen_until or cfg.phases.partial_until),
        gpu_memory=gpu_memory,
        worst=worst,
        stages=tuple(stages),
    )


def _state_terms(
    params: int,
    trainable: int,
    tensors: int,
    pbytes: int,
    zero: int,
    dp: int,
    largest_module: int = 0,
) -> Terms:
    """Weights, gradients and optimizer state of ``params`` weights (``trainable`` of them
    in ``tensors`` tensors) under ZeRO stage ``zero`` over ``dp`` ranks.

    ZeRO-0: torch AdamW, two moments in the weights' dtype and a 4-byte step per tensor.
    ZeRO >= 1: 12 bytes per trainable parameter over DP, plus DeepSpeed's fp32 gradient
    partition at the step (4 over DP); ZeRO-2/3 keep the gradients' partition (plus one reduce
    bucket) instead of the whole gradient; ZeRO-3 keeps the weights' partition and gathers one
    module at a time (``largest_module`` parameters: the embedding's or fc1's shard).
    """
    if zero == 0:
        return Terms(params * pbytes, trainable * pbytes, 2 * trainable * pbytes + 4 * tensors)
    shard = math.ceil(trainable / dp)
    optimizer = ZERO_STATE_BYTES * shard
    if zero == 1:
        return Terms(params * pbytes, trainable * pbytes + 4 * shard, optimizer)
    bucket = min(ZERO_BUCKET_ELEMENTS, trainable) * pbytes
    gradients = shard * pbytes + 4 * shard + bucket
    if zero == 2:
        return Terms(params * pbytes, gradients, optimizer)
    return Terms((math.ceil(params / dp) + largest_module) * pbytes, gradients, optimizer)


def require_fit(plan: MemoryPlan) -> MemoryPlan:
    """``plan``, or LayoutDoesNotFit with its one-line refusal."""
    if not plan.fits:
        raise LayoutDoesNotFit(plan.refusal())
    return plan


# -- the table --------------------------------------------------------------------------------


def _row(label: str, value: int, gpu: int) -> str:
    return f"  {label:<26}{value / GIB:>9.2f} GiB {value / GB:>9.2f} GB {100 * value / gpu:>7.1f}%"


def format_plan(plan: MemoryPlan) -> str:
    """The plan as a table: one row per term for the worst rank, then the layout."""
    w, gpu = plan.worst, plan.gpu_memory
    dtype = {2: "bf16", 4: "fp32"}[plan.compute_bytes]
    attention = (
        "stores the [b, heads, s, s] scores"
        if plan.attention_stores_scores
        else "keeps O(s) state (flash/fused)"
    )
    lines = [
        f"layout     {plan.layout}, ZeRO-{plan.zero_stage}, micro-batch {plan.micro_batch_size} "
        f"x {plan.microbatches} per step, recompute {plan.recompute}, sequence parallel "
        f"{'on' if plan.sequence_parallel else 'off'}",
        f"precision  weights {plan.params_dtype}, activations {dtype}; "
        f"{'Transformer Engine' if plan.transformer_engine else 'megatron local'} layers, "
        f"attention {attention}",
        f"worst rank pipeline stage {w.stage} of {plan.pipeline} ({w.holds or 'layers only'}; "
        f"{w.in_flight} micro-batch(es) in flight)",
        "",
        f"  {'per GPU':<26}{'GiB':>13}{'GB':>13}{'% GPU':>9}",
    ]
    for term in TERMS:
        lines.append(_row(LABELS[term], getattr(w.terms, term), gpu))
    lines.append(_row("  of which SCI branch", w.sci.total, gpu))
    lines += [
        _row("total", plan.total, gpu),
        _row("GPU memory", gpu, gpu),
        _row("headroom", plan.headroom, gpu),
    ]
    if plan.pipeline > 1:
        others = ", ".join(f"stage {s.stage} {s.terms.total / GIB:.1f} GiB" for s in plan.stages)
        lines.append(f"stages     {others}")
    lines += [
        f"largest    {LABELS[plan.dominant]}; to lower it: {plan.suggestion()}",
        f"formulas   {DOC}",
    ]
    if plan.fits and plan.headroom < 0.05 * gpu:
        lines.append(
            "note       under 5% headroom for the CUDA context, NCCL buffers and fragmentation"
        )
    return "\n".join(lines)
