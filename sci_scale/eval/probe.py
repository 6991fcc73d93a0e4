"""Structural probe: do held-out examples of one template get matching representations?

Every model gets the same probe, with or without an SCI branch: each held-out example runs
alone (so nothing of its partner is in view) and is represented twice, by the backbone's final
hidden states mean-pooled over its tokens, and, when the model has a branch, by its SCI
embedding z. Both go through :func:`representation_metrics`, so a vanilla LM's structural
retrieval is the baseline the SCI branch has to beat.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from sci_scale.data.blocks import MAX_EXAMPLES, TokenizedExample
from sci_scale.eval.representation import representation_metrics


@dataclass
class ProbeEmbeddings:
    backbone: torch.Tensor  # [N, hidden], L2-normalised
    sci: torch.Tensor | None  # [N, embed_dim], or None without a branch
    templates: torch.Tensor  # [N]


def probe_set(
    examples: Sequence[TokenizedExample], max_templates: int, per_template: int = 2, seed: int = 0
) -> list[TokenizedExample]:
    """A fixed sample: ``per_template`` examples of up to ``max_templates`` templates that have
    that many, the templates and members chosen by ``seed``."""
    by_template: dict[int, list[TokenizedExample]] = {}
    for ex in examples:
        by_template.setdefault(ex.template_id, []).append(ex)
    eligible = sorted(t for t, members in by_template.items() if len(members) >= per_template)
    rng = np.random.default_rng(seed)
    chosen = rng.permutation(len(eligible))[:max_templates]
    out: list[TokenizedExample] = []
    for k in sorted(chosen.tolist()):
        members = by_template[eligible[k]]
        picks = rng.choice(len(members), size=per_template, replace=False)
        out += [members[i] for i in sorted(picks.tolist())]
    return out


def probe_embeddings(
    model: torch.nn.Module, examples: Sequence[TokenizedExample], batch_size: int = 64
) -> ProbeEmbeddings:
    """Backbone and SCI representations of each example, run alone (grouped by length, so
    there is no padding)."""
    captured: list[torch.Tensor] = []
    hook = model.gpt.decoder.register_forward_hook(
        lambda _m, _args, out: captured.append(out[0] if isinstance(out, tuple) else out)
    )
    has_branch = getattr(model, "sci", None) is not None
    backbone = [torch.empty(0)] * len(examples)
    sci = [torch.empty(0)] * len(examples)
    by_length: dict[int, list[int]] = {}
    for i, ex in enumerate(examples):
        by_length.setdefault(len(ex.tokens), []).append(i)
    model.eval()
    try:
        with torch.no_grad():
            for length, members in by_length.items():
                for start in range(0, len(members), batch_size):
                    idx = members[start : start + batch_size]
                    tokens = torch.as_tensor(np.stack([examples[i].tokens for i in idx]))
                    positions = torch.arange(length).expand_as(tokens)
                    templates = torch.full((len(idx), MAX_EXAMPLES), -1, dtype=torch.long)
                    templates[:, 0] = torch.as_tensor([examples[i].template_id for i in idx])
                    captured.clear()
                    output = model(
                        tokens,
                        positions,
                        example_ids=torch.zeros_like(tokens),
                        template_ids=templates,
                        collect_sci_embeddings=has_branch,
                    )
                    hidden = captured[-1].float().mean(dim=0).cpu()  # [s, b, h] -> [b, h]
                    for row, i in enumerate(idx):
                        backbone[i] = hidden[row]
                    if has_branch:
                        z = output.sci.embeddings
                        for row, i in enumerate(idx):
                            sci[i] = z[row]
    finally:
        hook.remove()
    template_ids = torch.as_tensor([ex.template_id for ex in examples])
    return ProbeEmbeddings(
        F.normalize(torch.stack(backbone), dim=-1),
        torch.stack(sci) if has_branch else None,
        template_ids,
    )


def probe_metrics(embeddings: ProbeEmbeddings) -> dict[str, float]:
    """``backbone_*`` metrics always, ``sci_*`` metrics when the model has a branch."""
    out = {
        f"backbone_{k}": v
        for k, v in representation_metrics(embeddings.backbone, embeddings.templates).items()
    }
    if embeddings.sci is not None:
        metrics = representation_metrics(embeddings.sci, embeddings.templates)
        out.update({f"sci_{k}": v for k, v in metrics.items()})
    return out
