"""The SCI branch's per-example attention without a dense mask.

The branch attends causally within each example through an ``ExampleLayout`` (examples unpacked
into rows, grouped by width, plain causal SDPA per group). It must equal the dense
``[b, 1, s, s]`` per-example mask it replaces (same weights, same batch, fp32) on pair blocks,
corpus blocks and mixed micro-batches, at TP 1 and TP 2, and its memory must grow linearly with
the sequence length.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from activation_memory import saved_for_backward
from launchers import REPO, torchrun_script

from sci_scale.config import load_config
from sci_scale.data.blocks import pack_block
from sci_scale.data.loader import collate
from sci_scale.model.attention import example_layout
from sci_scale.model.gpt import SCIGPTModel
from sci_scale.model.sci_branch import example_attention_mask
from sci_scale.runtime.distributed import destroy_distributed, init_distributed, seed_everything

TOL = 1e-5
SMALL = [
    "model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
    "model.num_query_groups=2", "model.seq_length=128", "sci.hidden_size=32",
    "sci.num_layers=2", "sci.num_attention_heads=4", "sci.embed_dim=16",
]  # fmt: skip


def pair_ids(seq: int, lengths: list[int]) -> torch.Tensor:
    """Example ids of one pair block: runs of the given lengths, then padding (-1)."""
    rng = np.random.default_rng(0)
    pieces = [rng.integers(5, 100, size=n) for n in lengths]
    owners = [np.full(n, i) for i, n in enumerate(lengths)]
    block = pack_block(pieces, owners, [1] * len(lengths), seq, pad_id=0)
    return collate([block])["example_ids"]


def batches(seq: int) -> dict[str, torch.Tensor]:
    corpus = torch.zeros(2, seq, dtype=torch.long)
    pairs = torch.cat([pair_ids(seq, [12, 15, 9, 14, 30]), pair_ids(seq, [40, 3, 17, 1, 50])])
    return {"pairs": pairs, "corpus": corpus, "mixed": torch.cat([corpus[:1], pairs])}


def max_difference(branch, example_ids: torch.Tensor, seed: int = 0) -> float:
    """Largest |unpacked - masked| over SCI states and input gradients for one batch."""
    b, s = example_ids.shape
    hidden = branch.proj_in.in_features
    device = branch.proj_in.weight.device
    example_ids = example_ids.to(device)
    embeddings = torch.randn(s, b, hidden, generator=torch.Generator().manual_seed(seed))
    embeddings = embeddings.to(device)
    results = []
    for masked in (False, True):
        x = embeddings.clone().requires_grad_(True)
        if masked:
            states = branch.encoder(
                hidden_states=branch.proj_in(x),
                attention_mask=example_attention_mask(example_ids),
                rotary_pos_emb=branch.rotary(s),
            )
        else:
            states = branch.encode(x, example_ids)
        states.pow(2).sum().backward()
        results.append((states.detach(), x.grad))
    (a, ga), (b_, gb) = results
    return max(float((a - b_).abs().max()), float((ga - gb).abs().max()))


@pytest.fixture
def branch():
    init_distributed()
    seed_everything(0)
    model = SCIGPTModel(load_config(None, SMALL), vocab_size=256)
    yield model.sci
    destroy_distributed()


def test_layout_covers_every_token_once() -> None:
    ids = torch.cat([pair_ids(64, [5, 17, 1, 9]), torch.zeros(1, 64, dtype=torch.long)])
    layout = example_layout(ids)
    assert layout is not None
    positions = torch.cat([g.index[g.valid] for g in layout.groups])
    assert sorted(positions.tolist()) == list(range(ids.numel()))
    for g in layout.groups:  # each row is one example, in order, padded at its end only
        tokens = ids.flatten()[g.index]
        assert bool(((tokens == tokens[:, :1]) | ~g.valid).all())
        assert g.width >= 16 and g.width in (16, 32, 64)
    assert example_layout(torch.zeros(3, 64, dtype=torch.long)) is None  # corpus: no unpacking


@pytest.mark.parametrize("kind", ["pairs", "corpus", "mixed"])
def test_unpacked_attention_equals_the_dense_mask(branch, kind: str) -> None:
    assert max_difference(branch, batches(128)[kind]) <= TOL


@pytest.mark.slow
def test_equal_at_tensor_parallel_2(tmp_path: Path) -> None:
    script = tmp_path / "tp2.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import json, sys
            sys.path.insert(0, {str(REPO / "tests")!r})
            import torch
            from test_sci_attention import SMALL, batches, max_difference
            from sci_scale.config import load_config
            from sci_scale.model.gpt import SCIGPTModel
            from sci_scale.runtime.distributed import init_distributed, seed_everything
            init_distributed(tensor=2)
            seed_everything(0)
            model = SCIGPTModel(load_config(None, [*SMALL, "parallel.tensor=2"]), vocab_size=256)
            diffs = {{k: max_difference(model.sci, v) for k, v in batches(128).items()}}
            if torch.distributed.get_rank() == 0:
                print("RESULT" + json.dumps(diffs))
            """
        )
    )
    diffs = torchrun_script(script)
    assert set(diffs) == {"pairs", "corpus", "mixed"}
    assert all(d <= TOL for d in diffs.values()), diffs


def saved_for_backward_mb(batch: int, seq: int, dense: bool = False) -> float:
    """Activation memory one SCI-branch forward holds for its backward, in MB."""
    cfg = load_config(None, [
        "model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
        "model.num_query_groups=2", f"model.seq_length={seq}", "sci.hidden_size=256",
        "sci.num_layers=2", "sci.num_attention_heads=4",
    ])  # fmt: skip
    branch = SCIGPTModel(cfg, vocab_size=256).sci
    ids = (torch.arange(seq) // 64).repeat(batch, 1)  # 64-token examples
    x = torch.randn(seq, batch, 64, requires_grad=True)
    if dense:
        forward = lambda: branch.encoder(  # noqa: E731
            hidden_states=branch.proj_in(x),
            attention_mask=example_attention_mask(ids),
            rotary_pos_emb=branch.rotary(seq),
        )
    else:
        forward = lambda: branch.encode(x, ids)  # noqa: E731
    weights = [*branch.parameters(), *branch.buffers()]
    return saved_for_backward(forward, exclude=weights) / 2**20


def test_memory_is_linear_in_sequence_length(branch) -> None:
    """seq 8192 x 1 holds the same tokens as seq 1024 x 8: with 64-token examples its forward
    must keep at most twice the memory (the dense mask kept ~s^2 per sample)."""
    long = saved_for_backward_mb(1, 8192)
    short = saved_for_backward_mb(8, 1024)
    print(f"SCI branch forward, saved for backward: seq 8192 x 1 {long:.1f} MB, "
          f"seq 1024 x 8 {short:.1f} MB")  # fmt: skip
    assert short > 10  # the measurement sees the forward at all
    assert long <= 2 * short, (long, short)
