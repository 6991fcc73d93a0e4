"""Held-out perplexity and the structural probe, checked against direct computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import small_overrides

from sci_scale.data.blocks import TokenizedExample
from sci_scale.eval.probe import probe_embeddings, probe_metrics, probe_set


def _examples(counts: dict[int, int]) -> list[TokenizedExample]:
    rng = np.random.default_rng(0)
    return [
        TokenizedExample(rng.integers(5, 60, size=3 + k % 4), template, "test")
        for template, n in counts.items()
        for k in range(n)
    ]


def test_probe_set_takes_two_of_each_template_that_has_two() -> None:
    examples = _examples({1: 3, 2: 1, 3: 2, 4: 5, 5: 2})
    chosen = probe_set(examples, max_templates=3)
    templates = [e.template_id for e in chosen]
    assert len(chosen) == 6 and all(templates.count(t) == 2 for t in set(templates))
    assert 2 not in templates  # a template with one example has no partner
    assert [id(e) for e in probe_set(examples, 3)] == [id(e) for e in chosen]  # fixed by seed
    assert len(probe_set(examples, max_templates=100)) == 8


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    from sci_scale.config import load_config
    from sci_scale.train.trainer import train

    root = tmp_path_factory.mktemp("suite")
    cfg = load_config(None, [*small_overrides(root / "run", root / "data"), "train.steps=3"])
    return train(cfg).checkpoint


def test_heldout_perplexity_is_the_mean_cross_entropy_of_the_test_share(trained) -> None:
    from megatron.core.datasets.utils import Split

    from sci_scale.checkpoint.load import (
        checkpoint_tokenizer,
        load_whole_model,
        sci_logits,
        single_process,
    )
    from sci_scale.data.pipeline import heldout_corpus
    from sci_scale.eval.perplexity import perplexity

    with single_process():
        loaded = load_whole_model(trained)
        tok = checkpoint_tokenizer(loaded.cfg, loaded.state)
        blocks = heldout_corpus(loaded.cfg, trained.parent.parent / "data", tok)
        assert blocks.index_split == Split.test and len(blocks) >= 3
        # one pass: every block is a distinct stretch of the test share's tokens
        starts = {tuple(blocks[i]["tokens"][:16].tolist()) for i in range(len(blocks))}
        assert len(starts) == len(blocks)
        samples = [blocks[i] for i in range(3)]
        result = perplexity(loaded.model, samples, batch_size=2)
        tokens = torch.stack([torch.as_tensor(s["tokens"]) for s in samples])
        labels = torch.stack([torch.as_tensor(s["labels"]) for s in samples])
        mask = torch.stack([torch.as_tensor(s["loss_mask"]) for s in samples]).float()
        logits = sci_logits(loaded.model, tokens, loaded.rows)
        ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
        direct = float((ce * mask.flatten()).sum() / mask.sum())
    assert result.nll == pytest.approx(direct, rel=1e-5)
    assert result.tokens == int(mask.sum()) and result.ppl == pytest.approx(np.exp(direct))


def test_probe_embeddings_do_not_depend_on_the_batch(trained) -> None:
    from sci_scale.checkpoint.load import load_whole_model, single_process

    examples = _examples({7: 2, 8: 2, 9: 3})
    with single_process():
        model = load_whole_model(trained).model
        batched = probe_embeddings(model, examples, batch_size=64)
        alone = probe_embeddings(model, examples, batch_size=1)
    assert batched.sci is not None and alone.sci is not None
    torch.testing.assert_close(batched.backbone, alone.backbone, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(batched.sci, alone.sci, rtol=1e-5, atol=1e-6)
    assert torch.allclose(batched.backbone.norm(dim=-1), torch.ones(len(examples)))
    assert batched.templates.tolist() == [e.template_id for e in examples]
    metrics = probe_metrics(batched)
    assert {"backbone_recall_at_1", "sci_recall_at_1", "sci_rankme"} <= set(metrics)


def test_identical_examples_are_perfectly_retrieved(trained) -> None:
    from sci_scale.checkpoint.load import load_whole_model, single_process

    base = _examples({1: 1, 2: 1, 3: 1, 4: 1})
    twins = [
        e for ex in base for e in (ex, TokenizedExample(ex.tokens.copy(), ex.template_id, "x"))
    ]
    with single_process():
        metrics = probe_metrics(probe_embeddings(load_whole_model(trained).model, twins))
    assert metrics["backbone_recall_at_1"] == 1.0 and metrics["sci_recall_at_1"] == 1.0
    assert metrics["backbone_pos_cos"] == pytest.approx(1.0)
