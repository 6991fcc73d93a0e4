"""The ablation report from synthetic run records: a reader trusts each cell to be the seeds'
mean ± sd, each paired difference to pair runs of one seed, and every named plot to exist, so
these are checked against numbers computed here, without training anything."""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path
from typing import Any

import pytest

from sci_scale.config import Config, load_config
from sci_scale.experiment.report import (
    PROBE_METRICS,
    Record,
    _curve,
    cell,
    main_table,
    mean_sd,
    paired_table,
    probe_table,
    write_report,
)
from sci_scale.experiment.variants import Variant, ablation_variants

REPO = Path(__file__).resolve().parents[1]
SEEDS = (1, 2)
KEYS = ("vanilla", "pairs_no_scl", "sci_joint_5pct")  # two branchless variants and one with SCI
PLOTS = {"loss_curves.png", "metric_curves.png", "rate_sweep.png"}
PNG = b"\x89PNG\r\n\x1a\n"

# Held-out perplexity per variant and seed, chosen so that pairing across seeds would give other
# differences (and another sd) than pairing within a seed.
PPL = {
    "vanilla": {1: 200.0, 2: 210.0},
    "pairs_no_scl": {1: 190.0, 2: 220.0},
    "sci_joint_5pct": {1: 180.0, 2: 231.0},
}


@pytest.fixture(scope="module")
def cfg() -> Config:
    return load_config(REPO / "configs" / "ablation.yaml")


@pytest.fixture(scope="module")
def variants(cfg: Config) -> list[Variant]:
    by_key = {v.key: v for v in ablation_variants(cfg)}
    return [by_key[k] for k in KEYS]


def _spread(base: float, j: int, seed: int) -> float:
    """Seed values ``base ± d`` (d differing per variant): the means sit on the displayed grid,
    far from a rounding boundary, and within-seed differences have a non-zero sd."""
    d = 0.01 * (j + 1)
    return round(base + (d if seed == 2 else -d), 6)


def figures_for(cfg: Config, v: Variant, seed: int) -> dict[str, float]:
    j = KEYS.index(v.key)
    figures = {
        "heldout_ppl": PPL[v.key][seed],
        "heldout_tokens": 3072 + 256 * seed,  # seeds differ in tokenizer, so in token count
        "probe_examples": 256,
    }
    for i, split in enumerate(cfg.experiment.scan_splits):
        figures[f"scan_{split}"] = _spread(0.1 + 0.2 * i + 0.05 * j, j, seed)
    prefixes = ("backbone", "sci") if v.has_branch else ("backbone",)
    for p, prefix in enumerate(prefixes):
        for i, (metric, _) in enumerate(PROBE_METRICS):
            figures[f"{prefix}_{metric}"] = _spread(0.2 + 0.05 * i + 0.1 * j + 0.3 * p, j, seed)
    return figures


def write_metrics(path: Path, rows: list[dict[str, Any]]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def make_records(cfg: Config, variants: list[Variant], root: Path) -> list[Record]:
    """Records as the ablation writes them; seed 2 before seed 1 for one variant, so a table
    that paired by position rather than by seed would show."""
    records = []
    for j, v in enumerate(variants):
        for seed in SEEDS if j != 1 else tuple(reversed(SEEDS)):
            run_dir = root / "runs" / v.key / f"seed{seed}"
            rows = [
                {
                    "step": step,
                    "lm_loss": 5.0 - 0.1 * step - 0.2 * j + 0.01 * seed,
                    "eval_lm_loss": 5.5 - 0.1 * step if step % 4 == 0 else None,
                    "eval_sci_recall_at_1": 0.1 * step if v.has_branch and step % 4 == 0 else None,
                }
                for step in range(1, 13)
            ]
            records.append(
                {
                    "variant": v.key,
                    "label": v.label,
                    "seed": seed,
                    "sci_mode": v.sci_mode,
                    "pair_rate": v.pair_rate,
                    "lm_tokens": 614_400,
                    "checkpoint": str(run_dir / "checkpoints" / "iter_0000300"),
                    "metrics": write_metrics(run_dir / "metrics.jsonl", rows),
                    "train_s": 60.0 * (j + 1),
                    "eval_s": 30.0,
                    "figures": figures_for(cfg, v, seed),
                }
            )
    return records


def groups_of(records: list[Record]) -> dict[str, list[Record]]:
    out: dict[str, list[Record]] = {}
    for r in records:
        out.setdefault(r["variant"], []).append(r)
    return out


def seed_values(records: list[Record], key: str, variant: str) -> dict[int, float]:
    return {r["seed"]: r["figures"][key] for r in records if r["variant"] == variant}


def ms(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values)


def parse_table(table: str) -> list[dict[str, str]]:
    """Rows of a markdown table as {column: cell}, after checking its separator line."""
    lines = table.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert lines[1] == "|" + "---|" * len(header)
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert all(len(r) == len(header) for r in rows)
    return [dict(zip(header, r, strict=True)) for r in rows]


@pytest.fixture(scope="module")
def records(
    cfg: Config, variants: list[Variant], tmp_path_factory: pytest.TempPathFactory
) -> list[Record]:
    return make_records(cfg, variants, tmp_path_factory.mktemp("ablation"))


# -- cells ---------------------------------------------------------------------------------
def test_mean_sd_uses_the_finite_values_and_the_sample_sd() -> None:
    assert mean_sd([0.25]) == (0.25, 0.0)  # one seed: no spread, not an error
    assert all(math.isnan(x) for x in mean_sd([]))
    assert all(math.isnan(x) for x in mean_sd([math.nan, math.inf]))
    mean, sd = mean_sd([1.0, math.nan, 4.0, None, -math.inf])  # type: ignore[list-item]
    assert mean == pytest.approx(2.5) and sd == pytest.approx(statistics.stdev([1.0, 4.0]))
    assert mean_sd([1.0, 2.0, 6.0])[1] == pytest.approx(math.sqrt(7.0))  # n - 1, not n


def test_cell_formats_mean_and_sd_or_says_n_a() -> None:
    assert cell([0.5]) == "0.500 ± 0.000"
    assert cell([]) == "n/a"
    assert cell([math.nan]) == "n/a"
    assert cell([0.2, math.nan, 0.4]) == f"0.300 ± {statistics.stdev([0.2, 0.4]):.3f}"
    assert cell([200.0, 210.0], "{:.2f}") == "205.00 ± 7.07"
    assert cell([0.1, 0.3], "{:.1f}%", 100.0) == "20.0% ± 14.1%"
    # a signed format signs the mean only: the sd is a magnitude
    assert cell([-0.05, -0.01], "{:+.2f}%", 100.0) == "-3.00% ± 2.83%"
    assert cell([0.01, 0.03], "{:+.1f} pts", 100.0) == "+2.0 pts ± 1.4 pts"


# -- tables --------------------------------------------------------------------------------
def test_main_table_has_a_row_per_variant_with_mean_sd_over_seeds(
    cfg: Config, variants: list[Variant], records: list[Record]
) -> None:
    rows = parse_table(main_table(cfg, variants, groups_of(records)))
    assert [r["variant"] for r in rows] == [f"{v.label} (n={len(SEEDS)})" for v in variants]
    assert "COGS" not in rows[0]  # no record has COGS figures, so no column for it
    assert rows[0]["held-out ppl"] == "205.00 ± 7.07"  # vanilla: 200 and 210
    vanilla = seed_values(records, "heldout_ppl", "vanilla")
    for v, row in zip(variants, rows, strict=True):
        ppl = seed_values(records, "heldout_ppl", v.key)
        m, s = ms(list(ppl.values()))
        assert row["held-out ppl"] == f"{m:.2f} ± {s:.2f}"
        if v.key == "vanilla":
            assert row["ppl vs vanilla"] == "(baseline)"
        else:
            m, s = ms([ppl[seed] / vanilla[seed] - 1.0 for seed in SEEDS])
            assert row["ppl vs vanilla"] == f"{100 * m:+.2f}% ± {100 * s:.2f}%"
        for split in cfg.experiment.scan_splits:
            m, s = ms(list(seed_values(records, f"scan_{split}", v.key).values()))
            assert row[f"SCAN {split}"] == f"{100 * m:.1f}% ± {100 * s:.1f}%"
        for column, key in (
            ("probe R@1 (backbone)", "backbone_recall_at_1"),
            ("probe gap (backbone)", "backbone_cos_gap"),
            ("probe R@1 (SCI)", "sci_recall_at_1"),
            ("gap (SCI)", "sci_cos_gap"),
        ):
            if key.startswith("sci_") and not v.has_branch:
                assert row[column] == "no branch"
                continue
            m, s = ms(list(seed_values(records, key, v.key).values()))
            assert row[column] == f"{m:.3f} ± {s:.3f}"


def test_paired_table_gives_per_seed_differences_against_the_baseline(
    cfg: Config, variants: list[Variant], records: list[Record]
) -> None:
    rows = parse_table(paired_table(cfg, variants, groups_of(records), "pairs_no_scl"))
    others = [v for v in variants if v.key != "pairs_no_scl"]
    assert [r["variant"] for r in rows] == [v.label for v in others]  # no row for the baseline
    base = {k: seed_values(records, k, "pairs_no_scl") for k in records[0]["figures"]}
    for v, row in zip(others, rows, strict=True):
        ppl = seed_values(records, "heldout_ppl", v.key)
        m, s = ms([ppl[seed] / base["heldout_ppl"][seed] - 1.0 for seed in SEEDS])
        assert row["ppl"] == f"{100 * m:+.2f}% ± {100 * s:.2f}%"
        for split in cfg.experiment.scan_splits:
            mine = seed_values(records, f"scan_{split}", v.key)
            m, s = ms([mine[seed] - base[f"scan_{split}"][seed] for seed in SEEDS])
            assert row[f"SCAN {split}"] == f"{100 * m:+.1f} pts ± {100 * s:.1f} pts"
        mine = seed_values(records, "backbone_recall_at_1", v.key)
        m, s = ms([mine[seed] - base["backbone_recall_at_1"][seed] for seed in SEEDS])
        assert row["probe R@1 (backbone)"] == f"{m:+.3f} ± {s:.3f}"
    # vanilla against pairs_no_scl, by hand: 200/190 - 1 and 210/220 - 1
    m, s = ms([200 / 190 - 1, 210 / 220 - 1])
    assert rows[0]["ppl"] == f"{100 * m:+.2f}% ± {100 * s:.2f}%" == "+0.36% ± 6.94%"


def test_a_seed_without_a_baseline_run_is_left_out_of_the_pairs(
    cfg: Config, variants: list[Variant], records: list[Record]
) -> None:
    extra = dict(records[-1], seed=3, figures={**records[-1]["figures"], "heldout_ppl": 1e6})
    groups = groups_of([*records, extra])
    sci = variants[2]
    row = parse_table(main_table(cfg, variants, groups))[2]
    assert row["variant"] == f"{sci.label} (n=3)"
    ppl, vanilla = PPL[sci.key], PPL["vanilla"]
    m, s = ms([ppl[seed] / vanilla[seed] - 1.0 for seed in SEEDS])  # seed 3 has no vanilla run
    assert row["ppl vs vanilla"] == f"{100 * m:+.2f}% ± {100 * s:.2f}%"
    paired = parse_table(paired_table(cfg, variants, groups, "pairs_no_scl"))[1]
    m, s = ms([ppl[seed] / PPL["pairs_no_scl"][seed] - 1.0 for seed in SEEDS])
    assert paired["ppl"] == f"{100 * m:+.2f}% ± {100 * s:.2f}%"


def test_probe_table_has_every_metric_for_each_representation(
    variants: list[Variant], records: list[Record]
) -> None:
    rows = parse_table(probe_table(variants, groups_of(records)))
    expected = [
        (v.label, what, prefix)
        for v in variants
        for prefix, what in (("backbone", "backbone mean-pool"), ("sci", "SCI z"))
        if prefix == "backbone" or v.has_branch
    ]
    assert [(r["variant"], r["representation"]) for r in rows] == [e[:2] for e in expected]
    for row, (_, _, prefix) in zip(rows, expected, strict=True):
        key = next(v.key for v in variants if v.label == row["variant"])
        for metric, column in PROBE_METRICS:
            m, s = ms(list(seed_values(records, f"{prefix}_{metric}", key).values()))
            assert row[column] == f"{m:.3f} ± {s:.3f}", (row["variant"], prefix, metric)


def test_missing_figures_show_n_a_and_cogs_gets_a_column_when_any_run_has_it(
    cfg: Config, records: list[Record]
) -> None:
    all_variants = ablation_variants(cfg)  # more variants than there are records for
    changed = []
    for r in records:
        figures = dict(r["figures"])
        if r["variant"] == "sci_joint_5pct":
            del figures["scan_length"], figures["sci_cos_gap"]
        if r["variant"] == "vanilla":
            figures["cogs"] = 0.25 if r["seed"] == 1 else 0.35
        changed.append({**r, "figures": figures})
    groups = groups_of(changed)
    rows = {r["variant"]: r for r in parse_table(main_table(cfg, all_variants, groups))}
    assert list(rows) == [f"{v.label} (n={len(groups.get(v.key, []))})" for v in all_variants]
    by_key = {v.key: rows[f"{v.label} (n={len(groups.get(v.key, []))})"] for v in all_variants}
    assert by_key["vanilla"]["COGS"] == "30.0% ± 7.1%"
    assert by_key["pairs_no_scl"]["COGS"] == "n/a"
    assert by_key["sci_joint_5pct"]["SCAN length"] == "n/a"
    assert by_key["sci_joint_5pct"]["gap (SCI)"] == "n/a"
    assert by_key["sci_joint_5pct"]["SCAN simple"] != "n/a"
    never_run = by_key["sci_joint_10pct"]  # a variant with no records: a row of n/a
    assert [c for k, c in never_run.items() if k != "variant"] == ["n/a"] * (len(never_run) - 1)
    assert by_key["sci_frozen"]["probe R@1 (SCI)"] == "n/a"  # a branch, but no run
    assert by_key["pairs_no_scl"]["probe R@1 (SCI)"] == "no branch"  # no branch at all

    paired_rows = parse_table(paired_table(cfg, all_variants, groups, "pairs_no_scl"))
    paired = {r["variant"]: r for r in paired_rows}
    assert paired["vanilla LM"]["COGS"] == "n/a"  # the baseline runs have no COGS to pair with
    assert paired["SCI joint, 5% pairs"]["SCAN length"] == "n/a"
    assert set(paired["SCI joint, 10% pairs"].values()) == {"SCI joint, 10% pairs", "n/a"}
    probe = parse_table(probe_table(all_variants, groups))
    sci_z = {r["variant"]: r for r in probe if r["representation"] == "SCI z"}
    assert "vanilla LM" not in sci_z  # no branch, no SCI row, not a row of n/a
    assert sci_z["SCI joint, 5% pairs"]["cos gap"] == "n/a"
    assert sci_z["SCI joint, 5% pairs"]["R@1"] != "n/a"


# -- curves and the whole report -----------------------------------------------------------
def test_curves_are_trailing_means_averaged_over_seeds(tmp_path: Path) -> None:
    seed1 = [
        {"step": 1, "loss": 4.0},
        {"step": 2, "loss": 2.0, "x": None},
        {"step": 3, "loss": 3.0},
    ]
    seed2 = [{"step": 1, "loss": 6.0}, {"step": 2, "loss": None}, {"step": 3, "loss": 1.0}]
    runs = [
        {"metrics": write_metrics(tmp_path / "a.jsonl", seed1)},
        {"metrics": write_metrics(tmp_path / "b.jsonl", seed2)},
        {"metrics": str(tmp_path / "missing.jsonl")},  # a run that never logged contributes none
    ]
    assert _curve(runs, "loss") == ([1, 2, 3], [5.0, 2.0, 2.0])
    # window 2: seed 1 gives 4, 3, 2.5; seed 2 (step 2 not logged) gives 6, -, 3.5
    assert _curve(runs, "loss", window=2) == ([1, 2, 3], [5.0, 3.0, 3.0])
    assert _curve(runs, "absent") == ([], [])


@pytest.fixture(scope="module")
def report(
    cfg: Config,
    variants: list[Variant],
    records: list[Record],
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    out = tmp_path_factory.mktemp("report")
    return write_report(out, cfg, variants, records, "sci-scale experiment ablation X", 90.0)


def test_report_holds_the_tables_and_the_study_facts(
    report: Path, cfg: Config, variants: list[Variant], records: list[Record]
) -> None:
    assert report.name == "REPORT.md"
    text = report.read_text()
    groups = groups_of(records)
    assert "Command: `sci-scale experiment ablation X`" in text
    for heading, table in (
        ("## Results", main_table(cfg, variants, groups)),
        ("## Paired differences against", paired_table(cfg, variants, groups, "pairs_no_scl")),
        ("## Structural probe, every metric", probe_table(variants, groups)),
    ):
        assert table in text.split(heading, 1)[1].split("\n## ", 1)[0], heading
    t, m = cfg.train, cfg.model
    budget = t.steps * t.global_batch_size * m.seq_length
    assert f"= {budget:,} tokens; seeds 1, 2, 3." in text and f"{budget:,}" == "614,400"
    train_min = sum(r["train_s"] for r in records) / 60  # 2 seeds x (1 + 2 + 3) minutes
    assert f"- Compute: {len(records)} runs, {train_min:.1f} min training" in text
    assert "+ 3.0 min evaluation" in text and "this invocation took 1.5 min" in text
    assert "held-out perplexity on 3,328, 3,584 tokens" in text  # one count per seed's tokenizer
    assert "structural probe on 256 held-out examples" in text


def test_every_plot_the_report_names_is_a_png_beside_it(report: Path) -> None:
    links = re.findall(r"!\[([^\]]+)\]\(([^)]+)\)", report.read_text())
    assert {target for _, target in links} == PLOTS
    assert all(alt == target for alt, target in links)
    for name in PLOTS:
        assert (report.parent / name).read_bytes()[:8] == PNG, name
