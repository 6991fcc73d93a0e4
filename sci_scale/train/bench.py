"""Throughput of a config, and what the SCI branch costs: ``sci-scale bench``.

The config runs as given and again with ``sci.mode=off``, in one process, alternating one
optimizer step of each so that machine noise (other jobs, frequency changes) falls on both
alike. Both read the same blocks in the same order, pair blocks included at their natural rate.
With ``baseline``, a plain ``transformers`` Llama of the same shape (SDPA attention, torch
AdamW, the same micro-batches and accumulation) is timed in the same loop: what a user would
write instead of sci-scale.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sci_scale.config import Config
from sci_scale.model.gpt import model_vocab_size, padded_vocab_size
from sci_scale.runtime.distributed import destroy_distributed
from sci_scale.train.flops import FORMULA, H100_BF16_DENSE_TFLOPS, count_flops
from sci_scale.train.trainer import Trainer

log = logging.getLogger("sci_scale.bench")


@dataclass
class BenchResult:
    variant: str
    step_times_s: list[float]
    tokens_per_step: int
    flops_per_token: int = 0
    processes: int = 1

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
            "median_step_s": self.median_step_s,
            "tokens_per_s": self.tokens_per_s,
            "tflops_per_device": self.tflops_per_device,
            "flops_per_token": self.flops_per_token,
            "step_times_s": self.step_times_s,
        }


class TransformersBaseline:
    """One optimizer step of a plain transformers model of the config's backbone shape (Llama;
    Qwen2 with Q/K/V biases)."""

    def __init__(self, cfg: Config, vocab: int, seed: int = 0) -> None:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        from sci_scale.convert.hf_config import hf_config_from_model

        m, t = cfg.model, cfg.train
        torch.manual_seed(seed)
        dtype = torch.bfloat16 if m.params_dtype == "bf16" else torch.float32
        # The same transformers configuration an export of this model would carry.
        fields = hf_config_from_model(m, vocab, None, m.params_dtype)
        for key in ("architectures", "torch_dtype", "bos_token_id", "eos_token_id"):
            fields.pop(key)
        config = AutoConfig.for_model(fields.pop("model_type"), **fields)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = AutoModelForCausalLM.from_config(
            config, attn_implementation="sdpa", dtype=dtype
        ).to(device)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=t.lr, betas=(t.adam_beta1, t.adam_beta2),
            weight_decay=t.weight_decay,
        )  # fmt: skip
        self.micro = [
            torch.randint(0, vocab, (t.micro_batch_size, m.seq_length), device=device)
            for _ in range(t.global_batch_size // t.micro_batch_size)
        ]

    def step(self) -> None:
        import torch

        for tokens in self.micro:
            loss = self.model(input_ids=tokens, labels=tokens).loss / len(self.micro)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()


def _variant(cfg: Config, run_dir: Path, **sci: object) -> Config:
    new = dataclasses.replace(
        cfg,
        run=dataclasses.replace(cfg.run, dir=str(run_dir)),
        sci=dataclasses.replace(cfg.sci, **sci),
        logging=dataclasses.replace(cfg.logging, wandb_mode="disabled", console=False),
        checkpoint=dataclasses.replace(cfg.checkpoint, save_final=False),
    )
    if new.data.cache_dir is None:  # share one data cache: both variants read the same blocks
        new = dataclasses.replace(
            new, data=dataclasses.replace(new.data, cache_dir=str(run_dir.parent / "data"))
        )
    return new


def bench(cfg: Config, steps: int, warmup: int, baseline: bool = False) -> list[BenchResult]:
    """Median step time and tokens/s of ``cfg``, of the same config without the branch, and
    (``baseline``) of a plain transformers Llama step of the same shape."""
    with tempfile.TemporaryDirectory(prefix="sci-scale-bench-") as tmp:
        variants = {"sci": _variant(cfg, Path(tmp) / "sci")}
        if cfg.sci.mode != "off":
            variants["off"] = _variant(cfg, Path(tmp) / "off", mode="off")
        trainers = {}
        for name, variant in variants.items():
            trainer = Trainer(variant)
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
            steppers["transformers"] = TransformersBaseline(variants["sci"], vocab).step
        times: dict[str, list[float]] = {name: [] for name in steppers}
        tokens = cfg.train.global_batch_size * cfg.model.seq_length
        try:
            for i in range(warmup + steps):
                for name, step in steppers.items():
                    start = time.perf_counter()
                    step()
                    if i >= warmup:
                        times[name].append(time.perf_counter() - start)
        finally:
            destroy_distributed()
    flops = {
        "sci": count_flops(cfg, vocab).flops_per_token,
        "off": count_flops(
            dataclasses.replace(cfg, sci=dataclasses.replace(cfg.sci, mode="off")), vocab
        ).flops_per_token,
    }
    flops["transformers"] = flops["off"]
    return [BenchResult(name, t, tokens, flops[name], world) for name, t in times.items()]


def device_description() -> tuple[str, float | None]:
    """What ran the benchmark, and its dense bf16 peak in TFLOP/s when MFU applies."""
    import platform

    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        return f"GPU: {name}", H100_BF16_DENSE_TFLOPS if "H100" in name else None
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
    out: dict[str, Any] = {
        "device": device,
        "formula": FORMULA,
        "peak_memory_mb": peak_memory_mb(),
        "variants": [r.to_dict() for r in results],
    }
    if peak is not None:
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
    lines = [
        data["device"],
        f"{'variant':<13} {'median step':>12} {'tokens/s':>10} {'TFLOP/s/dev':>12}"
        + (f" {'MFU':>6}" if "mfu" in data["variants"][0] else ""),
    ]
    for r in data["variants"]:
        mfu = f" {r['mfu']:>6.1%}" if "mfu" in r else ""
        lines.append(
            f"{r['variant']:<13} {r['median_step_s'] * 1e3:>10.1f}ms {r['tokens_per_s']:>10,.0f} "
            f"{r['tflops_per_device']:>12.4f}{mfu}"
        )
    if "sci_step_time_ratio" in data:
        lines.append(f"SCI branch step-time ratio (sci / off): {data['sci_step_time_ratio']:.3f}")
    if "tokens_per_s_vs_transformers" in data:
        lines.append(
            "sci-scale (backbone) / transformers tokens/s: "
            f"{data['tokens_per_s_vs_transformers']:.3f}"
        )
    lines.append(f"peak memory: {data['peak_memory_mb']:,.0f} MB")
    if "mfu" not in data["variants"][0]:
        lines.append("no MFU: not an H100 (the peak it is measured against)")
    lines.append(FORMULA)
    return "\n".join(lines)
