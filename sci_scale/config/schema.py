"""The run configuration as typed dataclasses.

One tree of dataclasses is the single source of truth for every knob: YAML files and
``key.sub=value`` overrides are checked against it (see ``loader``), so a typo is an error
that names the valid keys instead of a silently ignored setting.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

SciMode = Literal["joint", "frozen", "sci_only", "off"]
Pooling = Literal["mean", "last", "attention"]
Dtype = Literal["fp32", "bf16"]
ComputeDtype = Literal["auto", "fp32", "bf16"]
Device = Literal["auto", "cuda", "cpu"]
TransformerImpl = Literal["auto", "local", "transformer_engine"]
# megatron-core's AttnBackend names (megatron.core.transformer.enums.AttnBackend)
AttentionBackend = Literal["auto", "flash", "fused", "unfused", "local"]


@dataclass
class RuntimeSection:
    """Where the run executes (see docs/parallel.md, "How the GPU path is chosen")."""

    # auto: CUDA when torch sees a GPU, else the CPU. "cuda" without a usable GPU (or with
    # fewer GPUs than local ranks) is an error, never a silent CPU run.
    device: Device = "auto"


@dataclass
class RunSection:
    """Where a run writes checkpoints, ``metrics.jsonl``, plots and its data cache."""

    dir: str = "runs/tiny"
    name: str = "tiny"


@dataclass
class ModelSection:
    """A Llama-style decoder: RMSNorm, RoPE, SwiGLU, grouped-query attention."""

    num_layers: int = 4
    hidden_size: int = 128
    num_attention_heads: int = 4
    num_query_groups: int = 2
    ffn_hidden_size: int | None = None  # None: Llama's rule, 8/3 * hidden rounded up to 64
    seq_length: int = 256
    rotary_base: float = 10000.0
    norm_epsilon: float = 1e-5
    tie_embeddings: bool = True
    init_method_std: float = 0.02
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    # Rows of the embedding; None: the tokenizer's vocabulary. Imported models keep their own
    # (often larger than the tokenizer's, e.g. Qwen2), which the tokenizer must fit into.
    vocab_size: int | None = None
    make_vocab_size_divisible_by: int = 64
    # Storage dtype of the weights. fp32 weights are the master copy of mixed precision;
    # bf16 weights need ZeRO >= 1 for training (DeepSpeed keeps the fp32 master copy).
    params_dtype: Dtype = "fp32"
    # Matmul/activation dtype (torch.autocast over the weights); auto: bf16 on CUDA, fp32 on CPU.
    compute_dtype: ComputeDtype = "auto"
    # auto: Transformer Engine when it imports on a GPU, else megatron's local spec (SDPA).
    transformer_impl: TransformerImpl = "auto"
    # Core attention kernel: flash / fused (cuDNN) / unfused / local (megatron's own softmax
    # attention) / auto (the fastest the implementation and inputs allow).
    attention_backend: AttentionBackend = "auto"
    head_dim: int | None = None  # None: hidden_size / num_attention_heads
    qkv_bias: bool = False  # biases on the query/key/value projections (Qwen2)
    # Llama-3 RoPE frequency scaling ("rope_type": "llama3"); None: plain RoPE.
    rope_scaling_factor: float | None = None
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_positions: int = 8192
    # A backbone trained with sliding-window attention (Mistral): recorded for export, and
    # model.seq_length may not exceed it (sci-scale attends over the whole sequence).
    sliding_window: int | None = None
    # FP8 matmuls through Transformer Engine (GPU only): "delayed" scaling (amax history) or
    # "current" (per-tensor scales from the current step); None: bf16/fp32 as params_dtype.
    fp8: Literal["delayed", "current"] | None = None
    # Activation recomputation: "selective" recomputes core attention, "full" whole layers.
    recompute: Literal["none", "selective", "full"] = "none"


@dataclass
class SciSection:
    """The structural encoder branch and its contrastive loss (DESIGN.md, 'The SCI branch')."""

    mode: SciMode = "joint"
    fuse: bool = True
    fuse_layer: int = 1
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    ffn_hidden_size: int | None = None
    pooling: Pooling = "mean"
    embed_dim: int = 64
    tau: float = 0.1
    learnable_tau: bool = False
    tau_min: float = 0.01
    tau_max: float = 1.0
    alpha: float = 0.05
    alpha_warmup_steps: int = 0
    lr_scale: float = 1.0


@dataclass
class DataSection:
    """Corpus, tokenizer and the structural pairs mixed into ``pair_rate`` of the blocks."""

    # stdlib_docstrings (built in), jsonl (files tokenized at start), or indexed (prefixes
    # written by `sci-scale preprocess`, blended by corpus_weights; needs data.tokenizer).
    corpus: Literal["stdlib_docstrings", "jsonl", "indexed"] = "stdlib_docstrings"
    corpus_paths: list[str] = field(default_factory=list)
    corpus_weights: list[float] = field(default_factory=list)  # empty: equal weights
    text_key: str = "text"
    max_docs: int | None = None
    # A sentencepiece .model, or a Hugging Face model directory (its tokenizer.json); None:
    # train a sentencepiece tokenizer on the corpus.
    tokenizer: str | None = None
    tokenizer_vocab_size: int = 2048
    tokenizer_model_type: Literal["bpe", "unigram"] = "bpe"
    cache_dir: str | None = None  # None: RUN_DIR/data
    split: str = "98,1,1"
    pair_rate: float = 0.05
    pair_sources: list[str] = field(default_factory=lambda: ["scan", "arithmetic"])
    scan_split: str = "simple"
    arithmetic_per_template: int = 40
    cogs_path: str | None = None
    user_pairs_path: str | None = None
    examples_per_template: int = 2


@dataclass
class TrainSection:
    """Optimisation: AdamW, warm-up + cosine learning rate, clipping, accumulation, eval."""

    steps: int = 300
    micro_batch_size: int = 8
    global_batch_size: int = 16
    seed: int = 1234
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup_steps: int = 20
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    log_interval: int = 10
    eval_interval: int = 100
    eval_batches: int = 4
    # Stop cleanly (checkpoint, then exit) after this many minutes; for jobs with a time limit.
    max_wall_minutes: float | None = None


@dataclass
class ParallelSection:
    """Tensor x pipeline x data parallel layout; data parallelism comes from the world size."""

    tensor: int = 1
    pipeline: int = 1
    virtual_pipeline: int = 1  # model chunks per pipeline rank; > 1: interleaved 1F1B
    zero_stage: int = 0
    # Megatron sequence parallelism: norms and dropout sharded over the sequence within a
    # tensor-parallel group (needs parallel.tensor > 1 and Transformer Engine).
    sequence_parallel: bool = False


@dataclass
class CheckpointSection:
    """How often to save and how many checkpoints to keep (the newest are kept)."""

    interval: int = 100
    keep_last: int = 2
    save_final: bool = True
    save_initial: bool = False  # also write step 0 (the initial weights) before training
    init_from: str | None = None  # a checkpoint directory whose weights start a new run


@dataclass
class PhasesSection:
    """Continued pretraining of a trained backbone (see ``train.phases``): steps 1..
    ``backbone_frozen_until`` train the SCI branch only; then, until ``partial_until``, the
    backbone's last ``unfreeze_last_n`` layers join; after that everything trains."""

    backbone_frozen_until: int = 0
    unfreeze_last_n: int = 0
    partial_until: int = 0


@dataclass
class LoggingSection:
    """Console, JSONL and wandb (offline unless a mode says otherwise; never logs secrets)."""

    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    wandb_project: str = "sci-scale"
    console: bool = True


@dataclass
class ExperimentSection:
    """``sci-scale experiment ablation``: the same model trained as several variants and seeds
    under one token budget, then evaluated alike (docs/science.md)."""

    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    # pair-block rate of the "pairs, no SCL" and "SCI frozen" variants
    pair_rate: float = 0.05
    # the SCI-joint sweep; 0 is the branch with nothing to contrast
    pair_rates: list[float] = field(default_factory=lambda: [0.0, 0.03, 0.05, 0.10])
    # "SCI frozen": an SCI-only phase (backbone fixed, SCL only) of this many steps at this
    # pair-block rate first; its LM tokens are not counted in the budget (the LM does not learn)
    sci_only_steps: int = 100
    sci_only_pair_rate: float = 0.5
    # SCAN test parts scored; training pairs come from the combined split ("a+b": every
    # command all of them train on), so none of these test commands is ever trained on
    scan_splits: list[str] = field(
        default_factory=lambda: ["simple", "length", "template_around_right"]
    )
    eval_limit: int | None = 200  # examples per SCAN split and COGS; None: all
    eval_batch_size: int = 64
    # held-out perplexity on at most this many blocks of data.split's test share (never more
    # than one pass over it; the default corpus's test share is 13 blocks of 256 tokens)
    ppl_blocks: int = 64
    probe_templates: int = 128  # held-out templates (2 examples each) of the structural probe


@dataclass
class Config:
    """The whole run configuration."""

    run: RunSection = field(default_factory=RunSection)
    runtime: RuntimeSection = field(default_factory=RuntimeSection)
    model: ModelSection = field(default_factory=ModelSection)
    sci: SciSection = field(default_factory=SciSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    phases: PhasesSection = field(default_factory=PhasesSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    experiment: ExperimentSection = field(default_factory=ExperimentSection)
