"""Model and tokenizer factory: the built-in tiny model or any pretrained causal LM, LoRA, 4-bit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from genpi.errors import GenpiError

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16", "auto": "auto"}


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    if cfg is None:
        return default
    value = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
    return default if value is None else value


def _plain(cfg: Any) -> dict[str, Any]:
    if cfg is None:
        return {}
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except ImportError:
        pass
    return dict(cfg)


def resolve_model_path(model_cfg: Any) -> str:
    """A local folder or hub name that transformers and vLLM load: ``tiny`` builds the built-in model."""
    name = str(_get(model_cfg, "name_or_path", "tiny"))
    if name == "tiny":
        from genpi.models.tiny import build_tiny

        return str(build_tiny(_plain(_get(model_cfg, "tiny", {}))))
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise GenpiError(f"model.name_or_path={name} is a file; point it at the model's folder")
        return str(path)
    if name.startswith(("/", ".", "~")) or name.count("/") > 1:
        raise GenpiError(f"model path does not exist: {name} (set model.name_or_path to a model folder or a hub name)")
    return name  # a hub name such as meta-llama/Meta-Llama-3-8B-Instruct


def model_fingerprint(model_cfg: Any) -> str:
    """A short name of the base model, to refuse adapters trained on another base."""
    name = str(_get(model_cfg, "name_or_path", "tiny"))
    if name == "tiny":
        return Path(resolve_model_path(model_cfg)).name
    return name.rstrip("/")


def load_tokenizer(model_cfg: Any):
    from transformers import AutoTokenizer

    path = resolve_model_path(model_cfg)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=bool(_get(model_cfg, "trust_remote_code", False)))
    except OSError as err:
        raise GenpiError(f"cannot load a tokenizer from {path}: {err}".splitlines()[0]) from None
    template = _get(model_cfg, "chat_template")
    if template:
        tok.chat_template = template
    if not tok.chat_template:
        raise GenpiError(f"the tokenizer of {path} has no chat template: set model.chat_template to a Jinja template")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def _check_4bit() -> Any:
    import torch

    if not torch.cuda.is_available():
        raise GenpiError("4-bit loading needs a CUDA GPU and bitsandbytes: set model.load_in_4bit=false on this machine")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise GenpiError("4-bit loading needs bitsandbytes: pip install 'genpi[quant]', or set model.load_in_4bit=false"
                         ) from None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                              bnb_4bit_use_double_quant=True)


def load_model(model_cfg: Any, for_training: bool = True):
    """The causal LM (safetensors only; remote code only when ``model.trust_remote_code=true``), with LoRA
    applied when ``for_training`` and ``model.lora.enabled``."""
    import torch
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(model_cfg)
    dtype_name = DTYPES.get(str(_get(model_cfg, "dtype", "float32")))
    if dtype_name is None:
        raise GenpiError(f"model.dtype={_get(model_cfg, 'dtype')!r} is unknown; choose one of {sorted(DTYPES)}")
    kwargs: dict[str, Any] = {
        "dtype": dtype_name if dtype_name == "auto" else getattr(torch, dtype_name),
        "trust_remote_code": bool(_get(model_cfg, "trust_remote_code", False)),
        "use_safetensors": True,
        "attn_implementation": _get(model_cfg, "attn_implementation", "sdpa"),
    }
    four_bit = bool(_get(model_cfg, "load_in_4bit", False))
    if four_bit:
        kwargs["quantization_config"] = _check_4bit()
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as err:
        raise GenpiError(f"cannot load model {path}: {str(err).splitlines()[0]}") from None
    if four_bit and for_training:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if for_training:
        model = apply_lora(model, _get(model_cfg, "lora", {}))
    return model


def apply_lora(model, lora_cfg: Any):
    """Wrap ``model`` in a peft LoRA adapter (the paper: r=16, alpha=32, dropout 0.05, all linear layers),
    or make every parameter trainable when ``lora.enabled`` is false (full fine-tuning)."""
    if not bool(_get(lora_cfg, "enabled", True)):
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    targets = _get(lora_cfg, "target_modules", "all-linear")
    if not isinstance(targets, str):
        targets = list(targets)
    config = LoraConfig(r=int(_get(lora_cfg, "r", 16)), lora_alpha=int(_get(lora_cfg, "alpha", 32)),
                        lora_dropout=float(_get(lora_cfg, "dropout", 0.05)), target_modules=targets,
                        bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def load_model_and_tokenizer(model_cfg: Any, for_training: bool = True):
    tok = load_tokenizer(model_cfg)
    return load_model(model_cfg, for_training=for_training), tok
