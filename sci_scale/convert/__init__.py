"""Hugging Face import and export (Llama, Mistral, Qwen2, SmolLM2)."""
