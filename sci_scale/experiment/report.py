"""REPORT.md and its plots from the ablation's per-run figures.

Cells are mean ± sample standard deviation over seeds. Perplexity is also given relative to
the vanilla LM of the same seed (the variants of one seed share a tokenizer; different seeds do
not, so absolute perplexities carry tokenizer variation that the paired ratio removes).
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sci_scale.config.schema import Config
from sci_scale.experiment.variants import Variant, percent

Record = dict[str, Any]

PROBE_METRICS = (
    ("recall_at_1", "R@1"),
    ("recall_at_5", "R@5"),
    ("mrr", "MRR"),
    ("cos_gap", "cos gap"),
    ("cos_auroc", "AUROC"),
    ("alignment", "align"),
    ("uniformity", "unif"),
    ("rankme", "RankMe"),
    ("alpha_req", "alpha-ReQ"),
)


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return math.nan, math.nan
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.fmean(values), sd


def cell(values: Sequence[float], fmt: str = "{:.3f}", scale: float = 1.0) -> str:
    mean, sd = mean_sd([v * scale for v in values])
    if math.isnan(mean):
        return "n/a"
    return f"{fmt.format(mean)} ± {fmt.replace('+', '').format(sd)}"


def _by_variant(records: list[Record]) -> dict[str, list[Record]]:
    out: dict[str, list[Record]] = {}
    for r in records:
        out.setdefault(r["variant"], []).append(r)
    return out


def _values(records: list[Record], key: str) -> list[float]:
    return [r["figures"][key] for r in records if key in r["figures"]]


def _paired(
    records: list[Record], baseline: list[Record], fn: Callable[[float, float], float], key: str
) -> list[float]:
    base = {r["seed"]: r["figures"].get(key) for r in baseline}
    return [
        fn(r["figures"][key], base[r["seed"]])
        for r in records
        if key in r["figures"] and base.get(r["seed"]) is not None
    ]


def _scan_splits(cfg: Config) -> list[str]:
    return list(cfg.experiment.scan_splits)


def main_table(cfg: Config, variants: list[Variant], groups: dict[str, list[Record]]) -> str:
    has_cogs = any("cogs" in r["figures"] for rs in groups.values() for r in rs)
    header = ["variant", "held-out ppl", "ppl vs vanilla"]
    header += [f"SCAN {s}" for s in _scan_splits(cfg)]
    header += ["COGS"] if has_cogs else []
    header += ["probe R@1 (backbone)", "probe gap (backbone)", "probe R@1 (SCI)", "gap (SCI)"]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    vanilla = groups.get("vanilla", [])
    for v in variants:
        rs = groups.get(v.key, [])
        ratio = _paired(rs, vanilla, lambda a, b: a / b - 1.0, "heldout_ppl")
        row = [f"{v.label} (n={len(rs)})", cell(_values(rs, "heldout_ppl"), "{:.2f}")]
        row.append(cell(ratio, "{:+.2f}%", 100.0) if v.key != "vanilla" else "(baseline)")
        row += [cell(_values(rs, f"scan_{s}"), "{:.1f}%", 100.0) for s in _scan_splits(cfg)]
        if has_cogs:
            row.append(cell(_values(rs, "cogs"), "{:.1f}%", 100.0))
        row += [cell(_values(rs, "backbone_recall_at_1")), cell(_values(rs, "backbone_cos_gap"))]
        if v.has_branch:
            row += [cell(_values(rs, "sci_recall_at_1")), cell(_values(rs, "sci_cos_gap"))]
        else:
            row += ["no branch", "no branch"]
        rows.append("| " + " | ".join(row) + " |")
    return "\n".join(rows)


def probe_table(variants: list[Variant], groups: dict[str, list[Record]]) -> str:
    header = ["variant", "representation", *(name for _, name in PROBE_METRICS)]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for v in variants:
        rs = groups.get(v.key, [])
        for prefix, what in (("backbone", "backbone mean-pool"), ("sci", "SCI z")):
            if prefix == "sci" and not v.has_branch:
                continue
            cells = [cell(_values(rs, f"{prefix}_{k}")) for k, _ in PROBE_METRICS]
            rows.append("| " + " | ".join([v.label, what, *cells]) + " |")
    return "\n".join(rows)


def paired_table(
    cfg: Config, variants: list[Variant], groups: dict[str, list[Record]], baseline_key: str
) -> str:
    """Each variant minus ``baseline_key`` within a seed, mean ± sd over seeds."""
    keys = [("heldout_ppl", "ppl", "{:+.2f}%", 100.0, True)]
    keys += [(f"scan_{s}", f"SCAN {s}", "{:+.1f} pts", 100.0, False) for s in _scan_splits(cfg)]
    if any("cogs" in r["figures"] for rs in groups.values() for r in rs):
        keys.append(("cogs", "COGS", "{:+.1f} pts", 100.0, False))
    keys.append(("backbone_recall_at_1", "probe R@1 (backbone)", "{:+.3f}", 1.0, False))
    header = ["variant", *(k[1] for k in keys)]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    base = groups.get(baseline_key, [])
    for v in variants:
        if v.key == baseline_key:
            continue
        rs = groups.get(v.key, [])
        row = [v.label]
        for key, _, fmt, scale, relative in keys:

            def diff(a: float, b: float, relative: bool = relative) -> float:
                return a / b - 1.0 if relative else a - b

            row.append(cell(_paired(rs, base, diff, key), fmt, scale))
        rows.append("| " + " | ".join(row) + " |")
    return "\n".join(rows)


# -- plots ---------------------------------------------------------------------------------
def _read_metrics(path: str) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def _curve(records: list[Record], key: str, window: int = 1) -> tuple[list[int], list[float]]:
    """Mean over seeds of ``key`` at each step it was logged (trailing-window mean)."""
    per_step: dict[int, list[float]] = {}
    for r in records:
        rows = [m for m in _read_metrics(r["metrics"]) if m.get(key) is not None]
        for i, m in enumerate(rows):
            recent = [x[key] for x in rows[max(0, i - window + 1) : i + 1]]
            per_step.setdefault(m["step"], []).append(sum(recent) / len(recent))
    steps = sorted(per_step)
    return steps, [statistics.fmean(per_step[s]) for s in steps]


def plot_curves(out: Path, variants: list[Variant], groups: dict[str, list[Record]]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for v in variants:
        rs = groups.get(v.key, [])
        steps, values = _curve(rs, "lm_loss", window=10)
        axes[0].plot(steps, values, label=v.label)
        steps, values = _curve(rs, "eval_lm_loss")
        axes[1].plot(steps, values, marker="o", label=v.label)
    axes[0].set(title="training LM loss (10-step mean, mean over seeds)", xlabel="step")
    axes[1].set(title="validation LM loss (mean over seeds)", xlabel="step")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=110)
    plt.close(fig)
    written.append("loss_curves.png")

    metrics = [("eval_sci_recall_at_1", "SCI R@1"), ("eval_sci_cos_gap", "SCI cosine gap"),
               ("eval_sci_rankme", "SCI RankMe"), ("eval_scl_loss", "held-out SCL")]  # fmt: skip
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 4))
    for v in variants:
        if not v.has_branch:
            continue
        for ax, (key, _) in zip(axes, metrics, strict=True):
            steps, values = _curve(groups.get(v.key, []), key)
            if steps:
                ax.plot(steps, values, marker="o", label=v.label)
    for ax, (_, title) in zip(axes, metrics, strict=True):
        ax.set(title=f"{title} at eval steps", xlabel="step")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "metric_curves.png", dpi=110)
    plt.close(fig)
    written.append("metric_curves.png")
    return written


def plot_rate_sweep(
    out: Path, cfg: Config, variants: list[Variant], groups: dict[str, list[Record]]
) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = [v for v in variants if v.sci_mode == "joint"]
    rates = [v.pair_rate * 100 for v in sweep]
    vanilla = groups.get("vanilla", [])
    panels: list[tuple[str, list[tuple[str, Callable[[list[Record]], list[float]]]]]] = [
        ("held-out ppl vs vanilla (%)", [("ppl", lambda rs: [
            100 * x for x in _paired(rs, vanilla, lambda a, b: a / b - 1.0, "heldout_ppl")])]),
        ("SCAN exact match (%)", [(s, lambda rs, s=s: [100 * x for x in _values(rs, f"scan_{s}")])
                                  for s in _scan_splits(cfg)]),
        ("structural probe R@1", [("backbone", lambda rs: _values(rs, "backbone_recall_at_1")),
                                  ("SCI z", lambda rs: _values(rs, "sci_recall_at_1"))]),
    ]  # fmt: skip
    fig, axes = plt.subplots(1, len(panels), figsize=(13, 4))
    for ax, (title, series) in zip(axes, panels, strict=True):
        for name, fn in series:
            stats = [mean_sd(fn(groups.get(v.key, []))) for v in sweep]
            ax.errorbar(rates, [m for m, _ in stats], yerr=[s for _, s in stats],
                        marker="o", capsize=3, label=name)  # fmt: skip
        ax.set(title=title, xlabel="pair-block rate (%)")
        ax.legend(fontsize=7)
    fig.suptitle("SCI joint: pair-rate sweep (mean ± sd over seeds)")
    fig.tight_layout()
    fig.savefig(out / "rate_sweep.png", dpi=110)
    plt.close(fig)
    return "rate_sweep.png"


# -- the report ----------------------------------------------------------------------------
def write_report(
    out: Path,
    cfg: Config,
    variants: list[Variant],
    records: list[Record],
    command: str,
    wall_s: float,
) -> Path:
    groups = _by_variant(records)
    plots = plot_curves(out, variants, groups)
    plots.append(plot_rate_sweep(out, cfg, variants, groups))
    m, t, e, d = cfg.model, cfg.train, cfg.experiment, cfg.data
    tokens = t.steps * t.global_batch_size * m.seq_length
    train_min = sum(r["train_s"] for r in records) / 60
    eval_min = sum(r["eval_s"] for r in records) / 60
    token_counts = {
        r["figures"]["heldout_tokens"] for r in records if "heldout_tokens" in r["figures"]
    }
    ppl_tokens = ", ".join(f"{n:,}" for n in sorted(token_counts)) or "n/a"
    probe_n = statistics.fmean(r["figures"].get("probe_examples", 0) for r in records)
    lines = [
        "# SCI ablation report",
        "",
        f"Command: `{command}`" if command else "",
        "",
        f"- Model: {m.num_layers} layers, hidden {m.hidden_size}, {m.num_attention_heads} heads, "
        f"sequence {m.seq_length}; SCI branch {cfg.sci.num_layers} layers x "
        f"{cfg.sci.hidden_size}, fused at layer {cfg.sci.fuse_layer}, alpha {cfg.sci.alpha}, "
        f"tau {cfg.sci.tau}.",
        f"- Budget per run: {t.steps} steps x {t.global_batch_size} blocks x {m.seq_length} "
        f"tokens = {tokens:,} tokens; seeds {', '.join(map(str, e.seeds))}.",
        f"- Pair sources: {', '.join(d.pair_sources)}; SCAN training pairs from "
        f"`{d.scan_split}` (the train part of every evaluated split).",
        f"- SCI frozen: {e.sci_only_steps} SCI-only steps at {percent(e.sci_only_pair_rate)} "
        "pair blocks first (backbone fixed), then the LM run with the branch frozen.",
        f"- Evaluation: held-out perplexity on {ppl_tokens} tokens of the corpus's test share "
        f"(up to {e.ppl_blocks} blocks, one pass at most); "
        f"SCAN/COGS greedy exact match on the first {e.eval_limit or 'all'} test examples; "
        f"structural probe on {probe_n:.0f} held-out examples (2 per template).",
        f"- Compute: {len(records)} runs, {train_min:.1f} min training (SCI-only phases "
        f"included) + {eval_min:.1f} min evaluation, summed over runs, on "
        f"{platform.machine()} with {os.cpu_count()} CPU(s); this invocation took "
        f"{wall_s / 60:.1f} min (runs finished before are read back, not retrained).",
        "",
        'Cells: mean ± sd over seeds. "ppl vs vanilla" pairs each run with the vanilla run of '
        "its seed.",
        "",
        "## Results",
        "",
        main_table(cfg, variants, groups),
        "",
        "## Paired differences against LM + pairs without SCL",
        "",
        "Does the contrastive loss add anything over showing the same pairs as text? Each "
        "variant minus the `pairs_no_scl` run of the same seed.",
        "",
        paired_table(cfg, variants, groups, "pairs_no_scl"),
        "",
        "## Structural probe, every metric",
        "",
        "Held-out examples run one at a time; backbone = final hidden states mean-pooled over "
        "the example, SCI z = the branch's embedding.",
        "",
        probe_table(variants, groups),
        "",
        "## Plots",
        "",
        *(f"![{p}]({p})" for p in plots),
        "",
    ]
    path = out / "REPORT.md"
    path.write_text("\n".join(lines))
    return path
