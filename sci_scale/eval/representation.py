"""SCI health metrics on embeddings with known templates (formulas below; the logged keys and
how to read them: docs/evaluation.md).

Given L2-normalised embeddings z [N, d] and the template id of each example:
- alignment: mean over positive pairs (same template) of ||z_x - z_y||^2 (lower: tighter);
- uniformity: log of the mean over all pairs of exp(-2 ||z_x - z_y||^2) (lower: more spread);
- RankMe: exp of the entropy of the normalised singular values of Z (1: collapsed, d: full);
- participation ratio of the covariance eigenvalues lambda: (sum lambda)^2 / sum lambda^2;
- alpha-ReQ: minus the least-squares slope of log eigenvalue against log rank (>> 1: collapse);
- cosine gap: mean positive cosine minus mean negative cosine, and the AUROC of cosine as a
  positive/negative classifier;
- retrieval: for each anchor, its gallery is every other example; a hit is a same-template
  example. Recall@1, Recall@5 and MRR of the first hit.
Computed in float64 with torch; N is a held-out pair set (hundreds to a few thousand).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

EPS = 1e-12


def _pair_masks(templates: Tensor) -> tuple[Tensor, Tensor]:
    same = templates[:, None] == templates[None, :]
    off_diagonal = ~torch.eye(len(templates), dtype=torch.bool, device=templates.device)
    return same & off_diagonal, ~same


def _auroc(positive: Tensor, negative: Tensor) -> float:
    """Probability that a random positive scores above a random negative (ties count half)."""
    scores = torch.cat([positive, negative])
    order = scores.argsort()
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=scores.dtype)
    # average ranks over ties
    unique, inverse = torch.unique(scores, return_inverse=True)
    sums = torch.zeros(len(unique), dtype=scores.dtype).index_add_(0, inverse, ranks)
    counts = torch.zeros(len(unique), dtype=scores.dtype).index_add_(
        0, inverse, torch.ones_like(ranks)
    )
    ranks = (sums / counts)[inverse]
    n_pos, n_neg = len(positive), len(negative)
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


METRICS = (
    *("alignment", "uniformity", "pos_cos", "neg_cos", "cos_gap", "cos_auroc", "rankme"),
    *("participation_ratio", "alpha_req", "recall_at_1", "recall_at_5", "mrr"),
)


def representation_metrics(z: Tensor, templates: Tensor) -> dict[str, float]:
    """Every metric of :data:`METRICS`; all NaN when an embedding is not finite (a diverging
    model's eval reports NaN instead of failing inside the SVD)."""
    templates = templates.detach()
    positive, negative = _pair_masks(templates)
    if not positive.any() or not negative.any():
        raise ValueError("metrics need at least one positive and one negative pair")
    if not bool(torch.isfinite(z).all()):
        return dict.fromkeys(METRICS, math.nan)
    z = torch.nn.functional.normalize(z.detach().double(), dim=-1)
    cos = z @ z.T
    sq_dist = (2 - 2 * cos).clamp_min(0)
    n = len(z)
    off = ~torch.eye(n, dtype=torch.bool)
    out = {
        "alignment": float(sq_dist[positive].mean()),
        "uniformity": float(torch.log(torch.exp(-2 * sq_dist[off]).mean())),
        "pos_cos": float(cos[positive].mean()),
        "neg_cos": float(cos[negative].mean()),
    }
    out["cos_gap"] = out["pos_cos"] - out["neg_cos"]
    out["cos_auroc"] = _auroc(cos[positive], cos[negative])

    singular = torch.linalg.svdvals(z)
    p = singular / singular.sum() + EPS
    out["rankme"] = float(torch.exp(-(p * p.log()).sum()))
    eig = torch.linalg.eigvalsh(torch.cov(z.T)).flip(0).clamp_min(0)
    out["participation_ratio"] = float(eig.sum() ** 2 / (eig.pow(2).sum() + EPS))
    kept = eig[eig > eig[0] * 1e-12] if eig[0] > 0 else eig[:1]
    if len(kept) >= 2:
        x = torch.log(torch.arange(1, len(kept) + 1, dtype=torch.float64))
        y = torch.log(kept)
        slope = ((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum()
        out["alpha_req"] = float(-slope)
    else:
        out["alpha_req"] = math.inf  # one direction left: total collapse

    # retrieval among the other examples; anchors without a partner are skipped
    scores = cos.masked_fill(~off, -math.inf)
    order = scores.argsort(dim=1, descending=True)
    hits = positive.gather(1, order)  # [N, N]: is the k-th retrieved a same-template example
    has_partner = positive.any(1)
    first_hit = hits.float().argmax(1)[has_partner] + 1  # rank of the first positive
    out["recall_at_1"] = float((first_hit <= 1).double().mean())
    out["recall_at_5"] = float((first_hit <= 5).double().mean())
    out["mrr"] = float((1.0 / first_hit.double()).mean())
    return out


def collapse_warning(
    metrics: dict[str, float], min_gap: float = 0.05, max_neg_cos: float = 0.9
) -> str | None:
    """A message when embeddings collapse: the gap is small while every cosine nears 1."""
    if metrics["cos_gap"] < min_gap and metrics["neg_cos"] > max_neg_cos:
        return (
            f"SCI collapse: cosine gap {metrics['cos_gap']:.3f} < {min_gap} with negative "
            f"cosine {metrics['neg_cos']:.3f} > {max_neg_cos} (RankMe {metrics['rankme']:.2f})"
        )
    return None
