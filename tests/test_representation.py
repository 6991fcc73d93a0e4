"""SCI health metrics against synthetic embeddings whose answers are known."""

from __future__ import annotations

import math

import pytest
import torch

from sci_scale.eval.representation import collapse_warning, representation_metrics

D = 32


def clustered(templates: int = 10, per: int = 4, noise: float = 1e-4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.linalg.qr(torch.randn(D, D, generator=g))[0][:templates]  # orthonormal
    z = centres.repeat_interleave(per, 0) + noise * torch.randn(templates * per, D, generator=g)
    return z, torch.arange(templates).repeat_interleave(per)


def test_perfectly_clustered_templates() -> None:
    z, t = clustered()
    m = representation_metrics(z, t)
    assert m["recall_at_1"] == 1.0 and m["recall_at_5"] == 1.0 and m["mrr"] == 1.0
    assert m["cos_gap"] > 0.95 and m["cos_auroc"] == 1.0
    assert m["alignment"] < 0.01
    assert m["rankme"] == pytest.approx(10, rel=0.1)  # ten orthogonal directions


def test_collapsed_embeddings() -> None:
    z = torch.ones(40, D) + 1e-9 * torch.randn(40, D, generator=torch.Generator().manual_seed(0))
    t = torch.arange(10).repeat_interleave(4)
    m = representation_metrics(z, t)
    assert m["cos_gap"] == pytest.approx(0.0, abs=1e-6)
    assert m["rankme"] == pytest.approx(1.0, abs=0.05)
    assert m["alpha_req"] > 5 or math.isinf(m["alpha_req"])
    assert collapse_warning(m) is not None


def test_isotropic_noise() -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2000, D, generator=g)
    t = torch.arange(500).repeat_interleave(4)
    m = representation_metrics(z, t)
    assert m["rankme"] > 0.95 * D  # near d
    assert m["cos_gap"] == pytest.approx(0.0, abs=0.01)
    assert m["cos_auroc"] == pytest.approx(0.5, abs=0.02)
    assert m["alpha_req"] < 0.5  # a flat spectrum
    assert collapse_warning(m) is None


def test_metrics_equal_a_direct_computation() -> None:
    """Each formula against a plain loop over pairs on a small random set."""
    g = torch.Generator().manual_seed(1)
    z = torch.nn.functional.normalize(torch.randn(12, 5, generator=g).double(), dim=-1)
    t = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3, 3, 4, 4, 4])
    m = representation_metrics(z, t)
    pos, neg, all_pairs = [], [], []
    for i in range(12):
        for j in range(12):
            if i == j:
                continue
            c = float(z[i] @ z[j])
            all_pairs.append(math.exp(-2 * float((z[i] - z[j]).pow(2).sum())))
            (pos if t[i] == t[j] else neg).append(c)
    assert m["pos_cos"] == pytest.approx(sum(pos) / len(pos))
    assert m["neg_cos"] == pytest.approx(sum(neg) / len(neg))
    assert m["alignment"] == pytest.approx(sum(2 - 2 * c for c in pos) / len(pos))
    assert m["uniformity"] == pytest.approx(math.log(sum(all_pairs) / len(all_pairs)))
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    assert m["cos_auroc"] == pytest.approx(wins / (len(pos) * len(neg)))
    ranks = []
    for i in range(12):
        others = sorted((j for j in range(12) if j != i), key=lambda j: -float(z[i] @ z[j]))
        ranks.append(next(k for k, j in enumerate(others, 1) if t[j] == t[i]))
    assert m["recall_at_1"] == pytest.approx(sum(r == 1 for r in ranks) / 12)
    assert m["mrr"] == pytest.approx(sum(1 / r for r in ranks) / 12)
    s = torch.linalg.svdvals(z)
    p = s / s.sum()
    assert m["rankme"] == pytest.approx(math.exp(-float((p * p.log()).sum())), rel=1e-6)


def test_training_logs_the_metrics_at_eval_steps(make_config) -> None:
    from sci_scale.train.metrics import read_metrics
    from sci_scale.train.trainer import train

    cfg = make_config("train.steps=10", "train.eval_interval=5")
    result = train(cfg)
    logged = {r["step"]: r for r in read_metrics(result.run_dir)}
    for step in (5, 10):
        record = logged[step]
        for key in ("alignment", "uniformity", "rankme", "alpha_req", "cos_auroc",
                    "recall_at_1", "recall_at_5", "mrr"):  # fmt: skip
            assert f"eval_sci_{key}" in record, (step, key)
        assert 0.0 <= record["eval_sci_recall_at_1"] <= record["eval_sci_recall_at_5"] <= 1.0
        assert 1.0 <= record["eval_sci_rankme"] <= cfg.sci.embed_dim
    assert "eval_sci_mrr" not in logged[3]


def test_non_finite_embeddings_give_nan_metrics_not_an_error(caplog) -> None:
    """A diverging model's eval step: every metric NaN (written as null), a warning, no SVD
    failure."""
    import logging

    from sci_scale.eval.representation import METRICS
    from sci_scale.train.sci_health import heldout_representation

    z = torch.randn(8, 4)
    templates = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    assert set(representation_metrics(z, templates)) == set(METRICS)
    z[5, 2] = math.nan
    assert all(math.isnan(v) for v in representation_metrics(z, templates).values())
    with caplog.at_level(logging.WARNING):
        logged = heldout_representation([(z, templates)], step=7)
    assert set(logged) == {f"eval_sci_{k}" for k in METRICS}
    assert "not finite at step 7" in caplog.text
