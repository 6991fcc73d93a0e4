"""The model: causality with the SCI branch fused, the zero-gate identity, and SCL gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sci_scale.config import Config
from sci_scale.data.blocks import pack_block
from sci_scale.data.loader import collate
from sci_scale.model.gpt import ModelOutput, SCIGPTModel
from sci_scale.runtime.distributed import destroy_distributed, init_distributed, seed_everything

VOCAB = 300


@pytest.fixture(autouse=True)
def single_process():
    init_distributed()
    yield
    destroy_distributed()


def build(cfg: Config, seed: int = 7) -> SCIGPTModel:
    seed_everything(seed)
    return SCIGPTModel(cfg, vocab_size=VOCAB)


def pair_batch(seq: int, blocks: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """Pair blocks of random tokens: four examples, templates (10, 10, 20, 20) per block."""
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(blocks):
        lengths = [12, 15, 9, 14]
        pieces = [rng.integers(7, VOCAB, size=n) for n in lengths]
        owners = [np.full(n, i) for i, n in enumerate(lengths)]
        samples.append(pack_block(pieces, owners, [10, 10, 20, 20], seq, pad_id=0))
    return collate(samples)


def forward(
    model: SCIGPTModel,
    batch: dict[str, torch.Tensor],
    labels: bool = True,
    scl_weight: float = 0.0,
) -> ModelOutput:
    """The model's output for a batch in the block format."""
    return model(
        batch["tokens"],
        batch["position_ids"],
        labels=batch["labels"] if labels else None,
        loss_mask=batch["loss_mask"] if labels else None,
        example_ids=batch["example_ids"],
        template_ids=batch["template_ids"],
        scl_weight=scl_weight,
    )


def run(
    model: SCIGPTModel,
    batch: dict[str, torch.Tensor],
    labels: bool = True,
    scl_weight: float = 0.0,
) -> torch.Tensor:
    """Per-token LM loss (``labels``) or logits of a batch in the block format."""
    return forward(model, batch, labels, scl_weight).lm


def logits(model: SCIGPTModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return run(model, batch, labels=False)


@pytest.mark.parametrize("fuse_layer", [0, 1])
def test_causal_with_sci_fused(make_config, fuse_layer: int) -> None:
    cfg = make_config(f"sci.fuse_layer={fuse_layer}")
    model = build(cfg)
    with torch.no_grad():
        model.sci.gate.normal_(std=1.0)  # a trained gate: the branch really shapes the logits
    batch = pair_batch(cfg.model.seq_length)
    base = logits(model, batch)
    t = 20
    changed = {k: v.clone() for k, v in batch.items()}
    changed["tokens"][:, t + 1] = (changed["tokens"][:, t + 1] + 1) % VOCAB
    after = logits(model, changed)
    assert torch.equal(after[:, : t + 1], base[:, : t + 1])
    assert not torch.allclose(after[:, t + 1 :], base[:, t + 1 :])  # the change is visible later

    with torch.no_grad():
        model.sci.gate.zero_()
    assert not torch.allclose(logits(model, batch), base)  # the SCI branch did shape the logits


@pytest.mark.parametrize("fuse_layer", [0, 1])
def test_zero_gate_equals_backbone_bit_for_bit(make_config, fuse_layer: int) -> None:
    joint = build(make_config(f"sci.fuse_layer={fuse_layer}"))
    off = build(make_config("sci.mode=off"))
    assert off.sci is None
    joint_sd, off_sd = joint.state_dict(), off.state_dict()
    for key, value in off_sd.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(joint_sd[key], value), key
    assert torch.count_nonzero(joint.sci.gate) == 0
    batch = pair_batch(joint.cfg.model.seq_length)
    assert torch.equal(logits(joint, batch), logits(off, batch))


def test_one_step_opens_the_gate_and_scl_reaches_sci(make_config) -> None:
    from sci_scale.train.optim import build_optimizer

    cfg = make_config()
    model = build(cfg)
    model.train()
    optimizer = build_optimizer(model, cfg)
    batch = pair_batch(cfg.model.seq_length)
    output = forward(model, batch, scl_weight=1.0)
    per_token, records = output.lm, output.sci
    assert records.num_anchors == 8 and records.scl > 0
    (per_token * batch["loss_mask"]).sum().backward()
    assert torch.count_nonzero(model.sci.gate.grad) > 0
    for name, p in model.sci.named_parameters():
        if name == "proj_out.weight":  # its gradient is gate * (...): zero while the gate is
            assert torch.count_nonzero(p.grad) == 0
            continue
        assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name
    optimizer.step()
    assert torch.count_nonzero(model.sci.gate) > 0

    optimizer.zero_grad()
    run(model, batch, scl_weight=1.0).sum().backward()
    assert torch.count_nonzero(model.sci.proj_out.weight.grad) > 0  # the open gate lets it learn


def test_scl_alone_trains_the_encoder_when_not_fused(make_config) -> None:
    """With ``sci.fuse=false`` the LM loss cannot reach the branch: its gradient is the SCL's."""
    cfg = make_config("sci.fuse=false")
    model = build(cfg)
    model.train()
    batch = pair_batch(cfg.model.seq_length)

    def encoder_grads(scale: float) -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        out = run(model, batch, scl_weight=scale)
        out.sum().backward()
        return [
            torch.zeros_like(p) if p.grad is None else p.grad.clone()
            for p in model.sci.encoder.parameters()
        ]

    with_scl = encoder_grads(1.0)
    assert all(torch.count_nonzero(g) > 0 for g in with_scl)
    assert all(torch.count_nonzero(g) == 0 for g in encoder_grads(0.0))
    doubled = encoder_grads(2.0)
    for a, b in zip(with_scl, doubled, strict=True):
        torch.testing.assert_close(b, 2 * a)


def test_modes_freeze_the_right_parts(make_config) -> None:
    sci_only = build(make_config("sci.mode=sci_only"))
    assert not any(p.requires_grad for p in sci_only.gpt.parameters())
    assert all(p.requires_grad for p in sci_only.sci.encoder.parameters())
    frozen = build(make_config("sci.mode=frozen"))
    assert not any(p.requires_grad for p in frozen.sci.encoder.parameters())
    assert frozen.sci.gate.requires_grad  # the fusion still adapts to the fixed encoder
    assert all(p.requires_grad for p in frozen.gpt.parameters())
    assert not frozen.sci.trains_scl and sci_only.sci.trains_scl and not sci_only.lm_trains


def test_example_mask_blocks_partners(make_config) -> None:
    from sci_scale.model.sci_branch import example_attention_mask

    ids = torch.tensor([[0, 0, 1, 1, -1]])
    mask = example_attention_mask(ids)[0, 0]  # True = masked
    assert not mask[1, 0] and mask[0, 1]  # causal within an example
    assert mask[2, 0] and mask[3, 1]  # the partner never sees the anchor
    assert not mask[3, 2]
