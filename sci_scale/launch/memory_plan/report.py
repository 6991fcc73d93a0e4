"""The plan as the table ``sci-scale plan`` prints: the worst rank's terms in GiB, GB and share
of the GPU, then the layout and the knob that lowers the largest term."""

from __future__ import annotations

from sci_scale.launch.memory_plan.plan import DOC, GB, GIB, LABELS, TERMS, MemoryPlan


def _row(label: str, value: int, gpu: int) -> str:
    return f"  {label:<26}{value / GIB:>9.2f} GiB {value / GB:>9.2f} GB {100 * value / gpu:>7.1f}%"


def format_plan(plan: MemoryPlan) -> str:
    """The plan as a table: one row per term for the worst rank, then the layout."""
    w, gpu = plan.worst, plan.gpu_memory
    dtype = {2: "bf16", 4: "fp32"}[plan.compute_bytes]
    attention = (
        "stores the [b, heads, s, s] scores"
        if plan.attention_stores_scores
        else "keeps O(s) state (flash/fused)"
    )
    lines = [
        f"layout     {plan.layout}, ZeRO-{plan.zero_stage}, micro-batch {plan.micro_batch_size} "
        f"x {plan.microbatches} per step, recompute {plan.recompute}, sequence parallel "
        f"{'on' if plan.sequence_parallel else 'off'}",
        f"precision  weights {plan.params_dtype}, activations {dtype}; "
        f"{'Transformer Engine' if plan.transformer_engine else 'megatron local'} layers, "
        f"attention {attention}",
        f"worst rank pipeline stage {w.stage} of {plan.pipeline} ({w.holds or 'layers only'}; "
        f"{w.in_flight} micro-batch(es) in flight)",
        "",
        f"  {'per GPU':<26}{'GiB':>13}{'GB':>13}{'% GPU':>9}",
    ]
    for term in TERMS:
        lines.append(_row(LABELS[term], getattr(w.terms, term), gpu))
    lines.append(_row("  of which SCI branch", w.sci.total, gpu))
    lines += [
        _row("total", plan.total, gpu),
        _row("GPU memory", gpu, gpu),
        _row("headroom", plan.headroom, gpu),
    ]
    if plan.pipeline > 1:
        others = ", ".join(f"stage {s.stage} {s.terms.total / GIB:.1f} GiB" for s in plan.stages)
        lines.append(f"stages     {others}")
    lines += [
        f"largest    {LABELS[plan.dominant]}; to lower it: {plan.suggestion()}",
        f"formulas   {DOC}",
    ]
    if plan.fits and plan.headroom < 0.05 * gpu:
        lines.append(
            "note       under 5% headroom for the CUDA context, NCCL buffers and fragmentation"
        )
    return "\n".join(lines)
