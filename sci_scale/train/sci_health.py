"""SCI health during training: the step's SCL and cosines, and the held-out representation.

Pair blocks are rare (5% of blocks), so a step's SCI figures come from the few micro-batches that
held pair examples. Collapse (positive and negative cosines both -> 1, gap -> 0) is the known
failure of a contrastive loss; the held-out metrics (alignment, uniformity, RankMe, ...) and a
warning make it visible at the eval step where it happens.
"""

from __future__ import annotations

import logging
import math

import torch
from megatron.core import parallel_state

from sci_scale.eval.representation import collapse_warning, representation_metrics
from sci_scale.model.sci_branch import SCIStats
from sci_scale.runtime import collectives

log = logging.getLogger("sci_scale.train")


def sci_step_summary(stats: list[SCIStats]) -> dict[str, float]:
    """Step SCL = mean over the micro-batches that had pair examples of their (global) SCL.

    Each data-parallel rank records its share of every such micro-batch's loss (see
    ``supervised_contrastive_loss(ranks=...)``); the mean of the shares over ranks is the global
    value. Cosines are averaged over the micro-batches (and ranks) that could measure them.
    Only first-stage ranks hold statistics; they alone take part in the reduction.
    """
    # micro-batches, SCL sum, anchors, pos-cos sum and count, neg-cos sum and count
    sums = [0.0] * 7
    for r in stats:
        sums[0] += 1.0
        sums[1] += r.scl
        sums[2] += r.num_anchors
        if math.isfinite(r.pos_cos):
            sums[3] += r.pos_cos
            sums[4] += 1.0
        if math.isfinite(r.neg_cos):
            sums[5] += r.neg_cos
            sums[6] += 1.0
    dp = parallel_state.get_data_parallel_world_size()
    if dp > 1 and parallel_state.is_pipeline_first_stage():
        sums = collectives.all_reduce_values(sums, parallel_state.get_data_parallel_group())
        # every rank records the same micro-batches; shares average to the SCL
        sums[0], sums[1] = sums[0] / dp, sums[1] / dp
    n_mb, scl_sum, anchors, pos_sum, pos_n, neg_sum, neg_n = sums
    if n_mb == 0:
        return {}
    pos = pos_sum / pos_n if pos_n else float("nan")
    neg = neg_sum / neg_n if neg_n else float("nan")
    return {
        "scl_loss": scl_sum / n_mb,
        "pos_cos": pos,
        "neg_cos": neg,
        "cos_gap": pos - neg,
        "scl_anchors": int(anchors),
    }


def gather_embeddings(stats: list[SCIStats]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every data-parallel rank's collected embeddings (z, template ids), on the first stage."""
    if not parallel_state.is_pipeline_first_stage():
        return []
    local = [(s.embeddings, s.templates) for s in stats if s.embeddings is not None]
    if parallel_state.get_data_parallel_world_size() == 1:
        return local
    # every first-stage rank enters the collective, with or without embeddings of its own
    gathered = collectives.all_gather_object(local, parallel_state.get_data_parallel_group())
    return [item for part in gathered for item in part]


def heldout_representation(
    collected: list[tuple[torch.Tensor, torch.Tensor]], step: int
) -> dict[str, float]:
    """Alignment, uniformity, RankMe, alpha-ReQ, cosine AUROC, Recall@1/5, MRR of the held-out
    pair embeddings as ``eval_sci_*`` metrics, and a warning on collapse."""
    if not collected:
        return {}
    z = torch.cat([c[0] for c in collected])
    templates = torch.cat([c[1] for c in collected])
    try:
        metrics = representation_metrics(z, templates)
    except ValueError as exc:  # e.g. a held-out set without a negative pair
        log.warning("no SCI representation metrics: %s", exc)
        return {}
    if any(math.isnan(v) for v in metrics.values()):
        log.warning("held-out SCI embeddings are not finite at step %d: metrics are NaN", step)
    warning = collapse_warning(metrics)
    if warning:
        log.warning("%s at step %d", warning, step)
    return {f"eval_sci_{k}": v for k, v in metrics.items()}
