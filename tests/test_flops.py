"""FLOP accounting: the formula against a hand count and against the model's real weights."""

from __future__ import annotations

import pytest

from sci_scale.config import load_config
from sci_scale.train.flops import count_flops


def test_hand_count_of_a_small_backbone() -> None:
    cfg = load_config(
        None,
        [
            "sci.mode=off", "model.num_layers=2", "model.hidden_size=64",
            "model.num_attention_heads=4", "model.num_query_groups=2",
            "model.ffn_hidden_size=160", "model.seq_length=128",
        ],
    )  # fmt: skip
    # per layer: qkv 64 x (4 + 2 x 2) x 16 = 8192, proj 64 x 64 = 4096,
    # fc1 64 x 320 = 20480, fc2 160 x 64 = 10240 -> 43008; x 2 layers + output 64 x 256
    flops = count_flops(cfg, vocab=256)
    assert flops.matmul_weights == 2 * 43008 + 16384 == 102400
    assert flops.attention_flops == 12 * 2 * 64 * 128 == 196608
    assert flops.flops_per_token == 6 * 102400 + 196608 == 811008


@pytest.mark.parametrize("sci", ["sci.mode=off", "sci.mode=joint"])
def test_weights_counted_are_the_models_matmul_weights(sci: str) -> None:
    from sci_scale.model.gpt import SCIGPTModel
    from sci_scale.runtime.distributed import destroy_distributed, init_distributed, seed_everything

    cfg = load_config(None, [sci, "model.tie_embeddings=false", "model.num_layers=2"])
    init_distributed()
    seed_everything(0)
    try:
        model = SCIGPTModel(cfg, vocab_size=512)
    finally:
        destroy_distributed()
    matmuls = {
        n: p.numel()
        for n, p in model.named_parameters()
        if p.dim() == 2 and "word_embeddings" not in n and ".head." not in n
    }
    backbone = sum(v for n, v in matmuls.items() if n.startswith("gpt."))
    branch = sum(v for n, v in matmuls.items() if n.startswith("sci."))
    flops = count_flops(cfg, vocab=512)
    assert flops.matmul_weights == backbone
    assert flops.sci_matmul_weights == branch


def test_bench_runs_on_cpu_with_labelled_figures(tmp_path, data_cache) -> None:
    """Figures labelled CPU, no MFU (it is defined against an H100), every figure in the JSON."""
    import json

    from conftest import small_overrides

    from sci_scale.cli.main import main

    out = tmp_path / "bench.json"
    overrides = small_overrides(tmp_path / "run", data_cache)
    assert main(["bench", *overrides, "--steps", "2", "--warmup", "1", "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert figures["device"].startswith("CPU")
    names = [v["variant"] for v in figures["variants"]]
    assert names == ["sci", "off", "transformers"]
    for v in figures["variants"]:
        assert v["tokens_per_s"] > 0 and v["tflops_per_device"] > 0 and "mfu" not in v
    assert figures["sci_step_time_ratio"] > 0 and figures["tokens_per_s_vs_transformers"] > 0
    assert "989 TFLOP/s" in figures["formula"]


def test_fp8_without_transformer_engine_is_a_clear_error() -> None:
    from sci_scale.config import ConfigError
    from sci_scale.model.gpt import SCIGPTModel, backbone_transformer_config
    from sci_scale.runtime.distributed import destroy_distributed, init_distributed, seed_everything

    cfg = load_config(None, ["model.fp8=current"])
    config = backbone_transformer_config(cfg)
    assert (config.fp8, str(config.fp8_recipe)) in (
        ("hybrid", "tensorwise"),
        ("hybrid", "Fp8Recipe.tensorwise"),
    )
    init_distributed()
    seed_everything(0)
    try:
        with pytest.raises(
            ConfigError, match=r"model\.fp8=current needs Transformer Engine on a GPU"
        ):
            SCIGPTModel(cfg, vocab_size=512)
    finally:
        destroy_distributed()


def test_layer_spec_falls_back_to_local_sdpa_without_te() -> None:
    from sci_scale.model.specs import select_layer_spec, transformer_engine_available

    assert not transformer_engine_available()  # CPU machine
    spec, name = select_layer_spec()
    assert name.startswith("megatron local + torch SDPA")
    assert (
        spec.submodules.self_attention.submodules.core_attention.module.__name__ == "SDPAttention"
    )


@pytest.mark.parametrize(
    ("name", "nodes", "billions"),
    [
        ("llama-1b", 1, 1.24),
        ("llama-3b", 1, 3.21),
        ("llama-8b-cluster", 4, 8.03),
        ("llama-70b-cluster", 32, 70.55),
    ],
)
def test_bench_configs_have_their_sizes_and_fit_their_nodes(
    name: str, nodes: int, billions: float
) -> None:
    from launchers import REPO

    from sci_scale.launch.slurm import SubmitOptions, check_layout

    cfg = load_config(REPO / "configs" / "bench" / f"{name}.yaml")
    flops = count_flops(cfg, cfg.model.vocab_size)
    embedding = 0 if cfg.model.tie_embeddings else cfg.model.hidden_size * cfg.model.vocab_size
    assert (flops.matmul_weights + embedding) / 1e9 == pytest.approx(billions, abs=0.005)
    check_layout(cfg, SubmitOptions(nodes=nodes, gpus_per_node=8 if nodes > 1 else 1))
