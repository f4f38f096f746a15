"""Models: the built-in tiny model, any pretrained causal LM, LoRA, quantization."""

from genpi.models.factory import (
    apply_lora,
    load_model,
    load_model_and_tokenizer,
    load_tokenizer,
    model_fingerprint,
    resolve_model_path,
)

__all__ = ["apply_lora", "load_model", "load_model_and_tokenizer", "load_tokenizer", "model_fingerprint",
           "resolve_model_path"]
