"""The baseline ``sci-scale bench`` times against: what a user would write instead of sci-scale.

A plain ``transformers`` model of the config's backbone shape, built from the same configuration
an export would carry and trained with torch AdamW on random tokens of the config's micro-batch
shape, so its step time is comparable with the megatron variants' without reading their data.
"""

from __future__ import annotations

from sci_scale.config import Config


class TransformersBaseline:
    """One optimizer step of a plain transformers model of the config's backbone shape (Llama;
    Qwen2 with Q/K/V biases), on sci-scale's device and under its precision policy (autocast
    at ``model.compute_dtype`` over weights of ``model.params_dtype``)."""

    def __init__(self, cfg: Config, vocab: int, seed: int = 0) -> None:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        from sci_scale.convert.hf_config import hf_config_from_model

        m, t = cfg.model, cfg.train
        torch.manual_seed(seed)
        dtype = torch.bfloat16 if m.params_dtype == "bf16" else torch.float32
        # The same transformers configuration an export of this model would carry.
        fields = hf_config_from_model(m, vocab, None, m.params_dtype)
        for key in ("architectures", "torch_dtype", "bos_token_id", "eos_token_id"):
            fields.pop(key)
        config = AutoConfig.for_model(fields.pop("model_type"), **fields)
        from sci_scale.runtime.device import autocast_dtype, current_device

        device = current_device()  # the sci-scale variants' device, set by their setup
        # the same precision policy as sci-scale: autocast at model.compute_dtype
        self.autocast = autocast_dtype(m.compute_dtype, device)
        self.device_type = device.type
        self.model = AutoModelForCausalLM.from_config(
            config, attn_implementation="sdpa", dtype=dtype
        ).to(device)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=t.lr, betas=(t.adam_beta1, t.adam_beta2),
            weight_decay=t.weight_decay,
        )  # fmt: skip
        self.micro = [
            torch.randint(0, vocab, (t.micro_batch_size, m.seq_length), device=device)
            for _ in range(t.global_batch_size // t.micro_batch_size)
        ]

    def step(self) -> None:
        import torch

        for tokens in self.micro:
            with torch.autocast(
                self.device_type,
                dtype=self.autocast or torch.float32,
                enabled=self.autocast is not None,
            ):
                loss = self.model(input_ids=tokens, labels=tokens).loss / len(self.micro)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
