"""The statistics of a study cell: mean ± std over seeds, a bootstrap CI, a paired test.

Seeds are the unit of replication (each one retrains the model), so intervals and tests are over
per-seed exact-match figures. The paired test compares a variant with vanilla seed by seed (both
share the seed's data order and initialisation seed): a paired t-test on the differences, and
the exact sign-flip permutation test beside it, which assumes no normality but cannot go below
p = 2 / 2^n with n seeds (0.0625 at 5 seeds) — the report says so rather than hiding it. The
bootstrap is scipy's (percentile method, 10,000 resamples, fixed seed).
"""

from __future__ import annotations

import itertools
import math
import statistics
from dataclasses import dataclass

import numpy as np

ALPHA = 0.05


@dataclass(frozen=True)
class Summary:
    n: int
    mean: float
    std: float  # sample standard deviation (0 for one seed)
    ci_low: float  # 95% bootstrap CI of the mean (nan below 2 seeds)
    ci_high: float


@dataclass(frozen=True)
class PairedTest:
    n: int
    mean_diff: float  # variant - baseline
    t_p: float  # paired t-test, two-sided (nan below 2 pairs or with zero variance)
    sign_flip_p: float  # exact permutation test on the differences, two-sided
    min_sign_flip_p: float  # the smallest p the permutation test can give with n pairs

    @property
    def significant(self) -> bool:
        return not math.isnan(self.t_p) and self.t_p < ALPHA


def summarise(values: list[float]) -> Summary:
    n = len(values)
    if n == 0:
        return Summary(0, math.nan, math.nan, math.nan, math.nan)
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if n > 1 else 0.0
    if n < 2 or std == 0.0:
        low = high = mean if n >= 2 else math.nan
        return Summary(n, mean, std, low, high)
    from scipy.stats import bootstrap

    result = bootstrap(
        (np.asarray(values),), np.mean, confidence_level=0.95, n_resamples=10_000,
        method="percentile", random_state=np.random.default_rng(0),
    )  # fmt: skip
    ci = result.confidence_interval
    return Summary(n, mean, std, float(ci.low), float(ci.high))


def sign_flip_p(diffs: list[float]) -> float:
    """Exact two-sided permutation p: the share of the 2^n sign assignments whose mean
    difference is at least as far from zero as the observed one."""
    observed = abs(statistics.fmean(diffs))
    flips = list(itertools.product((1, -1), repeat=len(diffs)))
    extreme = sum(
        abs(statistics.fmean(s * d for s, d in zip(signs, diffs, strict=True))) >= observed - 1e-12
        for signs in flips
    )
    return extreme / len(flips)


def paired_test(variant: dict[int, float], baseline: dict[int, float]) -> PairedTest | None:
    """Over the seeds both have; None without a common seed."""
    seeds = sorted(set(variant) & set(baseline))
    if not seeds:
        return None
    diffs = [variant[s] - baseline[s] for s in seeds]
    n = len(diffs)
    t_p = math.nan
    if n >= 2 and statistics.stdev(diffs) > 0:
        from scipy.stats import ttest_rel

        t_p = float(ttest_rel([variant[s] for s in seeds], [baseline[s] for s in seeds]).pvalue)
    flip = sign_flip_p(diffs) if n <= 16 else math.nan
    return PairedTest(n, statistics.fmean(diffs), t_p, flip, 2 / 2**n if n else math.nan)
