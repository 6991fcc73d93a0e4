"""What several command groups share: the config positionals, dotted overrides, ``--gpu-memory``.

Kept free of heavy imports: every ``sci-scale`` invocation builds the whole parser, and
``sci-scale status`` or ``--help`` must answer without loading torch.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from pathlib import Path

from sci_scale.config import Config, load_config
from sci_scale.errors import UserError

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"

# Errors the user can fix: ``main`` prints them as one line and exits with status 2.
USER_ERRORS = (UserError, FileNotFoundError)

YAML_SUFFIXES = (".yaml", ".yml")

# section.key[.key...]=value; the value may be empty or hold "=" itself.
OVERRIDE = re.compile(r"\w+(?:\.\w+)+=.*", re.DOTALL)


def is_override(token: str) -> bool:
    return OVERRIDE.fullmatch(token) is not None


def add_config_arguments(
    parser: argparse.ArgumentParser,
    overrides_example: str,
    config_help: str = "YAML config (default: configs/tiny.yaml)",
    optional: bool = True,
) -> None:
    """The ``[config] [overrides ...]`` positionals of a command that builds a config.

    A parser holding ``overrides`` is what :func:`gather_overrides` recognises; the overrides
    the user typed after an option reach it there, not through argparse.
    """
    parser.add_argument("config", nargs="?" if optional else None, help=config_help)
    parser.add_argument("overrides", nargs="*", help=f"dotted overrides, e.g. {overrides_example}")


def gather_overrides(args: argparse.Namespace, extra: Sequence[str]) -> list[str]:
    """Move every dotted override into ``args.overrides``, wherever it was typed; return the rest.

    argparse fills a positional list from one run of positionals only, so overrides typed after
    an option arrive in ``extra`` (from ``parse_known_args``). They keep their order, which
    matters when two set the same key. A first positional holding ``=`` is an override, not a
    config file, unless it names a YAML file. Whatever is returned (unknown options, words
    that are no override) is for the caller to report as an argparse error.
    """
    if not hasattr(args, "overrides"):
        return list(extra)
    config, positional = args.config, [*args.overrides, *extra]
    if config is not None and "=" in config and not config.endswith(YAML_SUFFIXES):
        config, positional = None, [config, *positional]
    args.config = config
    args.overrides = [token for token in positional if is_override(token)]
    return [token for token in positional if not is_override(token)]


def resolve_config(path: str | None) -> Path | None:
    if path is None:
        return DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None
    return Path(path)


def config_from_args(args: argparse.Namespace) -> Config:
    return load_config(resolve_config(args.config), list(args.overrides))


def add_trust_argument(parser: argparse.ArgumentParser) -> None:
    """``--trust-checkpoint``: for commands that read checkpoints someone else may have written."""
    parser.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="load checkpoints with unrestricted pickle (only for files you wrote or trust; "
        "never the default)",
    )


def add_gpu_memory_argument(parser: argparse.ArgumentParser) -> None:
    def gpu_memory(text: str) -> int:
        from sci_scale.launch.memory_plan import parse_memory

        try:
            return parse_memory(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parser.add_argument(
        "--gpu-memory",
        type=gpu_memory,
        default="80GB",
        help="memory of one GPU: 80GB, 80GiB, 141GB, or a number of GB (default 80GB)",
    )
