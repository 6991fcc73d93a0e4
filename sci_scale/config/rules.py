"""Cross-field rules of a :class:`~sci_scale.config.schema.Config`.

The schema checks each value on its own; these rules check values against each other (heads
vs. query groups, ``fuse_layer`` vs. the first pipeline stage, ZeRO vs. pipelining). Each
failure is a one-line :class:`ConfigError` that names the numbers that conflict, so the fix
is readable from the message. The rules run in a fixed order, sizes first, because later
rules divide by them.
"""

from __future__ import annotations

from sci_scale.config.errors import ConfigError
from sci_scale.config.schema import Config
from sci_scale.config.split import split_weights
from sci_scale.config.task import check_task


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def _require_positive(*pairs: tuple[str, int | float]) -> None:
    for key, value in pairs:
        _require(value > 0, f"{key} must be positive, got {value}")


def _require_at_least(low: int | float, *pairs: tuple[str, int | float]) -> None:
    for key, value in pairs:
        _require(value >= low, f"{key} must be >= {low}, got {value}")


def _require_probability(*pairs: tuple[str, float]) -> None:
    """Dropout rates: 1 would drop every activation (and torch refuses more than 1)."""
    for key, value in pairs:
        _require(0.0 <= value < 1.0, f"{key} must be in [0, 1), got {value}")


def _sizes(cfg: Config) -> None:
    """The sizes that every other rule divides by or counts with."""
    m, t, p = cfg.model, cfg.train, cfg.parallel
    _require_positive(
        ("model.num_layers", m.num_layers),
        ("model.hidden_size", m.hidden_size),
        ("model.num_attention_heads", m.num_attention_heads),
        ("model.num_query_groups", m.num_query_groups),
        ("model.seq_length", m.seq_length),
        ("train.steps", t.steps),
        ("train.micro_batch_size", t.micro_batch_size),
        ("train.global_batch_size", t.global_batch_size),
        ("parallel.tensor", p.tensor),
        ("parallel.pipeline", p.pipeline),
        ("checkpoint.interval", cfg.checkpoint.interval),
        ("train.log_interval", t.log_interval),
        ("train.eval_interval", t.eval_interval),
        ("train.eval_batches", t.eval_batches),
    )


def _model_shape(cfg: Config) -> None:
    m = cfg.model
    _require_probability(
        ("model.hidden_dropout", m.hidden_dropout),
        ("model.attention_dropout", m.attention_dropout),
    )
    _require_positive(
        ("model.norm_epsilon", m.norm_epsilon),
        ("model.init_method_std", m.init_method_std),
        ("model.rotary_base", m.rotary_base),
    )
    _require(
        m.rope_scaling_factor is None or 0 < m.rope_low_freq_factor < m.rope_high_freq_factor,
        f"model.rope_low_freq_factor ({m.rope_low_freq_factor}) and model.rope_high_freq_factor "
        f"({m.rope_high_freq_factor}) must satisfy 0 < low < high: Llama-3 RoPE scaling "
        "interpolates between the two",
    )
    _require(
        m.sliding_window is None or m.seq_length <= m.sliding_window,
        f"model.seq_length ({m.seq_length}) exceeds model.sliding_window ({m.sliding_window}): "
        "the backbone was trained to attend only that far back, and sci-scale attends over the "
        "whole sequence; train at seq_length <= sliding_window",
    )
    _require(
        m.rope_scaling_factor is None or m.rope_scaling_factor >= 1.0,
        f"model.rope_scaling_factor must be >= 1, got {m.rope_scaling_factor}",
    )
    _require(
        m.hidden_size % m.num_attention_heads == 0,
        f"model.hidden_size ({m.hidden_size}) must be divisible by "
        f"model.num_attention_heads ({m.num_attention_heads})",
    )
    _require(
        m.num_attention_heads % m.num_query_groups == 0,
        f"model.num_attention_heads ({m.num_attention_heads}) must be divisible by "
        f"model.num_query_groups ({m.num_query_groups})",
    )


def _parallel_layout(cfg: Config) -> None:
    """How the model splits over tensor and pipeline ranks, and what DeepSpeed allows with it
    (the world size is checked when it is known: ``layout.data_parallel_size``)."""
    m, s, p = cfg.model, cfg.sci, cfg.parallel
    _require(
        m.num_attention_heads % p.tensor == 0,
        f"model.num_attention_heads ({m.num_attention_heads}) must be divisible by "
        f"parallel.tensor ({p.tensor})",
    )
    _require(
        m.num_query_groups % p.tensor == 0,
        f"model.num_query_groups ({m.num_query_groups}) must be divisible by "
        f"parallel.tensor ({p.tensor})",
    )
    _require(
        m.num_layers % p.pipeline == 0,
        f"model.num_layers ({m.num_layers}) must be divisible by parallel.pipeline ({p.pipeline})",
    )
    _require(
        0 <= p.zero_stage <= 3, f"parallel.zero_stage must be 0, 1, 2 or 3, got {p.zero_stage}"
    )
    _require(p.virtual_pipeline >= 1, "parallel.virtual_pipeline must be >= 1")
    if p.virtual_pipeline > 1:
        _require(
            p.pipeline > 1,
            f"parallel.virtual_pipeline={p.virtual_pipeline} needs parallel.pipeline > 1",
        )
        _require(
            m.num_layers % (p.pipeline * p.virtual_pipeline) == 0,
            f"model.num_layers ({m.num_layers}) must be divisible by parallel.pipeline x "
            f"parallel.virtual_pipeline ({p.pipeline} x {p.virtual_pipeline})",
        )
        _require(
            p.zero_stage == 0,
            f"parallel.virtual_pipeline={p.virtual_pipeline} with parallel.zero_stage="
            f"{p.zero_stage}: DeepSpeed wraps one model, not a list of pipeline chunks; "
            "use zero_stage 0",
        )
    _require(
        p.pipeline == 1 or p.zero_stage <= 1,
        f"parallel.zero_stage={p.zero_stage} with parallel.pipeline={p.pipeline}: DeepSpeed "
        "partitions gradients (ZeRO-2/3) only without pipeline parallelism; use zero_stage 0 or 1",
    )
    _require(
        p.pipeline == 1 or p.zero_stage == 0 or s.lr_scale == 1.0 or s.mode == "off",
        f"sci.lr_scale={s.lr_scale} with parallel.pipeline={p.pipeline} and ZeRO: the SCI "
        "branch's own optimizer groups exist only on the first stage, and DeepSpeed needs the "
        "same groups on every stage; use sci.lr_scale=1 or parallel.zero_stage=0",
    )


def _training(cfg: Config) -> None:
    """The optimiser's and the step policy's numbers: NaN and infinity are refused by the
    schema already, so these are the ranges within which each one means something."""
    t = cfg.train
    _require(
        t.hang_timeout_s is None or t.hang_timeout_s > 0,
        f"train.hang_timeout_s must be positive (or null: no hang watch), got {t.hang_timeout_s}",
    )
    _require(
        t.max_wall_minutes is None or t.max_wall_minutes > 0,
        f"train.max_wall_minutes must be positive (or null for no limit), got {t.max_wall_minutes}",
    )
    _require(
        t.global_batch_size % t.micro_batch_size == 0,
        f"train.global_batch_size ({t.global_batch_size}) must be a multiple of "
        f"train.micro_batch_size ({t.micro_batch_size})",
    )
    _require_positive(("train.lr", t.lr), ("train.adam_eps", t.adam_eps))
    _require_at_least(
        0,
        ("train.min_lr", t.min_lr),
        ("train.warmup_steps", t.warmup_steps),
        ("train.weight_decay", t.weight_decay),
    )
    _require(t.min_lr <= t.lr, f"train.min_lr ({t.min_lr}) must not exceed train.lr ({t.lr})")
    for key, beta in (("train.adam_beta1", t.adam_beta1), ("train.adam_beta2", t.adam_beta2)):
        _require(0.0 <= beta < 1.0, f"{key} must be in [0, 1), got {beta}")
    _require(
        t.clip_grad >= 0, f"train.clip_grad must be >= 0 (0 turns clipping off), got {t.clip_grad}"
    )
    _require_at_least(1, ("train.max_consecutive_skips", t.max_consecutive_skips))
    _require(
        t.loss_spike_factor is None or t.loss_spike_factor > 1,
        f"train.loss_spike_factor must be > 1 (or null for no spike policy), got "
        f"{t.loss_spike_factor}",
    )
    _require_at_least(2, ("train.loss_spike_window", t.loss_spike_window))


PAIR_SOURCES = ("scan", "arithmetic", "cogs", "user")


def _split(cfg: Config) -> None:
    train, valid, _ = split_weights(cfg.data.split)
    _require(
        train > 0 and valid > 0,
        f"data.split={cfg.data.split!r} leaves the {'training' if train == 0 else 'validation'} "
        "share empty: training reads the first share and evaluates on the second (e.g. 98,1,1)",
    )


def _data(cfg: Config) -> None:
    d = cfg.data
    _require(
        d.corpus != "indexed" or d.tokenizer is not None,
        "data.corpus is 'indexed': set data.tokenizer to the tokenizer the corpora were "
        "preprocessed with",
    )
    _require(
        not d.corpus_weights or len(d.corpus_weights) == len(d.corpus_paths),
        f"data.corpus_weights has {len(d.corpus_weights)} weight(s) for "
        f"{len(d.corpus_paths)} data.corpus_paths",
    )
    _require(
        all(w > 0 for w in d.corpus_weights),
        f"data.corpus_weights must be positive, got {d.corpus_weights}",
    )
    _split(cfg)
    _require(
        d.max_docs is None or d.max_docs > 0,
        f"data.max_docs must be positive (or null for every document), got {d.max_docs}",
    )
    _require(0.0 <= d.pair_rate < 1.0, f"data.pair_rate must be in [0, 1), got {d.pair_rate}")
    _require(
        d.examples_per_template >= 2,
        f"data.examples_per_template must be >= 2 (anchor + partner), got "
        f"{d.examples_per_template}",
    )
    for src in d.pair_sources:
        _require(
            src in PAIR_SOURCES,
            f"data.pair_sources: {src!r} is not one of the valid choices: "
            f"{', '.join(PAIR_SOURCES)}",
        )
    _require(
        "cogs" not in d.pair_sources or d.cogs_path is not None,
        "data.pair_sources includes 'cogs' but data.cogs_path is not set",
    )
    _require(
        "user" not in d.pair_sources or d.user_pairs_path is not None,
        "data.pair_sources includes 'user' but data.user_pairs_path is not set",
    )
    _require(
        d.corpus not in ("jsonl", "indexed") or bool(d.corpus_paths),
        f"data.corpus is {d.corpus!r} but data.corpus_paths is empty",
    )
    check_task(cfg)


def _phases(cfg: Config) -> None:
    ph, p = cfg.phases, cfg.parallel
    _require(
        min(ph.backbone_frozen_until, ph.unfreeze_last_n, ph.partial_until) >= 0,
        "phases.* must be >= 0",
    )
    _require(
        ph.unfreeze_last_n <= cfg.model.num_layers,
        f"phases.unfreeze_last_n ({ph.unfreeze_last_n}) exceeds model.num_layers "
        f"({cfg.model.num_layers})",
    )
    _require(
        ph.partial_until == 0 or ph.partial_until >= ph.backbone_frozen_until,
        f"phases.partial_until ({ph.partial_until}) must come after "
        f"phases.backbone_frozen_until ({ph.backbone_frozen_until})",
    )
    _require(
        (ph.backbone_frozen_until == 0 and ph.partial_until == 0) or p.zero_stage == 0,
        f"phases with parallel.zero_stage={p.zero_stage}: DeepSpeed steps its flat partitions "
        "whole, so frozen parameters would still decay; use parallel.zero_stage=0",
    )


def _experiment(cfg: Config) -> None:
    e = cfg.experiment
    _require(len(e.seeds) > 0, "experiment.seeds is empty: give at least one seed")
    _require(len(set(e.seeds)) == len(e.seeds), f"experiment.seeds repeats a seed: {e.seeds}")
    rates = [("experiment.pair_rate", e.pair_rate),
             ("experiment.sci_only_pair_rate", e.sci_only_pair_rate),
             *(("experiment.pair_rates", r) for r in e.pair_rates)]  # fmt: skip
    for key, rate in rates:
        _require(0.0 <= rate < 1.0, f"{key} must be in [0, 1), got {rate}")
    _require(
        e.eval_limit is None or e.eval_limit > 0,
        f"experiment.eval_limit must be positive (or null for every example), got {e.eval_limit}",
    )
    _require_positive(
        ("experiment.sci_only_steps", e.sci_only_steps),
        ("experiment.ppl_blocks", e.ppl_blocks),
        ("experiment.probe_templates", e.probe_templates),
        ("experiment.eval_batch_size", e.eval_batch_size),
    )


def _sci_branch(cfg: Config) -> None:
    """Only a branch that exists is checked: with ``sci.mode=off`` its settings are unused."""
    m, s, p = cfg.model, cfg.sci, cfg.parallel
    if s.mode == "off":
        return
    layers_per_stage = m.num_layers // (p.pipeline * p.virtual_pipeline)
    _require(
        0 <= s.fuse_layer < m.num_layers,
        f"sci.fuse_layer ({s.fuse_layer}) is out of range: the backbone has layers "
        f"0..{m.num_layers - 1}",
    )
    _require(
        s.fuse_layer < layers_per_stage,
        f"sci.fuse_layer ({s.fuse_layer}) must fall on the first pipeline stage, which holds "
        f"layers 0..{layers_per_stage - 1} at parallel.pipeline={p.pipeline}"
        + (f" x virtual_pipeline={p.virtual_pipeline}" if p.virtual_pipeline > 1 else ""),
    )
    _require_positive(("sci.num_attention_heads", s.num_attention_heads))
    _require(
        s.hidden_size % s.num_attention_heads == 0,
        f"sci.hidden_size ({s.hidden_size}) must be divisible by "
        f"sci.num_attention_heads ({s.num_attention_heads})",
    )
    _require(
        s.num_attention_heads % p.tensor == 0,
        f"sci.num_attention_heads ({s.num_attention_heads}) must be divisible by "
        f"parallel.tensor ({p.tensor})",
    )
    _require(
        m.recompute != "full" or s.fuse_layer == 0,
        f"model.recompute=full with sci.fuse_layer={s.fuse_layer}: full recomputation re-runs "
        "layers inside megatron's checkpoint, where the SCI fusion and SCL gradient cannot be "
        "replayed; use sci.fuse_layer=0, model.recompute=selective, or sci.mode=off",
    )
    _require(s.num_layers > 0, f"sci.num_layers must be positive, got {s.num_layers}")
    _require(s.tau > 0, f"sci.tau must be positive, got {s.tau}")
    _require(
        0 < s.tau_min <= s.tau <= s.tau_max,
        f"sci.tau ({s.tau}) must lie in [sci.tau_min, sci.tau_max] = [{s.tau_min}, {s.tau_max}]",
    )
    _require_at_least(
        0,
        ("sci.alpha", s.alpha),
        ("sci.alpha_warmup_steps", s.alpha_warmup_steps),
        ("sci.lr_scale", s.lr_scale),
    )


def validate_implementation(cfg: Config) -> None:
    """Implementation choices that cannot work together, whatever the machine (what the
    machine offers is checked when the run starts: ``runtime.device``, ``model.specs``)."""
    m, p, device = cfg.model, cfg.parallel, cfg.runtime.device
    _require(
        not p.sequence_parallel or p.tensor > 1,
        "parallel.sequence_parallel=true needs parallel.tensor > 1: sequence parallelism "
        "shards activations over the tensor-parallel group, which has 1 rank",
    )
    _require(
        not p.sequence_parallel or m.transformer_impl != "local",
        "parallel.sequence_parallel=true with model.transformer_impl=local: megatron's local "
        "RMSNorm does not support sequence parallelism; use model.transformer_impl="
        "transformer_engine (or auto on a GPU with Transformer Engine)",
    )
    _require(
        m.fp8 is None or m.transformer_impl != "local",
        f"model.fp8={m.fp8} with model.transformer_impl=local: FP8 matmuls come from "
        "Transformer Engine; use model.transformer_impl=transformer_engine or auto",
    )
    _require(
        m.attention_backend != "local" or m.transformer_impl != "transformer_engine",
        "model.attention_backend=local is megatron's own core attention of the local spec; "
        "with model.transformer_impl=transformer_engine choose flash, fused, unfused or auto",
    )
    if device == "cpu":
        _require(
            m.attention_backend not in ("flash", "fused", "local"),
            f"model.attention_backend={m.attention_backend} with runtime.device=cpu: flash and "
            "fused attention are GPU kernels, and megatron's local attention builds its mask on "
            "CUDA; use auto or unfused",
        )
        _require(
            m.transformer_impl != "transformer_engine",
            "model.transformer_impl=transformer_engine with runtime.device=cpu: Transformer "
            "Engine runs on GPUs only; use auto or local",
        )
        _require(
            m.fp8 is None,
            f"model.fp8={m.fp8} with runtime.device=cpu: FP8 needs a GPU with Transformer Engine",
        )


RULES = (_sizes, _model_shape, _parallel_layout, _training, _data, _phases, _experiment,
         _sci_branch, validate_implementation)  # fmt: skip


def validate(cfg: Config) -> None:
    """Every cross-field rule, sizes first; the first that fails raises its ConfigError."""
    for rule in RULES:
        rule(cfg)
