"""From config to training blocks: corpus, tokenizer, indexed dataset, pairs, the 5% blend.

Every artefact is cached under ``data.cache_dir`` (default ``RUN_DIR/data``) under a name derived
from its inputs, so a second run, a resume or another rank reuses it, and a changed input builds
a new one. Rank 0 builds; the others wait at a barrier and read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch.distributed as dist
from megatron.core.datasets.blended_dataset import BlendedDataset
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.utils import Split

from sci_scale.config.schema import Config
from sci_scale.data.blocks import BlockStream, PairBlockDataset, TokenizedExample, template_id
from sci_scale.data.corpus import CorpusError, iter_jsonl_texts, stdlib_docstrings
from sci_scale.data.index_cache import check_index_cache
from sci_scale.data.indexed import (
    check_split_shares,
    open_indexed_dataset,
    read_dataset_meta,
    tokenize_documents,
    write_indexed_dataset,
)
from sci_scale.data.pairs import (
    Example,
    arithmetic_examples,
    cogs_examples,
    load_pair_examples,
    scan_examples,
    user_examples,
)
from sci_scale.data.pairs.scan import ACTIONS as SCAN_ACTIONS
from sci_scale.data.pairs.scan import TURNS as SCAN_TURNS
from sci_scale.data.tokenizer import SentencePieceTokenizer, load_tokenizer, train_sentencepiece
from sci_scale.runtime import collectives

log = logging.getLogger(__name__)


@dataclass
class DataBundle:
    tokenizer: SentencePieceTokenizer
    train: BlendedDataset | BlockStream  # a BlockStream alone when pair_rate == 0
    valid_corpus: BlockStream
    heldout_pairs: PairBlockDataset | None
    pair_rate_realised: float
    cache_dir: Path


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    collectives.barrier()


def _digest(*parts: object) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(json.dumps(part, sort_keys=True, default=str).encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:16]


def corpus_texts(cfg: Config) -> list[str]:
    d = cfg.data
    if d.corpus == "stdlib_docstrings":
        texts = stdlib_docstrings(max_docs=d.max_docs)
    else:
        texts = [t for path in d.corpus_paths for t in iter_jsonl_texts(path, d.text_key)]
        if d.max_docs is not None:
            texts = texts[: d.max_docs]
    if not any(text.strip() for text in texts):
        raise CorpusError(
            f"{_corpus_name(cfg)} is empty: "
            + (f"{len(texts)} documents, every one blank" if texts else "no documents")
        )
    return texts


def _corpus_name(cfg: Config) -> str:
    """The corpus as the config names it, for messages about it."""
    d = cfg.data
    paths = "" if d.corpus == "stdlib_docstrings" else f" ({', '.join(d.corpus_paths)})"
    limit = f" with data.max_docs={d.max_docs}" if d.max_docs is not None else ""
    return f"the corpus data.corpus={d.corpus}{paths}{limit}"


def check_shares(cfg: Config, prefixes: list[str]) -> None:
    """Each share of data.split must get a document of each corpus (else megatron hangs)."""
    names = None if cfg.data.corpus == "indexed" else [_corpus_name(cfg)]
    check_split_shares(prefixes, cfg.data.split, names)


def pair_examples(cfg: Config) -> tuple[list[Example], list[Example]]:
    """(training, held-out) structural examples of the configured sources.

    The held-out side (SCAN test part, held-out arithmetic templates, COGS dev, user lines whose
    split is not ``train``) is only ever used for evaluation.
    """
    d, seed = cfg.data, cfg.train.seed
    train = load_pair_examples(
        d.pair_sources,
        seed=seed,
        scan_split=d.scan_split,
        arithmetic_per_template=d.arithmetic_per_template,
        cogs_path=d.cogs_path,
        user_pairs_path=d.user_pairs_path,
    )
    heldout: list[Example] = []
    for source in d.pair_sources:
        if source == "scan":
            heldout += scan_examples(d.scan_split, seed=seed, part="test")
        elif source == "arithmetic":
            heldout += arithmetic_examples(d.arithmetic_per_template, seed=seed, part="test")
        elif source == "cogs" and d.cogs_path and (Path(d.cogs_path) / "dev.tsv").is_file():
            heldout += cogs_examples(Path(d.cogs_path) / "dev.tsv", split="test")
        elif source == "user" and d.user_pairs_path:
            heldout += [e for e in user_examples(d.user_pairs_path) if e.split != "train"]
    return [e for e in train if e.split == "train"], heldout


def _pair_symbols(sources: list[str]) -> list[str]:
    """SCAN's action names as single pieces: an action sequence is then one token per action."""
    if "scan" not in sources:
        return []
    return sorted(set(SCAN_ACTIONS.values()) | set(SCAN_TURNS.values()))


def _tokenizer(cfg: Config, cache: Path, texts: list[str], train_pairs: list[Example]):
    d = cfg.data
    if d.tokenizer is not None:
        return load_tokenizer(d.tokenizer)  # a .model, or a backbone's directory
    train_pair_texts = [e.text for e in train_pairs]
    key = _digest(
        "spm",
        _pair_symbols(d.pair_sources),
        d.tokenizer_vocab_size,
        d.tokenizer_model_type,
        hashlib.sha256("\n".join(texts + train_pair_texts).encode("utf-8")).hexdigest(),
    )
    prefix = cache / f"tokenizer-{key}"
    model = prefix.with_suffix(".model")
    if _is_main() and not model.exists():
        log.info("training a %d-piece sentencepiece tokenizer", d.tokenizer_vocab_size)
        # Pair texts are a small share of the corpus; include them so that their vocabulary
        # (action names, numbers) tokenizes sensibly.
        train_sentencepiece(
            texts + train_pair_texts,
            prefix,
            vocab_size=d.tokenizer_vocab_size,
            model_type=d.tokenizer_model_type,
            seed=cfg.train.seed,
            extra_symbols=_pair_symbols(d.pair_sources),
        )
    _barrier()
    return SentencePieceTokenizer(model)


def _corpus_prefix(cache: Path, texts: list[str], tokenizer: SentencePieceTokenizer) -> Path:
    # The tokenizer by content, not by path: the same model file reached by another path (a
    # checkpoint records it absolute) must find the same cached corpus.
    identity = {k: v for k, v in tokenizer.unique_identifiers.items() if k != "tokenizer_path"}
    key = _digest(
        "corpus",
        identity,
        hashlib.sha256("\x1e".join(texts).encode("utf-8")).hexdigest(),
    )
    prefix = cache / f"corpus-{key}"
    if _is_main() and not prefix.with_suffix(".idx").exists():
        docs, tokens = write_indexed_dataset(
            tokenize_documents(texts, tokenizer, append_eod=True), prefix, tokenizer.vocab_size
        )
        log.info("corpus: %d documents, %d tokens -> %s.{bin,idx}", docs, tokens, prefix)
    _barrier()
    return prefix


def check_preprocessed(prefixes: list[str], tokenizer: Any) -> list[Path]:
    """Each corpus must be a whole indexed dataset tokenized with this run's tokenizer."""
    out = []
    ours = tokenizer.unique_identifiers.get("sha256")
    for prefix in prefixes:
        open_indexed_dataset(prefix)  # truncated or missing files: a clear error now
        meta = read_dataset_meta(prefix)
        theirs = (meta or {}).get("tokenizer", {}).get("sha256")
        if theirs is not None and theirs != ours:
            raise CorpusError(
                f"{prefix} was tokenized with {meta['tokenizer'].get('tokenizer_path')} "
                f"(sha256 {theirs[:12]}), but data.tokenizer is {tokenizer.model_path} "
                f"(sha256 {ours[:12]}); preprocess it again with this tokenizer"
            )
        out.append(Path(prefix))
    return out


def tokenize_examples(
    examples: list[Example], tokenizer: SentencePieceTokenizer, split_prompt: bool = False
) -> list[TokenizedExample]:
    """Token ids + end token per example. ``split_prompt``: the prompt (``IN: x OUT:``) and
    the target are tokenized apart, as greedy decoding sees them (the prompt, then what the
    model generates), and the prompt's length is recorded for a target-only loss."""
    out = []
    for ex in examples:
        prompt_length = 0
        if split_prompt:
            prompt, _, target = ex.text.partition(" OUT: ")
            head = tokenizer.tokenize(f"{prompt} OUT:")
            ids = [*head, *tokenizer.tokenize(target), tokenizer.eod]
            prompt_length = len(head)
        else:
            ids = [*tokenizer.tokenize(ex.text), tokenizer.eod]
        out.append(
            TokenizedExample(
                np.asarray(ids, dtype=np.int64),
                template_id(ex.template),
                ex.source,
                prompt_length,
            )
        )
    return out


def num_train_samples(cfg: Config) -> int:
    return cfg.train.steps * cfg.train.global_batch_size


def num_eval_samples(cfg: Config) -> int:
    evals = cfg.train.steps // cfg.train.eval_interval + 1
    return max(1, evals) * cfg.train.eval_batches * cfg.train.micro_batch_size


def corpus_prefixes(
    cfg: Config, cache: Path, tokenizer: Any, texts: list[str] | None = None
) -> tuple[list[str], list[float] | None]:
    """The corpus as indexed-dataset prefixes and blend weights: the preprocessed corpora of
    ``data.corpus == "indexed"``, else the configured texts tokenized into ``cache``."""
    d = cfg.data
    if d.corpus == "indexed":
        prefixes = [str(p) for p in check_preprocessed(d.corpus_paths, tokenizer)]
        return prefixes, d.corpus_weights or [1.0] * len(prefixes)
    texts = corpus_texts(cfg) if texts is None else texts
    return [str(_corpus_prefix(cache, texts, tokenizer))], None


def _gpt_config(
    cfg: Config, cache: Path, prefixes: list[str], weights: list[float] | None, tokenizer: Any
) -> GPTDatasetConfig:
    check_index_cache(cache / "index")  # megatron unpickles what it finds there
    return GPTDatasetConfig(
        random_seed=cfg.train.seed,
        sequence_length=cfg.model.seq_length,
        # several corpora: megatron blends them by weight (its BlendedDataset, indices cached)
        blend=(prefixes, weights if len(prefixes) > 1 else None),
        split=cfg.data.split,
        # megatron's BlendedDataset asks torch.distributed for the rank when it caches: a
        # standalone blend of several corpora (no process group) keeps its indices in memory.
        path_to_cache=str(cache / "index") if dist.is_initialized() or len(prefixes) == 1 else None,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=cfg.data.reset_attention_mask,
        eod_mask_loss=False,
        create_attention_mask=False,
    )


def heldout_corpus(cfg: Config, cache: Path, tokenizer: Any) -> GPTDataset:
    """One pass over the corpus's test share (the third number of ``data.split``): blocks of
    documents no run of this config trains or validates on, for held-out perplexity. Exactly
    one epoch is built (megatron shuffles the blocks of several epochs together, which would
    repeat blocks before every one has been seen)."""
    prefixes, weights = corpus_prefixes(cfg, cache, tokenizer)
    check_shares(cfg, prefixes)
    config = _gpt_config(cfg, cache, prefixes, weights, tokenizer)
    _, _, test = BlendedMegatronDatasetBuilder(GPTDataset, [1, 1, 1], lambda: True, config).build()
    if test is None:
        raise CorpusError(
            f"data.split={cfg.data.split!r} has no test share: held-out perplexity needs one "
            "(e.g. 98,1,1)"
        )
    return test


def build_data(cfg: Config, run_dir: Path) -> DataBundle:
    """Everything the trainer reads, built once and cached."""
    d = cfg.data
    cache = Path(d.cache_dir) if d.cache_dir else run_dir / "data"
    cache.mkdir(parents=True, exist_ok=True)
    train_pairs, heldout_pairs = pair_examples(cfg) if d.pair_sources else ([], [])
    if d.corpus == "indexed":  # corpora preprocessed with `sci-scale preprocess`
        tokenizer = load_tokenizer(d.tokenizer)
        prefixes, weights = corpus_prefixes(cfg, cache, tokenizer)
    else:
        texts = corpus_texts(cfg)
        tokenizer = _tokenizer(cfg, cache, texts, train_pairs)
        prefixes, weights = corpus_prefixes(cfg, cache, tokenizer, texts)

    n_valid = num_eval_samples(cfg)
    check_shares(cfg, prefixes)
    corpus_needed = math.ceil(num_train_samples(cfg) * (1 - d.pair_rate) * 1.01) + 1
    gpt_config = _gpt_config(cfg, cache, prefixes, weights, tokenizer)
    train_gpt, valid_gpt, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, [corpus_needed, n_valid, 0], lambda: True, gpt_config
    ).build()
    eod = tokenizer.eod if d.reset_attention_mask else None
    train_corpus = BlockStream(train_gpt, Split.train, "corpus", eod)
    valid_corpus = BlockStream(valid_gpt, Split.valid, "corpus", eod)

    # megatron's BlendedDataset asks torch.distributed for the rank when it caches its index:
    # rank 0 builds and writes it, every other rank only reads it, so rank 0 must go first (as
    # megatron's own builder does). A standalone call (no process group) builds it in memory.
    blend_config = gpt_config if dist.is_initialized() else replace(gpt_config, path_to_cache=None)
    return mix_pairs(
        cfg, cache, tokenizer, (train_corpus, valid_corpus), (train_pairs, heldout_pairs),
        blend_config,
    )  # fmt: skip


def mix_pairs(
    cfg: Config,
    cache: Path,
    tokenizer: Any,
    streams: tuple[BlockStream, BlockStream],
    pairs: tuple[list[Example], list[Example]],
    blend_config: Any,
) -> DataBundle:
    """The training stream with pair blocks blended in at ``data.pair_rate`` (megatron's
    ``BlendedDataset``), and held-out pair blocks for the SCI metrics."""
    d, seed, seq = cfg.data, cfg.train.seed, cfg.model.seq_length
    (train_stream, valid_stream), (train_pairs, heldout_pairs) = streams, pairs
    n_train, n_valid, r = num_train_samples(cfg), num_eval_samples(cfg), d.pair_rate
    train_examples = tokenize_examples(train_pairs, tokenizer, d.target_loss_only)
    heldout_examples = tokenize_examples(heldout_pairs, tokenizer, d.target_loss_only)
    heldout = None
    if heldout_examples:
        try:
            heldout = PairBlockDataset(
                heldout_examples,
                seq,
                tokenizer.pad,
                n_valid,
                seed + 1,
                d.examples_per_template,
                name="heldout pairs",
                target_loss_only=d.target_loss_only,
            )
        except ValueError as exc:
            log.warning("no held-out pair blocks: %s", exc)

    if r == 0 or not train_examples:
        if r > 0:
            log.warning("data.pair_rate=%s but no training pairs were generated", r)
        return DataBundle(tokenizer, train_stream, valid_stream, heldout, 0.0, cache)

    pairs_needed = math.ceil(n_train * r * 1.01) + 1
    pair_ds = PairBlockDataset(
        train_examples,
        seq,
        tokenizer.pad,
        pairs_needed,
        seed,
        d.examples_per_template,
        name="train pairs",
        target_loss_only=d.target_loss_only,
    )

    def blend() -> BlendedDataset:
        return BlendedDataset(
            [train_stream, BlockStream(pair_ds, Split.train, "pairs")],
            [1.0 - r, r],
            n_train,
            blend_config,
        )

    train = blend() if _is_main() else None
    _barrier()
    if train is None:
        train = blend()
    realised = float(np.mean(train.dataset_index == 1))
    log.info(
        "pair blocks: %d templates from %s; realised pair-block rate %.4f (target %.4f)",
        pair_ds.num_templates,
        ", ".join(pair_ds.sources),
        realised,
        r,
    )
    return DataBundle(tokenizer, train, valid_stream, heldout, realised, cache)
