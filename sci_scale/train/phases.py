"""Continued-pretraining phases: which backbone parameters train at a step.

The seeds' protocol for attaching SCI to a trained backbone: first the SCI branch warms up with
the backbone frozen (``phases.backbone_frozen_until``), then only the backbone's last
``phases.unfreeze_last_n`` layers join (until ``phases.partial_until``), then everything trains.
The SCI branch trains in every phase (within what ``sci.mode`` allows).

Freezing is done on the gradients, after the data-parallel reduction and before clipping: a
frozen parameter's gradient is dropped, and torch's AdamW leaves a parameter without a gradient
untouched (no update, no weight decay, no moment change). ``requires_grad`` stays as it is, so the
optimizer's parameter groups and megatron's schedules never change shape between phases.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from sci_scale.config.schema import PhasesSection


class FreezeSchedule:
    def __init__(self, phases: PhasesSection, chunks: Iterable[torch.nn.Module], num_layers: int):
        self.phases = phases
        self.backbone: list[torch.nn.Parameter] = []
        self.last_layers: set[int] = set()  # ids of the parameters of the last n layers
        first_trainable = num_layers - phases.unfreeze_last_n + 1  # 1-based layer number
        for chunk in chunks:
            gpt = chunk.gpt
            self.backbone += [p for p in gpt.parameters() if p.requires_grad]
            for layer in gpt.decoder.layers:
                if layer.layer_number >= first_trainable:
                    self.last_layers.update(id(p) for p in layer.parameters())

    @property
    def active(self) -> bool:
        return self.phases.backbone_frozen_until > 0 or self.phases.partial_until > 0

    def phase(self, step: int) -> str:
        p = self.phases
        if step <= p.backbone_frozen_until:
            return "backbone frozen"
        if step <= p.partial_until:
            return f"last {p.unfreeze_last_n} layer(s) unfrozen"
        return "joint"

    def frozen(self, step: int) -> list[torch.nn.Parameter]:
        phase = self.phase(step)
        if phase == "joint":
            return []
        if phase == "backbone frozen":
            return self.backbone
        return [p for p in self.backbone if id(p) not in self.last_layers]

    def drop_frozen_grads(self, step: int) -> None:
        for p in self.frozen(step):
            p.grad = None
