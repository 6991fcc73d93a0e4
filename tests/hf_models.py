"""Small random Hugging Face models, built offline from transformers configs, for conversion tests.

One per supported family, each exercising what its conversions usually get wrong: grouped-query
attention (Llama, Mistral), Llama-3 RoPE scaling, Q/K/V biases (Qwen2), tied embeddings and
multi-query attention (SmolLM2-shaped), per-head Q/K norms (Qwen3), and Llama-3.2's tied
embeddings with RoPE scaling. A small word-level tokenizer goes with each.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

VOCAB = 256  # model rows; the tokenizer has fewer
TOKENIZER_WORDS = 200

COMMON = {
    "hidden_size": 64,
    "intermediate_size": 160,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": VOCAB,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

ARCHS = {
    "llama": ("LlamaConfig", {}),
    "llama3": (
        "LlamaConfig",
        {
            "rope_theta": 500000.0,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        },
    ),
    "mistral": ("MistralConfig", {"sliding_window": None, "rope_theta": 1e6}),
    "qwen2": ("Qwen2Config", {"rope_theta": 1e6}),
    "smollm2": ("LlamaConfig", {"tie_word_embeddings": True}),
    # Qwen3: RMSNorm over each head's queries and keys, a head size that is not hidden / heads
    "qwen3": ("Qwen3Config", {"rope_theta": 1e6, "head_dim": 32, "tie_word_embeddings": False}),
    # Llama-3.2 (1B/3B): tied embeddings, Llama-3 RoPE scaling, explicit head size
    "llama32": (
        "LlamaConfig",
        {
            "tie_word_embeddings": True,
            "head_dim": 16,
            "rope_theta": 500000.0,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 32.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        },
    ),
}


def write_tokenizer(directory: Path, words: int = TOKENIZER_WORDS) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    for i in range(words - len(vocab)):
        vocab[f"w{i}"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    from tokenizers import AddedToken

    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<unk>", "<s>", "</s>", "<pad>")])
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "pad_token": "<pad>",
                "unk_token": "<unk>",
            }
        )
    )


def transformers_lm_loss(hf_dir: Path, batches: list[dict]) -> float:
    """The mean LM loss of the original model in transformers over sci-scale batches (tokens,
    labels, loss mask), in float64: what a training step's ``lm_loss`` must equal."""
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    total, count = 0.0, 0.0
    with torch.no_grad():
        for b in batches:
            logits = reference(b["tokens"]).logits.double()
            ce = torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), b["labels"].flatten(), reduction="none"
            )
            mask = b["loss_mask"].flatten().double()
            total += float((ce * mask).sum())
            count += float(mask.sum())
    return total / count


def build_hf_model(name: str, directory: Path, seed: int = 0, **overrides) -> Path:
    import transformers

    class_name, extra = ARCHS[name]
    config = getattr(transformers, class_name)(**{**COMMON, **extra, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random norms and biases too (they start at 1 and 0): a swapped norm must show in logits.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif n.endswith(".bias"):
                p.normal_(0.0, 0.1)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    write_tokenizer(directory)
    return directory
