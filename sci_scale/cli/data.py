"""The data commands: SCAN pairs, tokenizer training, preprocessing, dataset inspection.

Tokenizer and dataset libraries load inside the handlers, so that building the parser stays
cheap for every other command.
"""

from __future__ import annotations

import argparse
import logging
import sys


def add_pairs(sub: argparse._SubParsersAction) -> None:
    from sci_scale.data.pairs import SCAN_SPLITS

    pairs = sub.add_parser("pairs", help="structural pair data")
    pairs_sub = pairs.add_subparsers(dest="pairs_command", required=True)
    scan = pairs_sub.add_parser(
        "scan",
        help="print a SCAN split as JSONL ({'text': 'IN: <command> OUT: <actions>', ...}) or as "
        "SCAN's own text lines",
    )
    # Checked by scan_split, which also takes combined splits (a+b) and names the valid ones.
    scan.add_argument(
        "--split",
        required=True,
        metavar="SPLIT",
        help=f"{', '.join(SCAN_SPLITS)}, several joined by '+' (e.g. length+template_around_right)"
        ", or all (the 20,910 commands)",
    )
    scan.add_argument("--part", choices=["train", "test"], default="train")
    scan.add_argument(
        "--seed",
        type=int,
        default=0,
        help="order of a train part (test parts and split membership are the published ones)",
    )
    scan.add_argument(
        "--format",
        choices=["jsonl", "txt"],
        default="jsonl",
        help="jsonl (default): one object a line with text, input, output, template and split, "
        "read by preprocess, tokenizer train (key text) and data.user_pairs_path; txt: the "
        "published 'IN: ... OUT: ...' lines",
    )
    scan.set_defaults(handler=cmd_pairs_scan)


def add_tokenizer(sub: argparse._SubParsersAction) -> None:
    tok = sub.add_parser("tokenizer", help="tokenizers")
    tok_sub = tok.add_subparsers(dest="tokenizer_command", required=True)
    tok_train = tok_sub.add_parser(
        "train", help="train a sentencepiece tokenizer (default corpus: stdlib docstrings)"
    )
    tok_train.add_argument(
        "--input",
        nargs="*",
        default=[],
        help="files or globs as for preprocess (default: the built-in corpus)",
    )
    tok_train.add_argument("--max-docs", type=int, help="read at most this many documents")
    tok_train.add_argument(
        "--sample-sentences",
        type=int,
        default=0,
        help="train on a seeded random sample of this many sentences (0: all)",
    )
    tok_train.add_argument("--text-key", default="text")
    tok_train.add_argument("--out", required=True, help="output prefix; writes PREFIX.model")
    tok_train.add_argument(
        "--vocab-size",
        type=int,
        default=2048,
        help="at most this many pieces: a text with fewer trains a smaller vocabulary (logged)",
    )
    tok_train.add_argument(
        "--model-type",
        choices=["bpe", "unigram", "word"],
        default="bpe",
        help="word: one piece per space-separated word, for closed vocabularies (SCAN, COGS)",
    )
    tok_train.add_argument(
        "--symbols",
        type=_symbols,
        default=[],
        metavar="A,B,C",
        help="comma-separated user-defined symbols, each kept as one piece (e.g. I_TURN_LEFT)",
    )
    tok_train.add_argument("--seed", type=int, default=0)
    tok_train.set_defaults(handler=cmd_tokenizer_train)


def _symbols(text: str) -> list[str]:
    """``--symbols A,B,C``: the symbols in order, blanks around commas ignored (the tokenizer
    refuses a symbol holding whitespace, as one error line)."""
    return [s.strip() for s in text.split(",") if s.strip()]


def add_preprocess(sub: argparse._SubParsersAction) -> None:
    pre = sub.add_parser(
        "preprocess", help="corpus files -> megatron indexed dataset (.bin/.idx), in parallel"
    )
    pre.add_argument(
        "--input",
        nargs="+",
        required=True,
        help="files or globs: .jsonl .json .parquet .arrow, or saved datasets directories",
    )
    pre.add_argument("--text-key", default="text")
    pre.add_argument("--tokenizer", required=True, help="sentencepiece .model or HF model dir")
    pre.add_argument("--out", required=True, help="output prefix: writes PREFIX.bin, PREFIX.idx")
    pre.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    pre.add_argument(
        "--append-eod",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="end every document with the tokenizer's eod (default: yes)",
    )
    pre.add_argument("--skip-bad", action="store_true", help="skip and count bad records")
    pre.add_argument("--shard-docs", type=int, default=4096, help="documents per resumable shard")
    pre.set_defaults(handler=cmd_preprocess)


def add_data(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    ins = data_sub.add_parser(
        "inspect", help="counts, lengths and a sample of an indexed dataset; a config's blend"
    )
    ins.add_argument("prefix", nargs="?", help="indexed dataset prefix (PREFIX.bin/.idx)")
    ins.add_argument("--tokenizer", help="to decode a sample (.model or HF directory)")
    ins.add_argument("--config", help="a training config: print its realised blend")
    ins.add_argument("--blocks", type=int, default=10000, help="blocks to count for the blend")
    ins.set_defaults(handler=cmd_data_inspect)


def cmd_pairs_scan(args: argparse.Namespace) -> int:
    import json

    from sci_scale.data.pairs import (
        enumerate_commands,
        format_scan_line,
        interpret,
        scan_split,
        scan_template,
    )

    if args.split == "all":
        pairs = [(command, interpret(command)) for command in enumerate_commands()]
    else:  # an unknown split is a PairDataError (one line, exit 2) before anything is written
        pairs = scan_split(args.split, args.part, seed=args.seed)
    out = sys.stdout
    for command, actions in pairs:
        line = format_scan_line(command, actions)
        if args.format == "jsonl":  # a user-pairs record too: text, template, split
            record = {
                "text": line,
                "input": command,
                "output": " ".join(actions),
                "template": scan_template(command),
                "split": args.part,
            }
            line = json.dumps(record)
        out.write(line + "\n")
    return 0


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    import itertools

    from sci_scale.data.corpus import CorpusError, stdlib_docstrings
    from sci_scale.data.preprocess import BadRecords, iter_texts, resolve_inputs
    from sci_scale.data.tokenizer import SentencePieceTokenizer, train_sentencepiece

    if args.input:
        bad = BadRecords(skip=False)
        texts = (t for p in resolve_inputs(args.input) for t in iter_texts(p, args.text_key, bad))
        texts = list(itertools.islice(texts, args.max_docs)) if args.max_docs else list(texts)
    else:
        texts = stdlib_docstrings()
    if not texts:
        raise CorpusError("no text to train on: the input is empty")
    model = train_sentencepiece(
        texts,
        args.out,
        vocab_size=args.vocab_size,
        model_type=args.model_type,
        seed=args.seed,
        input_sentence_size=args.sample_sentences,
        extra_symbols=args.symbols,
    )
    size = SentencePieceTokenizer(model).vocab_size  # at most --vocab-size: a soft limit
    logging.getLogger("sci_scale").info(
        "trained a %d-piece %s tokenizer (byte fallback, pad/unk/bos/eos, the pair tokens%s) "
        "on %d documents%s -> %s",
        size,
        args.model_type,
        f" and {len(args.symbols)} symbol(s)" if args.symbols else "",
        len(texts),
        f" (a seeded sample of {args.sample_sentences} sentences)" if args.sample_sentences else "",
        model,
    )
    return 0


def cmd_preprocess(args: argparse.Namespace) -> int:
    from sci_scale.data.preprocess import PreprocessOptions, preprocess

    result = preprocess(
        PreprocessOptions(
            inputs=args.input,
            tokenizer=args.tokenizer,
            out=args.out,
            text_key=args.text_key,
            workers=args.workers,
            append_eod=args.append_eod,
            skip_bad=args.skip_bad,
            shard_docs=args.shard_docs,
        )
    )
    skipped = sum(result.skipped.values())
    print(
        f"{result.documents:,} documents, {result.tokens:,} tokens -> {result.prefix}.{{bin,idx}} "
        f"in {result.seconds:.1f}s ({result.tokens_per_s:,.0f} tokens/s, {args.workers} "
        f"worker(s)); {result.bytes_on_disk / max(result.tokens, 1):.2f} bytes per token on disk"
        + (f"; {result.shards_reused} shard(s) reused" if result.shards_reused else "")
        + (f"; skipped {skipped}: {dict(result.skipped)}" if skipped else "")
    )
    return 0


def cmd_data_inspect(args: argparse.Namespace) -> int:
    from sci_scale.data.inspect import inspect_dataset

    print(inspect_dataset(args.prefix, args.tokenizer, args.config, args.blocks))
    return 0
