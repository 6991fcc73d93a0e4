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
    assert batched == single
    assert len(generated) <= 5 and tok.eod not in generated


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


def test_stopping_wrong_continuations_early_keeps_the_score(make_config) -> None:
    """Exact match with early stopping equals exact match of the full greedy decoding, on
    targets the model gets right (its own full outputs) and wrong (the gold answers)."""
    from sci_scale.checkpoint.load import load_whole_model, single_process
    from sci_scale.checkpoint.state import read_run_state
    from sci_scale.data.tokenizer import load_tokenizer
    from sci_scale.train.trainer import train

    result = train(make_config("train.steps=3"))
    pairs = gen.scan_pairs("simple", limit=12)
    with single_process():
        loaded = load_whole_model(result.checkpoint)
        tok = load_tokenizer(read_run_state(result.checkpoint).tokenizer["path"])
        generator = gen.GreedyGenerator(loaded.model, tok, loaded.rows, max_new_tokens=6)
        full = generator([gen.prompt(c) for c, _ in pairs])
        mixed = [(c, full[i] if i % 3 else gold) for i, (c, gold) in enumerate(pairs)]
        early = gen.exact_match(generator, "scan", mixed)  # a GreedyGenerator stops early
        plain = gen.exact_match(lambda prompts: generator(prompts), "scan", mixed)
    assert (
        early.correct
        == plain.correct
        == sum(out.split() == gold.split() for out, (_, gold) in zip(full, mixed, strict=True))
    )
    assert early.correct >= 8  # every one of its own outputs
