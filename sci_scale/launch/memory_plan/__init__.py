"""Per-GPU memory of a training layout, planned from the configuration alone.

A layout that cannot fit should be refused at the login node, not discovered as an
out-of-memory error after an hour in the queue. The planner is arithmetic over the config
(no torch.distributed, no GPU): the model's weights per rank, their gradients, the optimizer
state and the activations kept for backward, for the worst pipeline stage. The formulas, their
assumptions and the CPU measurements that check them are in docs/parallel.md, "Memory planner".

``state`` counts the model-state terms (weights, gradients, optimizer state under each ZeRO
stage), ``activations`` what backward keeps (per layer, the SCI branch, the micro-batches in
flight), ``plan`` combines them per pipeline rank into a ``MemoryPlan`` and ``report`` prints it.
"""

from sci_scale.launch.memory_plan.activations import (
    Kernels,
    SciBatch,
    in_flight_per_chunk,
    kernels_for,
)
from sci_scale.launch.memory_plan.plan import (
    DEFAULT_GPU_MEMORY,
    GB,
    GIB,
    LABELS,
    TERMS,
    LayoutDoesNotFit,
    MemoryPlan,
    StagePlan,
    parse_memory,
    plan_memory,
    require_fit,
)
from sci_scale.launch.memory_plan.report import format_plan
from sci_scale.launch.memory_plan.state import Terms

__all__ = [
    "DEFAULT_GPU_MEMORY",
    "GB",
    "GIB",
    "LABELS",
    "TERMS",
    "Kernels",
    "LayoutDoesNotFit",
    "MemoryPlan",
    "SciBatch",
    "StagePlan",
    "Terms",
    "format_plan",
    "in_flight_per_chunk",
    "kernels_for",
    "parse_memory",
    "plan_memory",
    "require_fit",
]
