"""A Hugging Face backbone's own tokenizer (``tokenizer.json``), with the surface sci-scale reads.

Continued pretraining must tokenize corpus and pairs exactly as the backbone was trained, so the
tokenizer comes from the model's directory and is run by the ``tokenizers`` library: offline, and
never executing code from the directory (no ``trust_remote_code``, no pickles).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from sci_scale.data.tokenizer_base import (
    TokenizerBase,
    TokenizerError,
    id_list,
    unique_identifiers,
)

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)


def is_hf_tokenizer_dir(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / TOKENIZER_FILE).is_file()


def _token_id(tok: Tokenizer, value: Any) -> int | None:
    """An id from a tokenizer_config entry: a string, or {"content": ...} as transformers writes."""
    if isinstance(value, dict):
        value = value.get("content")
    return tok.token_to_id(value) if isinstance(value, str) else None


class HFTokenizer(TokenizerBase):
    """``tokenizer.json`` + ``tokenizer_config.json`` of a Hugging Face model directory.

    ``eod`` is the model's eos token (documents are packed with it, as the backbone saw them).
    ``pad`` must differ from it (megatron masks the loss on pad): the configured pad token, else
    the first special token that is neither eos nor bos.
    """

    def __init__(self, directory: str | Path) -> None:
        root = Path(directory)
        path = root / TOKENIZER_FILE
        if not path.is_file():
            raise TokenizerError(f"{root} has no {TOKENIZER_FILE}")
        super().__init__(str(root), {"library": "huggingface-tokenizers"})
        self.model_path = path
        self.directory = root
        self._tok = Tokenizer.from_file(str(path))
        config_path = root / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        model_config_path = root / "config.json"
        model_config = (
            json.loads(model_config_path.read_text()) if model_config_path.is_file() else {}
        )
        eos = _token_id(self._tok, config.get("eos_token"))
        if eos is None and isinstance(model_config.get("eos_token_id"), int):
            eos = model_config["eos_token_id"]
        if eos is None:
            raise TokenizerError(f"{root}: no eos token (tokenizer_config.json eos_token)")
        self._eos = eos
        self._bos = _token_id(self._tok, config.get("bos_token"))
        pad = _token_id(self._tok, config.get("pad_token"))
        if pad is None or pad == eos:
            specials = sorted(
                idx for idx, token in self._tok.get_added_tokens_decoder().items() if token.special
            )
            pad = next((i for i in specials if i not in (eos, self._bos)), None)
        if pad is None:
            raise TokenizerError(
                f"{root}: no pad token distinct from eos; add one to tokenizer_config.json"
            )
        self._pad = pad
        self.unique_identifiers = unique_identifiers(self, path)

    def tokenize(self, text: str) -> list[int]:
        """Text to ids, without bos or eos (the caller adds eod between documents)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        """Many texts at once (the tokenizers library encodes a batch in parallel, in Rust)."""
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def detokenize(self, ids: Sequence[int] | Any) -> str:
        return self._tok.decode(id_list(ids), skip_special_tokens=True)

    def apply_chat_template(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} is used for pretraining text only")

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def vocab(self) -> dict[str, int]:
        return self._tok.get_vocab(with_added_tokens=True)

    @property
    def eod(self) -> int:
        return self._eos

    @property
    def eos(self) -> int:
        return self._eos

    @property
    def bos(self) -> int | None:
        return self._bos

    @property
    def pad(self) -> int:
        return self._pad
