"""Throughput of a config, and what the SCI branch costs: ``sci-scale bench``.

The config runs as given and again with ``sci.mode=off``, in one process, alternating one
optimizer step of each so that machine noise (other jobs, frequency changes) falls on both
alike. Both read the same blocks in the same order, pair blocks included at their natural rate.
With ``baseline``, a plain ``transformers`` Llama of the same shape (SDPA attention, torch
AdamW, the same micro-batches and accumulation) is timed in the same loop: what a user would
write instead of sci-scale.

Peak GPU memory is reported for the process and per variant. All variants stay resident while
the steps alternate, so the process peak holds all of them; a variant's own peak is estimated
from allocation deltas (``torch.cuda.memory_allocated``): what its setup and its steps left
allocated, plus the largest rise above that within one of its steps (the peak statistics are
reset before every step). This needs no separate pass and keeps the alternation; the estimate
counts a buffer that megatron shares between the two megatron variants for the variant that
allocated it first. On a CPU only the process's peak RSS is reported.
"""

from __future__ import annotations

import logging
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sci_scale.config import Config
from sci_scale.model.gpt import model_vocab_size
from sci_scale.model.shapes import padded_vocab_size
from sci_scale.runtime.distributed import destroy_distributed
from sci_scale.train.flops import FORMULA, H100_BF16_DENSE_TFLOPS, count_flops
from sci_scale.train.trainer import Trainer
from sci_scale.train.transformers_baseline import TransformersBaseline

log = logging.getLogger("sci_scale.bench")

# Dense (no 2:4 sparsity) bf16 Tensor Core peaks in TFLOP/s, the denominator of MFU. Source:
# NVIDIA's H100 and H200 Tensor Core GPU datasheets (nvidia.com/en-us/data-center/h100/ and
# /h200/) list BFLOAT16 Tensor Core 1,979 TFLOPS "with sparsity" for H100 SXM and for H200 SXM
# (the same GH100 die with more and faster memory); dense is half of that, 989 (989.4 in the
# NVIDIA H100 Tensor Core GPU Architecture whitepaper). PCIe and NVL boards run at lower power
# and clocks with figures of their own; they are not in this table and get no MFU.
DENSE_BF16_PEAK_TFLOPS: dict[str, float] = {"H100": H100_BF16_DENSE_TFLOPS, "H200": 989.0}
PEAK_SOURCE = "dense bf16 Tensor Core peak, NVIDIA H100/H200 SXM datasheets"
_OTHER_BOARDS = ("PCIe", "NVL")


@dataclass
class BenchResult:
    variant: str
    step_times_s: list[float]
    tokens_per_step: int
    flops_per_token: int = 0
    processes: int = 1
    label: str = ""
    peak_memory_mb: float | None = None  # this variant's own peak (GPU), see the module doc
    process_peak_memory_mb: float | None = None  # the whole process's GPU peak

    @property
    def median_step_s(self) -> float:
        return statistics.median(self.step_times_s)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.median_step_s

    @property
    def tflops_per_device(self) -> float:
        return self.flops_per_token * self.tokens_per_s / self.processes / 1e12

    def to_dict(self) -> dict[str, Any]:
        return {
            "variant": self.variant,
            "label": self.label or self.variant,
            "median_step_s": self.median_step_s,
            "tokens_per_s": self.tokens_per_s,
            "tflops_per_device": self.tflops_per_device,
            "flops_per_token": self.flops_per_token,
            "peak_memory_mb": self.peak_memory_mb,
            "step_times_s": self.step_times_s,
        }


class MemoryTracker:
    """Each variant's own peak GPU memory while all variants are resident (module doc);
    inert without CUDA."""

    def __init__(self) -> None:
        import torch

        self.enabled = torch.cuda.is_available()
        self.resident: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self.process_peak = 0

    @contextmanager
    def measure(self, name: str) -> Iterator[None]:
        """Around a variant's setup or one of its steps."""
        if not self.enabled:
            yield
            return
        import torch

        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        yield
        torch.cuda.synchronize()
        high, end = torch.cuda.max_memory_allocated(), torch.cuda.memory_allocated()
        own = self.resident.get(name, 0)
        self.peak[name] = max(self.peak.get(name, 0), own + high - start)
        self.resident[name] = own + end - start
        self.process_peak = max(self.process_peak, high)

    def peak_mb(self, name: str) -> float | None:
        return self.peak[name] / 2**20 if self.enabled and name in self.peak else None

    def process_peak_mb(self) -> float | None:
        return self.process_peak / 2**20 if self.enabled else None


def _variant(cfg: Config, run_dir: Path, **sci: object) -> Config:
    new = cfg.replace(
        run=cfg.run.replace(dir=str(run_dir)),
        sci=cfg.sci.replace(**sci),
        logging=cfg.logging.replace(wandb_mode="disabled", console=False),
        checkpoint=cfg.checkpoint.replace(save_final=False),
    )
    if new.data.cache_dir is None:  # share one data cache: both variants read the same blocks
        new = new.replace(data=new.data.replace(cache_dir=str(run_dir.parent / "data")))
    return new


def bench(cfg: Config, steps: int, warmup: int, baseline: bool = False) -> list[BenchResult]:
    """Median step time and tokens/s of ``cfg``, of the same config without the branch, and
    (``baseline``) of a plain transformers Llama step of the same shape."""
    memory = MemoryTracker()
    with tempfile.TemporaryDirectory(prefix="sci-scale-bench-") as tmp:
        variants = {"sci": _variant(cfg, Path(tmp) / "sci")}
        if cfg.sci.mode != "off":
            variants["off"] = _variant(cfg, Path(tmp) / "off", mode="off")
        trainers = {}
        for name, variant in variants.items():
            trainer = Trainer(variant)
            with memory.measure(name):
                trainer.setup()
            if trainer.metrics is not None:
                trainer.metrics.close()  # timing only: nothing is logged
                trainer.metrics = None
            trainers[name] = trainer
        first = next(iter(trainers.values()))
        vocab = padded_vocab_size(
            model_vocab_size(cfg, first.data.tokenizer.vocab_size),
            cfg.model.make_vocab_size_divisible_by,
            cfg.parallel.tensor,
        )
        world = first.env.world_size
        steppers = {name: trainer.train_step for name, trainer in trainers.items()}
        if baseline:
            with memory.measure("transformers"):
                steppers["transformers"] = TransformersBaseline(variants["sci"], vocab).step
        times: dict[str, list[float]] = {name: [] for name in steppers}
        tokens = cfg.train.global_batch_size * cfg.model.seq_length
        try:
            for i in range(warmup + steps):
                for name, step in steppers.items():
                    with memory.measure(name):  # synchronizes the GPU before and after
                        start = time.perf_counter()
                        step()
                        _synchronize()
                        elapsed = time.perf_counter() - start
                    if i >= warmup:
                        times[name].append(elapsed)
        finally:
            destroy_distributed()
    flops = {
        "sci": count_flops(cfg, vocab).flops_per_token,
        "off": count_flops(cfg.replace(sci=cfg.sci.replace(mode="off")), vocab).flops_per_token,
    }
    flops["transformers"] = flops["off"]
    precision = cfg.model.params_dtype + (f", fp8 {cfg.model.fp8}" if cfg.model.fp8 else "")
    labels = {
        "sci": f"sci-scale, SCI {cfg.sci.mode} ({precision})",
        "off": f"sci-scale, SCI off ({precision})",
        "transformers": f"transformers, same shape (SDPA, torch AdamW, {cfg.model.params_dtype})",
    }
    return [
        BenchResult(
            name,
            t,
            tokens,
            flops[name],
            world,
            label=labels[name],
            peak_memory_mb=memory.peak_mb(name),
            process_peak_memory_mb=memory.process_peak_mb(),
        )
        for name, t in times.items()
    ]


def _synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def dense_bf16_peak_tflops(device_name: str) -> float | None:
    """The datasheet peak MFU is measured against, or None for a GPU not in the table."""
    if any(board in device_name for board in _OTHER_BOARDS):
        return None
    for model, peak in DENSE_BF16_PEAK_TFLOPS.items():
        if model in device_name:
            return peak
    return None


def device_description() -> tuple[str, float | None]:
    """What ran the benchmark, and its dense bf16 peak in TFLOP/s when MFU applies."""
    import platform

    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        return f"GPU: {name}", dense_bf16_peak_tflops(name)
    return f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores", None


def peak_memory_mb() -> float:
    import resource

    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KB


def summary(results: list[BenchResult]) -> dict[str, Any]:
    device, peak = device_description()
    by_name = {r.variant: r for r in results}
    process_peaks = [r.process_peak_memory_mb for r in results if r.process_peak_memory_mb]
    out: dict[str, Any] = {
        "device": device,
        "formula": FORMULA,
        "peak_memory_mb": max(process_peaks) if process_peaks else peak_memory_mb(),
        "peak_memory_kind": "GPU allocated" if process_peaks else "process RSS",
        "variants": [r.to_dict() for r in results],
    }
    if peak is not None:
        out["peak_tflops"] = peak
        out["peak_source"] = PEAK_SOURCE
        for r in out["variants"]:
            r["mfu"] = r["tflops_per_device"] / peak
    if "off" in by_name:
        out["sci_step_time_ratio"] = by_name["sci"].median_step_s / by_name["off"].median_step_s
    if "transformers" in by_name:
        base = by_name["off" if "off" in by_name else "sci"]
        out["tokens_per_s_vs_transformers"] = (
            base.tokens_per_s / by_name["transformers"].tokens_per_s
        )
    return out


def report(results: list[BenchResult]) -> str:
    data = summary(results)
    has_mfu = "mfu" in data["variants"][0]
    has_memory = data["variants"][0].get("peak_memory_mb") is not None
    lines = [
        data["device"],
        f"{'variant':<13} {'median step':>12} {'tokens/s':>10} {'TFLOP/s/dev':>12}"
        + (f" {'MFU':>6}" if has_mfu else "")
        + (f" {'peak memory':>12}" if has_memory else ""),
    ]
    for r in data["variants"]:
        mfu = f" {r['mfu']:>6.1%}" if "mfu" in r else ""
        memory = f" {r['peak_memory_mb']:>9,.0f} MB" if r.get("peak_memory_mb") is not None else ""
        lines.append(
            f"{r['variant']:<13} {r['median_step_s'] * 1e3:>10.1f}ms {r['tokens_per_s']:>10,.0f} "
            f"{r['tflops_per_device']:>12.4f}{mfu}{memory}"
        )
    if "sci_step_time_ratio" in data:
        lines.append(f"SCI branch step-time ratio (sci / off): {data['sci_step_time_ratio']:.3f}")
    if "tokens_per_s_vs_transformers" in data:
        lines.append(
            "sci-scale (backbone) / transformers tokens/s: "
            f"{data['tokens_per_s_vs_transformers']:.3f}"
        )
    lines.append(f"peak memory ({data['peak_memory_kind']}): {data['peak_memory_mb']:,.0f} MB")
    if has_mfu:
        lines.append(f"MFU against {data['peak_tflops']:g} TFLOP/s ({data['peak_source']})")
    else:
        lines.append("no MFU: no dense bf16 datasheet peak for this device (H100, H200 SXM)")
    lines.append(FORMULA)
    return "\n".join(lines)


def _ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def markdown_table(data: dict[str, Any]) -> str:
    """A ``summary`` as a markdown table for docs/performance.md: one row per variant, the
    device and the MFU peak above it, the FLOP convention below."""
    variants = data["variants"]
    by_name = {v["variant"]: v for v in variants}
    off, base = by_name.get("off"), by_name.get("transformers")
    peak = data.get("peak_tflops")
    head = f"Device: {data['device']}; " + (
        f"MFU against {peak:g} TFLOP/s ({data.get('peak_source', 'dense bf16 peak')})."
        if peak
        else "no MFU (no dense bf16 datasheet peak for this device)."
    )
    lines = [
        head,
        "",
        "| variant | median step | tokens/s | TFLOP/s per device | MFU | peak memory "
        "| step time vs SCI off | tokens/s vs transformers |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for v in variants:
        mfu = f"{v['mfu']:.1%}" if "mfu" in v else "–"
        memory = v.get("peak_memory_mb")
        memory_cell = "–" if memory is None else f"{memory / 1024:,.1f} GiB"
        vs_off = v["median_step_s"] / off["median_step_s"] if off else None
        vs_base = v["tokens_per_s"] / base["tokens_per_s"] if base else None
        lines.append(
            f"| {v.get('label') or v['variant']} | {v['median_step_s'] * 1e3:,.1f} ms "
            f"| {v['tokens_per_s']:,.0f} | {v['tflops_per_device']:.4g} | {mfu} | {memory_cell} "
            f"| {_ratio(vs_off)} | {_ratio(vs_base)} |"
        )
    lines += [
        "",
        f"Peak memory of the process ({data['peak_memory_kind']}): "
        f"{data['peak_memory_mb'] / 1024:,.1f} GiB. {data['formula']}.",
    ]
    return "\n".join(lines) + "\n"
