"""The variants an ablation trains, shared by the runner and its report.

Both the study that trains them (``ablation``) and the report that tabulates them (``report``)
need the same names and labels; keeping them here lets each import them without importing the
other.
"""

from __future__ import annotations

from dataclasses import dataclass

from sci_scale.config.schema import Config


@dataclass(frozen=True)
class Variant:
    key: str
    label: str
    sci_mode: str
    pair_rate: float
    sci_only_first: bool = False

    @property
    def has_branch(self) -> bool:
        return self.sci_mode != "off"


def percent(rate: float) -> str:
    return f"{rate * 100:g}%"


def ablation_variants(cfg: Config) -> list[Variant]:
    e = cfg.experiment
    out = [
        Variant("vanilla", "vanilla LM", "off", 0.0),
        Variant("pairs_no_scl", f"LM + {percent(e.pair_rate)} pairs, no SCL", "off", e.pair_rate),
    ]
    out += [
        Variant(f"sci_joint_{percent(r)[:-1]}pct", f"SCI joint, {percent(r)} pairs", "joint", r)
        for r in e.pair_rates
    ]
    out.append(
        Variant(
            "sci_frozen",
            f"SCI frozen after SCI-only, {percent(e.pair_rate)} pairs",
            "frozen",
            e.pair_rate,
            sci_only_first=True,
        )
    )
    return out
