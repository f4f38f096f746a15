"""genpi: Generative Prompt Internalization (GenPI) with LoRA adapters."""

__version__ = "0.1.0"
