"""The structural contrastive loss (SCL): supervised-contrastive, multi-positive InfoNCE.

For anchor i with positives P(i) (same template, i excluded) and all others A(i)::

    L_i = -1/|P(i)| * sum_{p in P(i)} log( exp(z_i.z_p / tau) / sum_{a in A(i)} exp(z_i.z_a / tau) )

averaged over the anchors that have at least one positive. Alongside the loss we report the mean
positive and negative cosine and their gap: collapse (both cosines -> 1, gap -> 0) is the known
failure of this loss and must be visible at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class SCLOutput:
    loss: Tensor  # scalar, differentiable; zero when no anchor has a positive
    num_anchors: int  # anchors with >= 1 positive (0: the loss is not defined on this batch)
    pos_cos: float
    neg_cos: float

    @property
    def cos_gap(self) -> float:
        return self.pos_cos - self.neg_cos


def supervised_contrastive_loss(
    z: Tensor,
    templates: Tensor,
    tau: Tensor | float,
    anchors: Tensor | None = None,
    ranks: int = 1,
) -> SCLOutput:
    """SCL over L2-normalised embeddings ``z`` [N, d] with integer template ids [N].

    Rows with a negative template id are padding: neither anchor nor candidate. With data
    parallelism ``z`` holds every rank's examples, ``anchors`` (bool [N]) marks this rank's
    own, and the loss is this rank's share: the sum over its anchors divided by (all anchors /
    ``ranks``), so that the mean of the ranks' shares is the SCL over all examples.
    """
    valid = templates >= 0
    if int(valid.sum()) < 2:
        zero = z.sum() * 0.0
        return SCLOutput(zero, 0, float("nan"), float("nan"))
    # In fp64: the similarity matrix is tiny (examples of one micro-batch), and logits of
    # magnitude 1/tau make fp32 rounding of the log-softmax comparable to a small SCL itself.
    z = z.double()
    n = z.size(0)
    sim = z @ z.t()
    eye = torch.eye(n, dtype=torch.bool, device=z.device)
    pair_ok = valid[:, None] & valid[None, :] & ~eye
    positive = (templates[:, None] == templates[None, :]) & pair_ok
    logits = (sim / tau).masked_fill(~pair_ok, float("-inf"))
    anchor_rows = valid if anchors is None else valid & anchors
    pos_count = positive.sum(dim=1)
    all_anchors = int((pos_count > 0).sum())  # over every rank's rows
    has_pos = (pos_count > 0) & anchor_rows
    num_anchors = int(has_pos.sum())
    with torch.no_grad():
        rows = anchor_rows[:, None]
        negative = pair_ok & ~positive & rows
        pos_mask = positive & rows
        pos_cos = float(sim[pos_mask].mean()) if pos_mask.any() else float("nan")
        neg_cos = float(sim[negative].mean()) if negative.any() else float("nan")
    if num_anchors == 0:
        return SCLOutput(z.sum() * 0.0, 0, pos_cos, neg_cos)
    safe_logits = logits.masked_fill(~has_pos[:, None], 0.0)  # rows never used: keep finite
    log_prob = safe_logits - torch.logsumexp(safe_logits, dim=1, keepdim=True)
    pos_log_prob = log_prob.masked_fill(~positive, 0.0).sum(dim=1)
    per_anchor = -pos_log_prob[has_pos] / pos_count[has_pos]
    return SCLOutput(per_anchor.sum() * ranks / all_anchors, num_anchors, pos_cos, neg_cos)


class Temperature(torch.nn.Module):
    """tau, fixed or learnable; a learnable tau lives in log space, clamped to [min, max]."""

    def __init__(self, tau: float, learnable: bool, tau_min: float, tau_max: float) -> None:
        super().__init__()
        self.tau_min, self.tau_max = tau_min, tau_max
        log_tau = torch.tensor(float(tau)).log()
        if learnable:
            self.log_tau = torch.nn.Parameter(log_tau)
        else:
            self.register_buffer("log_tau", log_tau)

    def forward(self) -> Tensor:
        return self.log_tau.exp().clamp(self.tau_min, self.tau_max)


def alpha_at(step: int, alpha: float, warmup_steps: int) -> float:
    """SCL weight with a linear warm-up from 0 over ``warmup_steps`` (step counts from 1)."""
    if warmup_steps <= 0:
        return alpha
    return alpha * min(1.0, step / warmup_steps)
