"""tools/gpu_check.sh on a CPU machine (its dry run) and the bench's markdown table."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def dry_run(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k != "OUT"} | env
    return subprocess.run(
        ["bash", str(REPO / "tools" / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=60,
        check=False,
    )


def test_dry_run_lists_every_step_with_its_command(tmp_path: Path) -> None:
    result = dry_run(tmp_path, GPU_WHEELS=str(tmp_path / "no-bundle"))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for step in ("environment", "install", "install-te", "gpu-tests", "bench-bf16", "bench-fp8"):
        assert f"== step {step} (timeout " in out
    assert "nvidia-smi" in out
    assert "venv --system-site-packages" in out and "pip install" in out
    assert "--no-index --find-links" in out
    assert "-m pytest -m gpu -ra tests" in out
    assert "bench configs/bench/llama-1b.yaml --steps 10 --warmup 3 --baseline --json" in out
    assert "model.fp8=delayed" in out and "import transformer_engine" in out
    assert "gpu_check.json" in out and "gpu_check.md" in out
    # No bundle here: the dry run says how to make one, and still succeeds.
    assert "MISSING" in out and "bash tools/gpu_wheels.sh" in out
    assert not (tmp_path / "o").exists()  # nothing ran, nothing was written


def test_dry_run_quick_shortens_the_bench(tmp_path: Path) -> None:
    result = subprocess.run(
        ["bash", str(REPO / "tools" / "gpu_check.sh"), "--dry-run", "--quick"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "--steps 3 --warmup 1" in result.stdout


def fabricated_summary() -> dict:
    def variant(name: str, label: str, step_s: float, tokens: float, tflops: float) -> dict:
        return {
            "variant": name,
            "label": label,
            "median_step_s": step_s,
            "tokens_per_s": tokens,
            "tflops_per_device": tflops,
            "flops_per_token": 9_000_000_000,
            "peak_memory_mb": 30_720.0,
            "mfu": tflops / 989.0,
            "step_times_s": [step_s],
        }

    return {
        "device": "GPU: NVIDIA H200",
        "formula": "FLOPs/token = ...; MFU = FLOP/s per GPU / 989 TFLOP/s",
        "peak_memory_mb": 81_920.0,
        "peak_memory_kind": "GPU allocated",
        "peak_tflops": 989.0,
        "peak_source": "dense bf16 Tensor Core peak, NVIDIA H100/H200 SXM datasheets",
        "variants": [
            variant("sci", "sci-scale, SCI joint (bf16)", 1.02, 64_250.0, 500.0),
            variant("off", "sci-scale, SCI off (bf16)", 1.00, 65_536.0, 495.0),
            variant("transformers", "transformers, same shape", 1.60, 40_960.0, 310.0),
        ],
        "sci_step_time_ratio": 1.02,
        "tokens_per_s_vs_transformers": 1.6,
    }


def test_markdown_table_has_the_expected_columns() -> None:
    from sci_scale.train.bench import markdown_table

    text = markdown_table(fabricated_summary())
    rows = [line for line in text.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in rows[0].strip("|").split("|")]
    assert header == [
        "variant",
        "median step",
        "tokens/s",
        "TFLOP/s per device",
        "MFU",
        "peak memory",
        "step time vs SCI off",
        "tokens/s vs transformers",
    ]
    assert len(rows) == 2 + 3  # header, rule, one row per variant
    sci = [cell.strip() for cell in rows[2].strip("|").split("|")]
    assert sci == [
        "sci-scale, SCI joint (bf16)",
        "1,020.0 ms",
        "64,250",
        "500",
        "50.6%",
        "30.0 GiB",
        "1.020",
        "1.569",
    ]
    assert "GPU: NVIDIA H200" in text and "989 TFLOP/s" in text


def test_markdown_table_without_mfu_or_comparisons() -> None:
    from sci_scale.train.bench import markdown_table

    data = fabricated_summary()
    data["device"] = "CPU: x86_64, 2 cores"
    del data["peak_tflops"], data["peak_source"]
    data["variants"] = [v for v in data["variants"] if v["variant"] == "sci"]
    for v in data["variants"]:
        del v["mfu"]
        v["peak_memory_mb"] = None
    row = next(line for line in markdown_table(data).splitlines() if "SCI joint" in line)
    assert [cell.strip() for cell in row.strip("|").split("|")][4:] == ["–"] * 4
    assert "no MFU" in markdown_table(data)


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA H100 PCIe", None),
        ("NVIDIA H200 NVL", None),
        ("NVIDIA A100-SXM4-80GB", None),
    ],
)
def test_mfu_peak_by_device_name(name: str, peak: float | None) -> None:
    from sci_scale.train.bench import dense_bf16_peak_tflops

    assert dense_bf16_peak_tflops(name) == peak
