"""SCAN and COGS exact-match evaluators, and greedy decoding with a sci-scale model."""

from __future__ import annotations

from pathlib import Path

import pytest

from sci_scale.eval import generalization as gen

COGS_DIR = Path(__file__).resolve().parent / "data" / "cogs"

# The published test-part sizes of the splits the issue names
PUBLISHED_TEST = {
    "simple": 4182,
    "length": 3920,
    "addprim_jump": 7706,
    "template_around_right": 4476,
}


def gold_model(pairs):
    answers = {gen.prompt(source): gold for source, gold in pairs}
    return lambda prompts: [answers[p] for p in prompts]


@pytest.mark.parametrize("split", list(PUBLISHED_TEST))
def test_scan_evaluator_scores_gold_100_and_silence_0(split: str) -> None:
    pairs = gen.scan_pairs(split)
    assert len(pairs) == PUBLISHED_TEST[split]
    perfect = gen.evaluate_scan(gold_model(pairs), split)
    assert (perfect.examples, perfect.correct, perfect.accuracy) == (len(pairs), len(pairs), 1.0)
    silent = gen.evaluate_scan(lambda prompts: [""] * len(prompts), split)
    assert silent.correct == 0 and silent.accuracy == 0.0


def test_scan_evaluator_counts_a_partly_right_model() -> None:
    pairs = gen.scan_pairs("length")
    answers = gold_model(pairs)

    def half_right(prompts):
        return [a if i % 2 == 0 else a + " I_JUMP" for i, a in enumerate(answers(prompts))]

    result = gen.evaluate_scan(half_right, "length")
    assert result.correct == (len(pairs) + 1) // 2


def test_cogs_evaluator_on_the_in_distribution_test_set() -> None:
    path = COGS_DIR / "dev.tsv"  # the excerpt shipped with the tests
    pairs = gen.cogs_pairs(path)
    assert pairs and all(" OUT: " not in gold for _, gold in pairs)
    assert gen.evaluate_cogs(gold_model(pairs), path).accuracy == 1.0
    assert gen.evaluate_cogs(lambda ps: ["x"] * len(ps), path).accuracy == 0.0


def test_greedy_decoding_is_the_same_batched_and_one_by_one(make_config) -> None:
    from sci_scale.checkpoint.load import load_whole_model, single_process
    from sci_scale.checkpoint.state import read_run_state
    from sci_scale.data.tokenizer import load_tokenizer
    from sci_scale.train.trainer import train

    result = train(make_config("train.steps=3"))
    with single_process():
        loaded = load_whole_model(result.checkpoint)
        model, rows = loaded.model, loaded.rows
        tok = load_tokenizer(read_run_state(result.checkpoint).tokenizer["path"])
        prompts = [gen.prompt(c) for c, _ in gen.scan_pairs("simple", limit=6)]
        batched = gen.GreedyGenerator(model, tok, rows, max_new_tokens=5, batch_size=8)(prompts)
        single = [
            gen.GreedyGenerator(model, tok, rows, max_new_tokens=5, batch_size=1)([p])[0]
            for p in prompts
        ]
        import torch

        generator = gen.GreedyGenerator(model, tok, rows, max_new_tokens=5)
        ids = torch.tensor([tok.tokenize(prompts[0])])
        generated = generator._decode_batch(ids)[0]
        uncached = gen.GreedyGenerator(model, tok, rows, max_new_tokens=5, kv_cache=False)
        assert generator.kv_cache and not uncached.kv_cache
        assert uncached.generate(prompts) == generator.generate(prompts)
    assert batched == single
    assert len(generated.tokens) <= 5 and tok.eod not in generated.tokens
    assert generated.finished == (len(generated.tokens) < 5)  # the budget cut it, or the end


def test_eval_command_scores_a_checkpoint(make_config, tmp_path: Path) -> None:
    import json

    from sci_scale.cli.main import main
    from sci_scale.train.trainer import train

    ckpt = train(make_config("train.steps=2")).checkpoint
    out = tmp_path / "scan.json"
    argv = ["eval", str(ckpt), "--task", "scan", "--split", "length", "--limit", "4",
            "--max-new-tokens", "3", "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert result == {"scan_length": 0.0}  # 2 steps of training, 3 tokens: nothing is right yet
    assert main(["eval", str(ckpt), "--task", "cogs"]) == 2  # no --cogs-path: a clear error


def test_could_still_match_follows_words_and_partial_words() -> None:
    target = ["I_TURN_LEFT", "I_WALK"]
    assert gen.could_still_match("", target)
    assert gen.could_still_match(" I_TU", target)  # a partial first word
    assert gen.could_still_match("I_TURN_LEFT I_WA", target)
    assert not gen.could_still_match("I_TURN_LEFT ", ["I_TURN_LEFTX"])  # the word has ended
    assert not gen.could_still_match("I_TURN_RIGHT", target)
    assert not gen.could_still_match("I_TURN_LEFT I_WALK I_", target)  # longer than the target
    assert not gen.could_still_match("I_JUMP I_WALK", target)


class EndsAt:
    """A tokenizer whose end token is another id (one a barely trained model does produce)."""

    def __init__(self, tok, eod: int) -> None:
        self._tok, self.eod = tok, eod

    def __getattr__(self, name: str):
        return getattr(self._tok, name)


def test_stopping_wrong_continuations_early_keeps_the_score(make_config) -> None:
    """Exact match with early stopping equals exact match of the full greedy decoding, on
    targets the model gets right (its own full outputs, where it ended them) and wrong (the
    gold answers)."""
    import torch

    from sci_scale.checkpoint.load import load_whole_model, single_process
    from sci_scale.checkpoint.state import read_run_state
    from sci_scale.data.tokenizer import load_tokenizer
    from sci_scale.train.trainer import train

    result = train(make_config("train.steps=3"))
    pairs = gen.scan_pairs("simple", limit=12)
    prompts = [gen.prompt(c) for c, _ in pairs]
    with single_process():
        loaded = load_whole_model(result.checkpoint)
        tok = load_tokenizer(read_run_state(result.checkpoint).tokenizer["path"])
        # 3 training steps never produce the end token: take as the end token the one that
        # first appears after other tokens in the most continuations
        ids = [
            gen.GreedyGenerator(loaded.model, tok, loaded.rows, 6)
            ._decode_batch(torch.tensor([tok.tokenize(p)]))[0]
            .tokens
            for p in prompts
        ]
        late = [t for row in ids for k, t in enumerate(row) if k and t not in row[:k]]
        tok = EndsAt(tok, max(set(late), key=late.count))
        generator = gen.GreedyGenerator(loaded.model, tok, loaded.rows, max_new_tokens=6)
        full = generator.generate(prompts)
        mixed = [(c, full[i].text if i % 3 else gold) for i, (c, gold) in enumerate(pairs)]
        early = gen.exact_match(generator, "scan", mixed)  # a GreedyGenerator stops early
        plain = gen.exact_match(lambda prompts: generator.generate(prompts), "scan", mixed)
    right = [
        out.finished and out.text.split() == gold.split()
        for out, (_, gold) in zip(full, mixed, strict=True)
    ]
    assert early.correct == plain.correct == sum(right)
    # every one of its own outputs that it ended with the end token
    assert sum(right) >= sum(full[i].finished for i in range(len(pairs)) if i % 3)
    assert any(c.finished for c in full)  # the row the end token was taken from


# -- end token and KV cache, on small random models ---------------------------------------------

VOCAB = 48


class WordTokenizer:
    """One token per word: ``IN:``, ``OUT:`` and ``w0 .. w45``; ``eod`` is settable."""

    def __init__(self, eod: int = VOCAB + 100) -> None:  # default: never generated
        self.words = ["IN:", "OUT:", *(f"w{i}" for i in range(VOCAB - 2))]
        self.ids = {w: i for i, w in enumerate(self.words)}
        self.eod = eod

    def tokenize(self, text: str) -> list[int]:
        return [self.ids[w] for w in text.split()]

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.tokenize(t) for t in texts]

    def detokenize(self, ids) -> str:
        return " ".join(self.words[int(i)] for i in ids)


def random_model(make_config, *overrides: str):
    """A small random model (GQA: 4 heads, 2 query groups) with an open SCI gate, in fp32.
    Weights are drawn wider than at init, so the logits have clear maxima."""
    from sci_scale.checkpoint.load import whole_model_config
    from sci_scale.model.gpt import SCIGPTModel
    from sci_scale.runtime.distributed import seed_everything

    cfg = whole_model_config(make_config("model.init_method_std=0.2", *overrides))
    seed_everything(11)
    model = SCIGPTModel(cfg, vocab_size=VOCAB)
    if model.sci is not None:
        import torch

        with torch.no_grad():
            model.sci.gate.normal_(std=1.0)  # a trained gate: the branch shapes the logits
    return model.eval()


BRANCHES = {
    "sci_off": ("sci.mode=off",),
    "fused_at_1": ("sci.fuse_layer=1",),
    "fused_at_0": ("sci.fuse_layer=0",),
}


@pytest.mark.parametrize("branch", list(BRANCHES))
def test_kv_cache_logits_equal_full_recomputation(make_config, branch: str) -> None:
    import torch

    from sci_scale.checkpoint.load import sci_logits, single_process
    from sci_scale.model.decoding import CachedDecoder, kv_cache_supported

    with single_process():
        model = random_model(make_config, *BRANCHES[branch])
        assert kv_cache_supported(model)
        assert model.cfg.model.num_query_groups < model.cfg.model.num_attention_heads
        gen_ = torch.Generator().manual_seed(0)
        seq = torch.randint(2, VOCAB, (4, 7), generator=gen_)
        cache = CachedDecoder(model, VOCAB, batch=4, max_length=7 + 6)
        prefill = cache.prefill(seq, last_only=False)
        torch.testing.assert_close(prefill, sci_logits(model, seq, VOCAB), rtol=1e-5, atol=1e-5)
        for step in range(6):
            if step == 3:  # rows leave the batch: the cache keeps the others, reordered
                cache.keep([3, 0, 2])
                seq = seq[[3, 0, 2]]
            new = torch.randint(2, VOCAB, (len(seq),), generator=gen_)
            seq = torch.cat([seq, new[:, None]], dim=1)
            logits = cache.step(new)
            full = sci_logits(model, seq, VOCAB)[:, -1]
            torch.testing.assert_close(logits, full, rtol=1e-5, atol=1e-5)
        context = cache.context
        assert context.sequence_len_offset == 13 and context.max_batch_size == 3
        assert len(context.key_value_memory_dict) == model.cfg.model.num_layers
        if model.sci is None:
            assert context.branch is None
        else:  # the branch's own cache, as deep as its own layers
            assert len(context.branch.key_value_memory_dict) == model.cfg.sci.num_layers
            assert context.branch.sequence_len_offset == 13


@pytest.mark.parametrize("branch", list(BRANCHES))
def test_kv_cache_decodes_the_same_tokens(make_config, branch: str) -> None:
    """Two prompt lengths (4 prompts of 6 tokens, 2 of 9), rows that end with the end token and
    rows that leave once they cannot match their target: the same continuations either way."""
    import numpy as np

    from sci_scale.checkpoint.load import single_process

    rng = np.random.default_rng(1)
    prompts = [
        " ".join(f"w{i}" for i in rng.integers(0, VOCAB - 2, size=n)) for n in [6] * 4 + [9] * 2
    ]
    with single_process():
        model = random_model(make_config, *BRANCHES[branch])
        tok = WordTokenizer()
        free = gen.GreedyGenerator(model, tok, VOCAB, max_new_tokens=12).generate(prompts)
        assert all(len(c.text.split()) == 12 and not c.finished for c in free)
        # the end token: what the first row generates 5th (it ends there, or earlier)
        tok.eod = tok.ids[free[0].text.split()[4]]
        # targets: the full continuation (rows 0, 3) or a wrong word after 1, 2, 3 words
        targets = [
            " ".join(c.text.split()[: 1 + i % 4] + (["IN:"] if i % 3 else []))
            for i, c in enumerate(free)
        ]
        runs = {}
        for kv_cache in (True, False):
            generator = gen.GreedyGenerator(model, tok, VOCAB, 12, batch_size=4, kv_cache=kv_cache)
            assert generator.kv_cache == kv_cache
            runs[kv_cache] = (generator.generate(prompts), generator.generate(prompts, targets))
    assert runs[True] == runs[False]
    plain, early = runs[True]
    assert plain[0].finished and len(plain[0].text.split()) <= 4
    assert len({len(c.text.split()) for c in early}) > 2  # rows left at different steps


def test_a_continuation_cut_off_by_the_budget_scores_0(make_config) -> None:
    from sci_scale.checkpoint.load import single_process

    sources = ["w1 w2 w3", "w4 w5 w6", "w7 w8", "w9 w10 w11 w12"]
    with single_process():
        model = random_model(make_config, "sci.mode=off")
        tok = WordTokenizer()
        free = gen.GreedyGenerator(model, tok, VOCAB, max_new_tokens=5)(
            [gen.prompt(source) for source in sources]
        )
        words = [text.split() for text in free]
        # its own first 4 words, cut off by the budget: wrong (the words alone once counted)
        own = [(source, " ".join(w[:4])) for source, w in zip(sources, words, strict=True)]
        for budget in (4, None):  # None: the targets' 4 tokens + 2
            generator = gen.GreedyGenerator(model, tok, VOCAB, max_new_tokens=budget)
            assert generator.budget([gold for _, gold in own]) == (budget or 6)
            if budget == 4:
                outputs = generator.generate([gen.prompt(source) for source in sources])
                assert [(c.text, c.finished) for c in outputs] == [(g, False) for _, g in own]
            assert gen.exact_match(generator, "own", own).correct == 0
        # the same words ended by the end token (the 5th word, where it is new): right
        row = next(i for i, w in enumerate(words) if w[4] not in w[:4])
        tok.eod = tok.ids[words[row][4]]
        generator = gen.GreedyGenerator(model, tok, VOCAB)
        assert gen.exact_match(generator, "own", own[row : row + 1]).correct == 1
    # fake generators: plain strings are finished; a Continuation says for itself
    gold = [("a", "x y"), ("b", "z")]
    assert gen.exact_match(lambda ps: ["x y", "z"], "fake", gold).correct == 2
    cut = [gen.Continuation("x y", False), gen.Continuation("z", True)]
    assert gen.exact_match(lambda ps: cut, "fake", gold).correct == 1


def test_token_budget_follows_the_targets() -> None:
    tok = WordTokenizer()
    generator = gen.GreedyGenerator(None, tok, VOCAB, kv_cache=False)  # type: ignore[arg-type]
    assert generator.budget(["w1 w2", "w1 w2 w3 w4 w5"]) == 5 + 2
    assert generator.budget(None) == gen.DEFAULT_MAX_NEW_TOKENS >= 5 * 48 + 1
    assert gen.GreedyGenerator(None, tok, VOCAB, 9, kv_cache=False).budget(["w1"]) == 9  # type: ignore[arg-type]


def test_sdpa_aligns_a_shorter_causal_query_at_the_end(make_config) -> None:
    """A causal query shorter than its keys (the newest positions of a cache) attends to every
    key up to its own position: SDPA's own is_causal would align it at the start."""
    import torch
    from megatron.core.transformer.enums import AttnMaskType

    from sci_scale.checkpoint.load import single_process

    with single_process():
        core = (
            random_model(make_config, "sci.mode=off")
            .gpt.decoder.layers[0]
            .self_attention.core_attention
        )
        g = torch.Generator().manual_seed(0)
        q = torch.randn(7, 2, 4, 16, generator=g)
        k, v = (torch.randn(7, 2, 2, 16, generator=g) for _ in range(2))
        full = core(q, k, v, None, attn_mask_type=AttnMaskType.causal)
        last = core(q[-3:], k, v, None, attn_mask_type=AttnMaskType.causal)
    torch.testing.assert_close(last, full[-3:], rtol=1e-6, atol=1e-6)
