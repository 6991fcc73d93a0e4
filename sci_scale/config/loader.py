"""YAML loading, dotted overrides and validation for :class:`~sci_scale.config.schema.Config`.

Hand-written rather than delegated to a config library because the checks users rely on are
specific: an unknown key must name the valid keys of its section, a wrong type must name the
expected type, and layout rules (heads vs. query groups, ``fuse_layer`` range) must say which
numbers conflict. Every failure is a :class:`ConfigError` with a one-line message.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from sci_scale.config.errors import ConfigError
from sci_scale.config.schema import Config


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin is list:
        (inner,) = get_args(tp) or (Any,)
        return f"list[{_type_name(inner)}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are."""
    origin = get_origin(tp)
    if origin is Literal:
        choices = get_args(tp)
        if isinstance(value, bool):
            # YAML 1.1 reads `mode: off` as False; map the boolean back to the spelling meant.
            spellings = ("on", "yes", "true") if value else ("off", "no", "false")
            value = next((c for c in spellings if c in choices), value)
        if value not in choices:
            valid = ", ".join(str(c) for c in choices)
            raise ConfigError(f"{key}: {value!r} is not one of the valid choices: {valid}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        (inner,) = get_args(tp) or (Any,)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected bool (true/false), got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected int, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads 1e-3 (no dot) as a string; read it as the float it spells.
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected float, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected str, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp!r}")  # pragma: no cover - schema bug


def _unknown_key_error(key: str, name: str, valid: list[str]) -> ConfigError:
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown key '{key}'{hint}; valid keys: {', '.join(sorted(valid))}")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in hints:
            raise _unknown_key_error(key, str(name), valid)
        tp = hints[name]
        if _is_dataclass_type(tp):
            kwargs[name] = _build(tp, value if value is not None else {}, f"{key}.")
        else:
            kwargs[name] = _coerce(value, tp, key)
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> Config:
    """Build and validate a :class:`Config` from nested plain data."""
    cfg = _build(Config, data or {}, "")
    validate(cfg)
    return cfg


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form key.sub=value")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"override '{item}': the key must be section.name, e.g. train.steps=10")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        reason = " ".join(str(exc).split())  # PyYAML's message spans several lines
        raise ConfigError(f"override '{item}': value is not valid YAML ({reason})") from None
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Merge ``key.sub=value`` strings into nested data; values are parsed as YAML scalars."""
    for item in overrides:
        parts, value = _parse_override(item)
        node = data
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override '{item}': '{part}' is not a section")
            node = child
        node[parts[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or the defaults when ``path`` is None) and apply overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})".replace("\n", " ")) from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        data = loaded or {}
    data = apply_overrides(data, overrides or [])
    return config_from_dict(data)


def override_config(cfg: Config, overrides: list[str]) -> Config:
    """A copy of ``cfg`` with dotted overrides, validated like a loaded config."""
    return config_from_dict(apply_overrides(config_to_dict(cfg), overrides))


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def validate(cfg: Config) -> None:
    """Cross-field rules; each names the numbers that conflict."""
    m, s, t, d, p = cfg.model, cfg.sci, cfg.train, cfg.data, cfg.parallel
    for key, value in (
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
    ):
        _require(value > 0, f"{key} must be positive, got {value}")
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
    ph = cfg.phases
    _require(
        min(ph.backbone_frozen_until, ph.unfreeze_last_n, ph.partial_until) >= 0,
        "phases.* must be >= 0",
    )
    _require(
        ph.unfreeze_last_n <= m.num_layers,
        f"phases.unfreeze_last_n ({ph.unfreeze_last_n}) exceeds model.num_layers ({m.num_layers})",
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
        t.max_wall_minutes is None or t.max_wall_minutes > 0,
        f"train.max_wall_minutes must be positive (or null for no limit), got {t.max_wall_minutes}",
    )
    e = cfg.experiment
    _require(len(e.seeds) > 0, "experiment.seeds is empty: give at least one seed")
    _require(len(set(e.seeds)) == len(e.seeds), f"experiment.seeds repeats a seed: {e.seeds}")
    for key, rate in [("experiment.pair_rate", e.pair_rate),
                      ("experiment.sci_only_pair_rate", e.sci_only_pair_rate),
                      *(("experiment.pair_rates", r) for r in e.pair_rates)]:  # fmt: skip
        _require(0.0 <= rate < 1.0, f"{key} must be in [0, 1), got {rate}")
    _require(
        e.eval_limit is None or e.eval_limit > 0,
        f"experiment.eval_limit must be positive (or null for every example), got {e.eval_limit}",
    )
    for key, value in (
        ("experiment.sci_only_steps", e.sci_only_steps),
        ("experiment.ppl_blocks", e.ppl_blocks),
        ("experiment.probe_templates", e.probe_templates),
        ("experiment.eval_batch_size", e.eval_batch_size),
    ):
        _require(value > 0, f"{key} must be positive, got {value}")
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
    _require(
        t.global_batch_size % t.micro_batch_size == 0,
        f"train.global_batch_size ({t.global_batch_size}) must be a multiple of "
        f"train.micro_batch_size ({t.micro_batch_size})",
    )
    _require(0.0 <= d.pair_rate < 1.0, f"data.pair_rate must be in [0, 1), got {d.pair_rate}")
    _require(
        d.examples_per_template >= 2,
        f"data.examples_per_template must be >= 2 (anchor + partner), got "
        f"{d.examples_per_template}",
    )
    valid_sources = ("scan", "arithmetic", "cogs", "user")
    for src in d.pair_sources:
        _require(
            src in valid_sources,
            f"data.pair_sources: {src!r} is not one of the valid choices: "
            f"{', '.join(valid_sources)}",
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
    _require(t.lr > 0 and t.min_lr >= 0, "train.lr must be > 0 and train.min_lr >= 0")
    _require(t.min_lr <= t.lr, f"train.min_lr ({t.min_lr}) must not exceed train.lr ({t.lr})")
    if s.mode != "off":
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
            f"sci.tau ({s.tau}) must lie in [sci.tau_min, sci.tau_max] = "
            f"[{s.tau_min}, {s.tau_max}]",
        )
        _require(s.alpha >= 0, f"sci.alpha must be >= 0, got {s.alpha}")
    validate_implementation(cfg)


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
