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


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def _require_positive(*pairs: tuple[str, int]) -> None:
    for key, value in pairs:
        _require(value > 0, f"{key} must be positive, got {value}")


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
    )


def _model_shape(cfg: Config) -> None:
    m = cfg.model
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
    t = cfg.train
    _require(
        t.max_wall_minutes is None or t.max_wall_minutes > 0,
        f"train.max_wall_minutes must be positive (or null for no limit), got {t.max_wall_minutes}",
    )
    _require(
        t.global_batch_size % t.micro_batch_size == 0,
        f"train.global_batch_size ({t.global_batch_size}) must be a multiple of "
        f"train.micro_batch_size ({t.micro_batch_size})",
    )
    _require(t.lr > 0 and t.min_lr >= 0, "train.lr must be > 0 and train.min_lr >= 0")
    _require(t.min_lr <= t.lr, f"train.min_lr ({t.min_lr}) must not exceed train.lr ({t.lr})")


PAIR_SOURCES = ("scan", "arithmetic", "cogs", "user")


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
    _require(s.alpha >= 0, f"sci.alpha must be >= 0, got {s.alpha}")


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
