"""What every tokenizer sci-scale runs shares: megatron's base class, the error, the file hash.

Both the sentencepiece tokenizer (``tokenizer``) and a Hugging Face backbone's own
(``hf_tokenizer``) build on these; the module that picks between them (``tokenizer``'s
``load_tokenizer``) imports both, so the shared part lives here where neither needs the other.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sci_scale.errors import UserError

try:  # megatron-core >= 0.14 types GPTDatasetConfig.tokenizer as this base.
    from megatron.core.tokenizers import MegatronTokenizerBase as TokenizerBase
except ImportError:  # pragma: no cover - older or absent megatron: the duck-typed surface stays

    class TokenizerBase:  # type: ignore[no-redef]
        """Stand-in with the base's constructor contract: path plus config attributes."""

        def __init__(self, path: str, config: dict, **kwargs: Any) -> None:
            self.path = path
            for key, value in config.items():
                setattr(self, key, value)


class TokenizerError(UserError, ValueError):
    """A tokenizer cannot be trained or loaded as asked (a user error, not a bug)."""


def file_sha256(path: Path) -> str:
    """Content hash, so a retrained tokenizer at the same path is still told apart."""
    with path.open("rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()


def unique_identifiers(tokenizer: object, path: Path) -> OrderedDict[str, str]:
    """What megatron hashes into its dataset cache keys: the class, the file and its content,
    so a dataset built with one tokenizer is never reused with another."""
    return OrderedDict(
        [
            ("class", f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}"),
            ("tokenizer_path", str(path)),
            ("sha256", file_sha256(path)),
        ]
    )


def id_list(ids: Sequence[int] | Any) -> list[int]:
    """Token ids from a list, a numpy array or a tensor, as the libraries' decoders take them."""
    return ids.tolist() if hasattr(ids, "tolist") else [int(i) for i in ids]
