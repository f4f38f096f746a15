"""Models: the built-in tiny model, any pretrained causal LM, LoRA, 4-bit loading."""

from genpi.models.factory import (
    apply_lora,
    load_model,
    load_model_and_tokenizer,
    load_tokenizer,
    model_fingerprint,
    model_load_kwargs,
    resolve_model_path,
)
from genpi.models.tiny import build_tiny

__all__ = ["apply_lora", "build_tiny", "load_model", "load_model_and_tokenizer", "load_tokenizer",
           "model_fingerprint", "model_load_kwargs", "resolve_model_path"]
