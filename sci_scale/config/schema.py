"""The run configuration as a tree of pydantic models.

One tree is the single source of truth for every knob: YAML files and ``key.sub=value``
overrides are validated against it (see ``loader``), so a typo is an error that names the valid
keys instead of a silently ignored setting.

Validation is strict, because a config that is quietly coerced trains something other than
what was written: ``steps: 1.5`` or ``fuse: "yes"`` are errors, not 1 and True. Two
exceptions follow YAML 1.1, which PyYAML speaks: ``1e-3`` (no dot) is read as a string, so a
float field takes a string that spells a float; and ``mode: off`` is read as False, so a
boolean given to a choice field becomes the spelling meant (off, no, false / on, yes, true).
Ints are accepted where floats are and become floats. No float setting takes NaN or infinity
(``.inf``, ``.nan``, ``"inf"``): every limit that can be lifted is lifted with null instead
(``train.max_wall_minutes``, ``train.loss_spike_factor``), so a non-finite value is a typo or a
placeholder, and one that reached the optimizer would train on NaNs without an error.
"""

from __future__ import annotations

import contextlib
from typing import Annotated, Any, Literal, Self

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    model_validator,
)
from pydantic.types import AllowInfNan


def _float_spelled_as_string(value: Any) -> Any:
    # Only strings: a bool must still fail (strict float rejects it), not become 1.0.
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return float(value)
    return value


def _choice_spelled_as_boolean(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    # The choices are the Literal's own, so try the spellings YAML 1.1 turns into this boolean
    # and keep the first that is one; with none, the boolean itself fails with its own value.
    if isinstance(value, bool):
        for spelling in ("on", "yes", "true") if value else ("off", "no", "false"):
            with contextlib.suppress(ValidationError):
                return handler(spelling)
    return handler(value)


Float = Annotated[float, BeforeValidator(_float_spelled_as_string), AllowInfNan(False)]
_YamlChoice = WrapValidator(_choice_spelled_as_boolean)

SciMode = Annotated[Literal["joint", "frozen", "sci_only", "off"], _YamlChoice]
Pooling = Annotated[Literal["mean", "last", "attention"], _YamlChoice]
Dtype = Annotated[Literal["fp32", "bf16"], _YamlChoice]
ComputeDtype = Annotated[Literal["auto", "fp32", "bf16"], _YamlChoice]
Device = Annotated[Literal["auto", "cuda", "cpu"], _YamlChoice]
TransformerImpl = Annotated[Literal["auto", "local", "transformer_engine"], _YamlChoice]
# megatron-core's AttnBackend names (megatron.core.transformer.enums.AttnBackend)
AttentionBackend = Annotated[Literal["auto", "flash", "fused", "unfused", "local"], _YamlChoice]
Fp8 = Annotated[Literal["delayed", "current"], _YamlChoice]
Recompute = Annotated[Literal["none", "selective", "full"], _YamlChoice]
Corpus = Annotated[Literal["stdlib_docstrings", "jsonl", "indexed", "task"], _YamlChoice]
TokenizerModelType = Annotated[Literal["bpe", "unigram", "word"], _YamlChoice]
WandbMode = Annotated[Literal["offline", "online", "disabled"], _YamlChoice]


class _Section(BaseModel):
    """Unknown keys are errors and nothing is coerced (see the module docstring). Assignment
    is not re-validated, so attributes stay plain to set; code that adjusts a loaded config
    (conversions, benchmarks) builds it with ``replace`` and calls ``validate`` itself."""

    model_config = ConfigDict(extra="forbid", strict=True)

    def replace(self, **changes: Any) -> Self:
        """A copy with ``changes``, each value checked like a loaded one (``model_copy`` would
        take a wrong type silently); the cross-field rules are the caller's ``validate``."""
        return self.model_validate({**dict(self), **changes})


class RuntimeSection(_Section):
    """Where the run executes (see docs/parallel.md, "How the GPU path is chosen")."""

    # auto: CUDA when torch sees a GPU, else the CPU. "cuda" without a usable GPU (or with
    # fewer GPUs than local ranks) is an error, never a silent CPU run.
    device: Device = "auto"


class RunSection(_Section):
    """Where a run writes checkpoints, ``metrics.jsonl``, plots and its data cache."""

    dir: str = "runs/tiny"
    name: str = "tiny"


class ModelSection(_Section):
    """A Llama-style decoder: RMSNorm, RoPE, SwiGLU, grouped-query attention."""

    num_layers: int = 4
    hidden_size: int = 128
    num_attention_heads: int = 4
    num_query_groups: int = 2
    ffn_hidden_size: int | None = None  # None: Llama's rule, 8/3 * hidden rounded up to 64
    seq_length: int = 256
    rotary_base: Float = 10000.0
    norm_epsilon: Float = 1e-5
    tie_embeddings: bool = True
    init_method_std: Float = 0.02
    hidden_dropout: Float = 0.0
    attention_dropout: Float = 0.0
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
    qk_layernorm: bool = False  # RMSNorm over each head's queries and keys before RoPE (Qwen3)
    # Llama-3 RoPE frequency scaling ("rope_type": "llama3"); None: plain RoPE.
    rope_scaling_factor: Float | None = None
    rope_low_freq_factor: Float = 1.0
    rope_high_freq_factor: Float = 4.0
    rope_original_max_positions: int = 8192
    # A backbone trained with sliding-window attention (Mistral): recorded for export, and
    # model.seq_length may not exceed it (sci-scale attends over the whole sequence).
    sliding_window: int | None = None
    # FP8 matmuls through Transformer Engine (GPU only): "delayed" scaling (amax history) or
    # "current" (per-tensor scales from the current step); None: bf16/fp32 as params_dtype.
    fp8: Fp8 | None = None
    # Activation recomputation: "selective" recomputes core attention, "full" whole layers.
    recompute: Recompute = "none"


class SciSection(_Section):
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
    tau: Float = 0.1
    learnable_tau: bool = False
    tau_min: Float = 0.01
    tau_max: Float = 1.0
    alpha: Float = 0.05
    alpha_warmup_steps: int = 0
    lr_scale: Float = 1.0


class DataSection(_Section):
    """Corpus, tokenizer and the structural pairs mixed into ``pair_rate`` of the blocks."""

    # stdlib_docstrings (built in), jsonl (files tokenized at start), indexed (prefixes
    # written by `sci-scale preprocess`, blended by corpus_weights; needs data.tokenizer), or
    # task (the training part of a benchmark, data.task, as prompt -> target examples).
    corpus: Corpus = "stdlib_docstrings"
    corpus_paths: list[str] = Field(default_factory=list)
    corpus_weights: list[Float] = Field(default_factory=list)  # empty: equal weights
    text_key: str = "text"
    max_docs: int | None = None
    # A sentencepiece .model, or a Hugging Face model directory (its tokenizer.json); None:
    # train a sentencepiece tokenizer on the corpus.
    tokenizer: str | None = None
    tokenizer_vocab_size: int = 2048
    tokenizer_model_type: TokenizerModelType = "bpe"
    cache_dir: str | None = None  # None: RUN_DIR/data
    split: str = "98,1,1"
    pair_rate: Float = 0.05
    pair_sources: list[str] = Field(default_factory=lambda: ["scan", "arithmetic"])
    scan_split: str = "simple"
    arithmetic_per_template: int = 40
    cogs_path: str | None = None
    user_pairs_path: str | None = None
    examples_per_template: int = 2
    # data.corpus=task: "scan:<split>" (a published split, or several joined by '+') or "cogs"
    # (data.cogs_path's train.tsv, scored on its gen.tsv); task_dev_examples commands of the
    # training part are held out as the dev set that selects checkpoints.
    task: str | None = None
    task_dev_examples: int = 500
    # LM loss on the target tokens only (after "OUT:") of task and pair examples
    target_loss_only: bool = False
    # each document of a packed block attends only to itself (megatron's reset_attention_mask)
    reset_attention_mask: bool = False


class TrainSection(_Section):
    """Optimisation: AdamW, warm-up + cosine learning rate, clipping, accumulation, eval."""

    steps: int = 300
    micro_batch_size: int = 8
    global_batch_size: int = 16
    seed: int = 1234
    lr: Float = 2e-3
    min_lr: Float = 2e-4
    warmup_steps: int = 20
    weight_decay: Float = 0.1
    adam_beta1: Float = 0.9
    adam_beta2: Float = 0.95
    adam_eps: Float = 1e-8
    clip_grad: Float = 1.0
    log_interval: int = 10
    eval_interval: int = 100
    eval_batches: int = 4
    # Stop cleanly (checkpoint, then exit) after this many minutes; for jobs with a time limit.
    max_wall_minutes: Float | None = None
    # A step (with its eval and checkpoint) longer than this dumps every thread's stack and
    # ends the process, so that a hung job fails and is requeued (train.hang; null: off).
    hang_timeout_s: Float | None = None
    # A step whose loss or gradient norm is not finite is skipped (no optimizer update);
    # this many skipped steps in a row stop the run with an error.
    max_consecutive_skips: int = 5
    # Optional loss-spike policy: also skip a step whose LM loss exceeds this factor times the
    # median of the last ``loss_spike_window`` applied steps' losses (null: off).
    loss_spike_factor: Float | None = None
    loss_spike_window: int = 50


class ParallelSection(_Section):
    """Tensor x pipeline x data parallel layout; data parallelism comes from the world size."""

    tensor: int = 1
    pipeline: int = 1
    virtual_pipeline: int = 1  # model chunks per pipeline rank; > 1: interleaved 1F1B
    zero_stage: int = 0
    # Megatron sequence parallelism: norms and dropout sharded over the sequence within a
    # tensor-parallel group (needs parallel.tensor > 1 and Transformer Engine).
    sequence_parallel: bool = False


class CheckpointSection(_Section):
    """How often to save and how many checkpoints to keep (the newest are kept)."""

    interval: int = 100
    keep_last: int = 2
    save_final: bool = True
    save_initial: bool = False  # also write step 0 (the initial weights) before training
    # Write checkpoints in a forked process while training goes on (the step stalls only for
    # the snapshot); `latest` moves once every rank's writer is done (docs/checkpoints.md).
    async_save: bool = False
    init_from: str | None = None  # a checkpoint directory whose weights start a new run


class PhasesSection(_Section):
    """Continued pretraining of a trained backbone (see ``train.phases``): steps 1..
    ``backbone_frozen_until`` train the SCI branch only; then, until ``partial_until``, the
    backbone's last ``unfreeze_last_n`` layers join; after that everything trains."""

    backbone_frozen_until: int = 0
    unfreeze_last_n: int = 0
    partial_until: int = 0


class LoggingSection(_Section):
    """Console, JSONL and wandb (offline unless a mode says otherwise; never logs secrets)."""

    wandb_mode: WandbMode = "offline"
    wandb_project: str = "sci-scale"
    console: bool = True


class ExperimentSection(_Section):
    """``sci-scale experiment ablation``: the same model trained as several variants and seeds
    under one token budget, then evaluated alike (docs/science.md)."""

    seeds: list[int] = Field(default_factory=lambda: [1, 2, 3])
    # pair-block rate of the "pairs, no SCL" and "SCI frozen" variants
    pair_rate: Float = 0.05
    # the SCI-joint sweep; 0 is the branch with nothing to contrast
    pair_rates: list[Float] = Field(default_factory=lambda: [0.0, 0.03, 0.05, 0.10])
    # "SCI frozen": an SCI-only phase (backbone fixed, SCL only) of this many steps at this
    # pair-block rate first; its LM tokens are not counted in the budget (the LM does not learn)
    sci_only_steps: int = 100
    sci_only_pair_rate: Float = 0.5
    # SCAN test parts scored; training pairs come from the combined split ("a+b": every
    # command all of them train on), so none of these test commands is ever trained on
    scan_splits: list[str] = Field(
        default_factory=lambda: ["simple", "length", "template_around_right"]
    )
    eval_limit: int | None = 200  # examples per SCAN split and COGS; None: all
    eval_batch_size: int = 64
    # held-out perplexity on at most this many blocks of data.split's test share (never more
    # than one pass over it; the default corpus's test share is 13 blocks of 256 tokens)
    ppl_blocks: int = 64
    probe_templates: int = 128  # held-out templates (2 examples each) of the structural probe
    # `experiment generalization`: dev examples decoded per checkpoint to select one (None: all)
    dev_limit: int | None = None
    # test examples scored per run (None: the whole published test part, the default; a limit
    # scores the first N of its fixed order and the report says so)
    test_limit: int | None = None


class SlurmSection(_Section):
    """What a Slurm job needs besides the training (``sci-scale submit``, docs/slurm.md). The
    ``submit`` options ``--max-requeues``, ``--container-image`` and ``--container-mounts``
    override the matching keys."""

    # Shell lines the batch script runs, as written, before the tasks start: `module load`,
    # a venv or conda activation, an env file. The tasks inherit the environment they leave.
    setup: list[str] = Field(default_factory=list)
    # Exported before the tasks start (names checked, values quoted): NCCL and CUDA settings.
    env: dict[str, str] = Field(default_factory=dict)
    # Requeues (after a signal, a time limit, a crash or a node failure) before the job gives
    # up; a configuration error (exit status 2) is never requeued.
    max_restarts: int = 20
    # pyxis/enroot: the image the tasks run in (srun --container-image; null: none) and its
    # mounts (null: the run directory)
    container: str | None = None
    container_mounts: str | None = None
    # Extra options of the srun that starts the tasks, e.g. CPU and GPU binding on GPU nodes:
    # ["--cpu-bind=cores", "--gpu-bind=closest"] (each one argument, quoted).
    srun_args: list[str] = Field(default_factory=list)


class Config(_Section):
    """The whole run configuration."""

    run: RunSection = Field(default_factory=RunSection)
    runtime: RuntimeSection = Field(default_factory=RuntimeSection)
    model: ModelSection = Field(default_factory=ModelSection)
    sci: SciSection = Field(default_factory=SciSection)
    data: DataSection = Field(default_factory=DataSection)
    train: TrainSection = Field(default_factory=TrainSection)
    parallel: ParallelSection = Field(default_factory=ParallelSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    phases: PhasesSection = Field(default_factory=PhasesSection)
    logging: LoggingSection = Field(default_factory=LoggingSection)
    slurm: SlurmSection = Field(default_factory=SlurmSection)
    experiment: ExperimentSection = Field(default_factory=ExperimentSection)

    @model_validator(mode="before")
    @classmethod
    def _empty_sections_are_defaults(cls, data: Any) -> Any:
        # A section written with nothing under it (``model:``) reads as null in YAML.
        if isinstance(data, dict):
            return {k: {} if v is None and k in cls.model_fields else v for k, v in data.items()}
        return data
