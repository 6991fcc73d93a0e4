"""The structural contrastive loss against a direct, loop-by-loop computation of its formula."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sci_scale.losses.scl import Temperature, alpha_at, supervised_contrastive_loss


def direct_scl(z: torch.Tensor, templates: list[int], tau: float) -> float:
    """L_i = -1/|P(i)| sum_p log(exp(z_i.z_p/tau) / sum_{a != i} exp(z_i.z_a/tau)), averaged
    over anchors with a positive; written as plain loops over the formula of DESIGN.md."""
    n = len(templates)
    losses = []
    for i in range(n):
        positives = [p for p in range(n) if p != i and templates[p] == templates[i]]
        if not positives:
            continue
        denominator = sum(math.exp(float(z[i] @ z[a]) / tau) for a in range(n) if a != i)
        terms = [math.log(math.exp(float(z[i] @ z[p]) / tau) / denominator) for p in positives]
        losses.append(-sum(terms) / len(positives))
    return sum(losses) / len(losses)


def unit(*rows: list[float]) -> torch.Tensor:
    return F.normalize(torch.tensor(rows, dtype=torch.float64), dim=-1)


def test_one_positive_per_anchor() -> None:
    z = unit([1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.2, 1.0])
    templates = [7, 7, 3, 3]
    out = supervised_contrastive_loss(z, torch.tensor(templates), 0.1)
    assert out.num_anchors == 4
    assert float(out.loss) == pytest.approx(direct_scl(z, templates, 0.1), rel=1e-12)


def test_several_positives_and_an_anchor_without_positive() -> None:
    z = unit(
        [1.0, 0.0, 0.0],
        [0.8, 0.2, 0.1],
        [0.7, -0.1, 0.3],
        [0.0, 1.0, 0.0],
        [0.1, 0.9, 0.2],
        [0.0, 0.0, 1.0],
    )
    templates = [1, 1, 1, 2, 2, 9]  # template 9 has a single example: no positive, still a negative
    out = supervised_contrastive_loss(z, torch.tensor(templates), 0.5)
    assert out.num_anchors == 5
    assert float(out.loss) == pytest.approx(direct_scl(z, templates, 0.5), rel=1e-12)


def test_cosines_and_gap() -> None:
    z = unit([1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0])
    out = supervised_contrastive_loss(z, torch.tensor([0, 0, 1, 1]), 0.1)
    assert out.pos_cos == pytest.approx(1.0)
    assert out.neg_cos == pytest.approx(0.0)
    assert out.cos_gap == pytest.approx(1.0)


@pytest.mark.parametrize("n", [2, 5, 16])
def test_collapse_gives_log_of_other_examples(n: int) -> None:
    z = unit(*([[0.3, -1.2, 0.5]] * n))
    templates = torch.arange(n) // 2  # pairs; every anchor has a positive when n is even
    templates[-1] = templates[0]
    out = supervised_contrastive_loss(z, templates, 0.1)
    assert float(out.loss) == pytest.approx(math.log(n - 1), rel=1e-12)
    assert out.pos_cos == pytest.approx(1.0)
    if n > 2:  # with two examples there is no negative to compare against
        assert out.cos_gap == pytest.approx(0.0, abs=1e-12)


def test_no_positive_gives_zero_loss_that_still_backpropagates() -> None:
    z = unit([1.0, 0.0], [0.0, 1.0]).requires_grad_(True)
    out = supervised_contrastive_loss(z, torch.tensor([1, 2]), 0.1)
    assert out.num_anchors == 0
    out.loss.backward()
    assert z.grad is not None and torch.count_nonzero(z.grad) == 0


def test_gradient_pulls_positives_together() -> None:
    z0 = unit([1.0, 0.0], [0.0, 1.0], [-1.0, 0.2], [0.3, -1.0])
    z = z0.clone().requires_grad_(True)
    out = supervised_contrastive_loss(z, torch.tensor([0, 0, 1, 1]), 0.1)
    out.loss.backward()
    moved = F.normalize(z0 - 0.01 * z.grad, dim=-1)
    assert float(moved[0] @ moved[1]) > float(z0[0] @ z0[1])


def test_temperature_and_alpha_schedule() -> None:
    fixed = Temperature(0.1, learnable=False, tau_min=0.01, tau_max=1.0)
    assert float(fixed()) == pytest.approx(0.1)
    assert not list(fixed.parameters())
    learnable = Temperature(0.1, learnable=True, tau_min=0.05, tau_max=0.2)
    with torch.no_grad():
        learnable.log_tau.fill_(math.log(5.0))
    assert learnable().item() == pytest.approx(0.2)  # clamped
    assert alpha_at(1, 0.05, 10) == pytest.approx(0.005)
    assert alpha_at(10, 0.05, 10) == pytest.approx(0.05)
    assert alpha_at(50, 0.05, 10) == pytest.approx(0.05)
    assert alpha_at(1, 0.05, 0) == pytest.approx(0.05)
