"""``sci-scale`` (and ``python -m sci_scale``): one entry point, one sub-command per job.

Sub-commands are thin: they parse arguments, set up logging and call the library. Each group
of them lives in its own module (``train``, ``launch``, ``convert``, ``evaluate``,
``experiment``, ``data``) with its parser and handlers; this one composes them. Errors the user
can fix (config, data, layout) print as one line and exit with status 2; anything else is a bug
and keeps its traceback. SIGTERM and SIGUSR1 are held from the first line of :func:`main`, so
that ``sci-scale train`` stops cleanly on one that comes before its trainer is listening
(``sci_scale.train.stopping``); every other command gets them back as they were once parsed.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
from collections.abc import Callable, Sequence

from sci_scale.cli import convert, data, evaluate, experiment, launch, train
from sci_scale.cli.common import DEFAULT_CONFIG, USER_ERRORS, gather_overrides, resolve_config
from sci_scale.train.stopping import hold_early_signals, release_early_signals

__all__ = ["DEFAULT_CONFIG", "build_parser", "main", "parse_args", "setup_logging"]

# Importers (and tests) that resolve configs through this module find it here too.
_resolve_config = resolve_config

# Commands whose trainer takes over a SIGTERM/SIGUSR1 that came while they were setting up.
HOLDS_SIGNALS = ("train",)

# In the order ``sci-scale --help`` lists them.
COMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    train.add_train,
    launch.add_submit,
    launch.add_plan,
    convert.register,
    evaluate.register,
    experiment.register,
    launch.add_status,
    train.add_bench,
    data.add_pairs,
    data.add_tokenizer,
    data.add_preprocess,
    data.add_data,
)


def setup_logging(verbose: bool = False) -> None:
    from sci_scale.runtime.launch_env import read_dist_env

    rank, _, _ = read_dist_env()
    level = logging.DEBUG if verbose else logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname).1s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stdout,
        force=True,
    )
    # megatron-core logs every dataset index it builds at INFO; keep its warnings only.
    logging.getLogger("megatron").setLevel(logging.DEBUG if verbose else logging.WARNING)


def build_parser() -> argparse.ArgumentParser:
    from sci_scale import __version__

    parser = argparse.ArgumentParser(
        prog="sci-scale",
        description="Megatron-core GPT pretraining with a structural (SCI) branch and SCL.",
    )
    parser.add_argument("--version", action="version", version=f"sci-scale {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for add_commands in COMMANDS:
        add_commands(sub)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse a command line, dotted overrides accepted anywhere after the command.

    Unknown options and stray words exit through argparse (status 2), named; an unknown
    ``--flag`` is never taken for an override.
    """
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    rest = gather_overrides(args, extra)
    if rest:
        hint = ""
        if hasattr(args, "overrides") and any(not token.startswith("-") for token in rest):
            hint = " (an override is section.key=value; a config file comes before them)"
        parser.error(f"unrecognized arguments: {' '.join(rest)}{hint}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    held = hold_early_signals()  # before torch or megatron load: see sci_scale.train.stopping
    try:
        args = parse_args(argv)
        if args.command not in HOLDS_SIGNALS:
            held, pending = {}, release_early_signals(held)
            if pending:  # what would have happened had nothing held it
                signal.raise_signal(signal.Signals[pending])
        status = _run(args)
    finally:
        pending = release_early_signals(held) if held else None
    if pending and status == 0:  # came too early for the trainer to stop on it
        print(f"sci-scale {args.command}: stopped by {pending}", file=sys.stderr)
        return 128 + signal.Signals[pending]
    return status


def _run(args: argparse.Namespace) -> int:
    setup_logging(args.verbose)
    trust = contextlib.nullcontext()
    if getattr(args, "trust_checkpoint", False):
        from sci_scale.checkpoint.trust import trusted_checkpoints

        trust = trusted_checkpoints()
        logging.getLogger("sci_scale").warning(
            "--trust-checkpoint: checkpoint files are unpickled without restriction"
        )
    try:
        with trust:
            return args.handler(args)
    except USER_ERRORS as exc:
        print(f"sci-scale {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sci-scale: interrupted", file=sys.stderr)
        return 130
