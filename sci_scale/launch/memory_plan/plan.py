"""The plan: every pipeline rank's terms for a layout, the worst rank, and what to turn when it
does not fit.

Each pipeline rank holds its model chunks (layers, and the embedding or the output layer at the
ends) and the SCI branch on the first stage; the rank with the largest total is the one that
decides whether the layout fits, so it leads the plan.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field

from sci_scale.config.errors import ConfigError
from sci_scale.config.layout import data_parallel_size
from sci_scale.config.schema import Config
from sci_scale.launch.memory_plan.activations import (
    Device,
    Kernels,
    SciBatch,
    in_flight_per_chunk,
    kernels_for,
    layer_activations,
    sci_activations,
)
from sci_scale.launch.memory_plan.state import (
    Terms,
    backbone_block,
    padded_vocab,
    sci_params,
    state_terms,
)

GB = 10**9
GIB = 2**30
DOC = 'docs/parallel.md, "Memory planner"'
DEFAULT_GPU_MEMORY = 80 * GB
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
    blk = backbone_block(cfg)
    vocab_rows = math.ceil(padded_vocab(cfg) / tp)
    per_chunk = math.ceil(m.num_layers / chunks)
    n_layers = max(0, min(per_chunk, m.num_layers - stage * per_chunk))
    c = _Chunk(n_layers * blk.params(tp), n_layers * blk.tensors)
    c.activations = n_layers * layer_activations(blk, tokens, seq, k, m.recompute, tp, sp, r)
    if m.recompute == "full" or k.fused_rope:
        c.activations += seq * blk.head_dim * 4  # the rotary frequencies, one fp32 tensor
    if m.recompute == "full" and n_layers:  # the layer being recomputed in backward
        c.transient = layer_activations(blk, tokens, seq, k, "none", tp, sp, r)
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
    blk = backbone_block(cfg)
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
            sci_all, sci_trainable, sci_tensors = sci_params(cfg, tp)
            one = sci_activations(
                cfg, k, m.seq_length * t.micro_batch_size, m.seq_length, tp, sci_batch
            )
            state = state_terms(sci_all, sci_trainable, sci_tensors, pbytes, p.zero_stage, dp)
            sci = Terms(state.parameters, state.gradients, state.optimizer, int(in_flight[0] * one))
            params, trainable, tensors = (
                params + sci_all,
                trainable + sci_trainable,
                tensors + sci_tensors,
            )
            saved, per_mb = saved + in_flight[0] * one, per_mb + one
        state = state_terms(params, trainable, tensors, pbytes, p.zero_stage, dp, largest)
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


def require_fit(plan: MemoryPlan) -> MemoryPlan:
    """``plan``, or LayoutDoesNotFit with its one-line refusal."""
    if not plan.fits:
        raise LayoutDoesNotFit(plan.refusal())
    return plan
