"""Model and tokenizer factory: the built-in tiny model or any pretrained causal LM; LoRA; 4-bit loading.

Every function takes the ``model`` config group (``conf/model/*.yaml``) as a plain dict or an OmegaConf
``DictConfig``; missing or null keys take the defaults of ``conf/model/tiny.yaml``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from genpi.utils.errors import GenpiError

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16", "auto": "auto"}

FOUR_BIT_HELP = ("4-bit loading needs a CUDA GPU and bitsandbytes: set model.load_in_4bit=false, or run on a CUDA "
                 "machine with bitsandbytes installed (pip install 'genpi[quant]')")


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    """``cfg[key]`` for a dict or DictConfig, ``default`` when missing or null."""
    if cfg is None:
        return default
    value = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
    return default if value is None else value


def _plain(cfg: Any) -> dict[str, Any]:
    """A DictConfig (or dict) as a plain dict, interpolations resolved."""
    if cfg is None:
        return {}
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except ImportError:
        pass
    return dict(cfg)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _real_vocab_names() -> tuple[str, ...]:
    """The built-in tiny models with a real tokenizer (``model=tiny_llama3_vocab`` ...), see real_vocab.py."""
    from genpi.models.real_vocab import FAMILIES

    return tuple(FAMILIES)


def resolve_model_path(model_cfg: Any) -> str:
    """What transformers and vLLM load for ``model.name_or_path``.

    ``tiny`` (``tiny_agent``) builds (or reuses) the built-in (pre-trained) model and returns its folder; an existing local folder is returned
    as an absolute path; a hub-like name (``org/name``) is returned as it is (loading it needs the hub or its
    cache). A value that looks like a path (starts with ``/``, ``.`` or ``~``) but does not exist is an error.
    """
    name = str(_get(model_cfg, "name_or_path", "tiny"))
    if name == "tiny":
        from genpi.models.tiny import build_tiny

        return str(build_tiny(_plain(_get(model_cfg, "tiny", {}))))
    if name in _real_vocab_names():
        from genpi.models.real_vocab import build_real_vocab

        return str(build_real_vocab(name, _plain(_get(model_cfg, "tiny", {}))))
    if name == "tiny_agent":
        from genpi.models.tiny_agent import build_tiny_agent

        return str(build_tiny_agent({"tiny": _plain(_get(model_cfg, "tiny", {})),
                                     "tiny_agent": _plain(_get(model_cfg, "tiny_agent", {}))}))
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise GenpiError(f"model.name_or_path={name} is a file: point it at the model's folder "
                             "(the one holding config.json)")
        return str(path.resolve())
    if name.startswith(("/", ".", "~")) or name.count("/") > 1:
        raise GenpiError(f"model path {name} does not exist: set model.name_or_path to an existing model folder, "
                         "a hub name such as meta-llama/Meta-Llama-3-8B-Instruct, or tiny")
    return name


def model_fingerprint(model_cfg: Any) -> str:
    """A short name of the base model, recorded with adapters to refuse one trained on another base.

    The tiny model: ``tiny-<hash>``, the tiny_agent: ``tiny_agent-<hash>`` (folder names, computed without building). A local folder: the tiny
    model's name if it is a tiny build, else its absolute path. A hub name: the name.
    """
    name = str(_get(model_cfg, "name_or_path", "tiny"))
    if name == "tiny":
        from genpi.models.tiny import tiny_hash

        return f"tiny-{tiny_hash(_plain(_get(model_cfg, 'tiny', {})))}"
    if name in _real_vocab_names():
        from genpi.models.real_vocab import folder_name

        return folder_name(name, _plain(_get(model_cfg, "tiny", {})))
    if name == "tiny_agent":
        from genpi.models.tiny_agent import agent_folder

        return agent_folder({"tiny": _plain(_get(model_cfg, "tiny", {})),
                             "tiny_agent": _plain(_get(model_cfg, "tiny_agent", {}))}).name
    path = Path(name).expanduser()
    if path.is_dir():
        from genpi.models import real_vocab, tiny, tiny_agent

        built = tiny.is_built(path) or tiny.is_built(path, tiny_agent.MARKER) or real_vocab.is_built(path)
        return path.resolve().name if built else str(path.resolve())
    return name.rstrip("/")


def _remote_code_error(path: str, err: BaseException) -> GenpiError:
    return GenpiError(f"{path} ships its own Python code ({_first_line(err)}): set model.trust_remote_code=true "
                      "only if you trust that repository")


def load_tokenizer(model_cfg: Any):
    """The model's tokenizer, ready for chat: ``model.chat_template`` (a Jinja string) overrides the shipped
    template; a tokenizer without any is an error; a missing pad token becomes EOS; padding is on the right."""
    from transformers import AutoTokenizer

    path = resolve_model_path(model_cfg)
    trust = bool(_get(model_cfg, "trust_remote_code", False))
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust)
    except OSError as err:
        raise GenpiError(f"cannot load a tokenizer from {path}: {_first_line(err)}") from None
    except ValueError as err:
        if "trust_remote_code" in str(err):
            raise _remote_code_error(path, err) from None
        raise
    template = _get(model_cfg, "chat_template")
    if template:
        tok.chat_template = str(template)
    if not tok.chat_template:
        raise GenpiError(f"the tokenizer of {path} has no chat template (a base model, not a chat model?): set "
                         "model.chat_template to a Jinja chat template string, or use the model's instruct version")
    if tok.pad_token_id is None:
        # Padding positions are masked out everywhere; any token id works, EOS exists in every tokenizer.
        tok.pad_token = tok.eos_token
    # Right padding keeps every sequence's positions starting at 0, so a cached prompt prefix lines up.
    tok.padding_side = "right"
    return tok


def _quantization_config() -> Any:
    """The paper's 4-bit setting (QLoRA NF4, bf16 compute, double quantization), or a one-line error."""
    import torch

    if not torch.cuda.is_available():
        raise GenpiError(f"{FOUR_BIT_HELP} (no CUDA GPU found)")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise GenpiError(f"{FOUR_BIT_HELP} (bitsandbytes is not installed)") from None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                              bnb_4bit_use_double_quant=True)


def model_load_kwargs(model_cfg: Any) -> dict[str, Any]:
    """The keyword arguments :func:`load_model` passes to ``AutoModelForCausalLM.from_pretrained``.

    Safetensors only (no pickle); remote code only with ``model.trust_remote_code=true``; ``model.dtype``
    (float32 | bfloat16 | float16 | auto); ``model.attn_implementation`` (default sdpa); with
    ``model.load_in_4bit`` the bitsandbytes NF4 config (raises :class:`GenpiError` without CUDA or bitsandbytes).
    """
    import torch

    dtype = str(_get(model_cfg, "dtype", "float32"))
    if dtype not in DTYPES:
        raise GenpiError(f"model.dtype={dtype!r} is unknown: choose one of {sorted(DTYPES)}")
    kwargs: dict[str, Any] = {
        "dtype": "auto" if DTYPES[dtype] == "auto" else getattr(torch, DTYPES[dtype]),
        "trust_remote_code": bool(_get(model_cfg, "trust_remote_code", False)),
        "use_safetensors": True,
        "attn_implementation": str(_get(model_cfg, "attn_implementation", "sdpa")),
    }
    if bool(_get(model_cfg, "load_in_4bit", False)):
        kwargs["quantization_config"] = _quantization_config()
        # One whole copy per process: under DDP each rank loads onto its own GPU.
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    return kwargs


def load_model(model_cfg: Any, for_training: bool = True):
    """The causal LM of ``model_cfg``.

    With ``for_training``: a 4-bit model is prepared for k-bit training, then LoRA is applied per
    ``model.lora`` (or every weight made trainable with ``lora.enabled=false``). Without it: the bare model
    (no adapter), e.g. to load a trained adapter onto.
    """
    from transformers import AutoModelForCausalLM

    kwargs = model_load_kwargs(model_cfg)  # first: a 4-bit request on a CPU machine fails before any build
    path = resolve_model_path(model_cfg)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as err:
        raise GenpiError(f"cannot load model {path}: {_first_line(err)}") from None
    except ValueError as err:
        if "trust_remote_code" in str(err):
            raise _remote_code_error(path, err) from None
        raise
    if for_training:
        if "quantization_config" in kwargs:
            from peft import prepare_model_for_kbit_training

            # peft would also switch on gradient checkpointing; trading speed for memory is not loading's call.
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        model = apply_lora(model, _get(model_cfg, "lora", {}))
    return model


def apply_lora(model, lora_cfg: Any):
    """Wrap ``model`` in a peft LoRA adapter (defaults: the paper's r=16, alpha=32, dropout 0.05 on every linear
    layer but the output head), or, with ``lora.enabled=false``, make every parameter trainable (full
    fine-tuning). Returns the model to train."""
    if not bool(_get(lora_cfg, "enabled", True)):
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    targets = _get(lora_cfg, "target_modules", "all-linear")
    targets = targets if isinstance(targets, str) else [str(t) for t in targets]
    alpha = float(_get(lora_cfg, "alpha", 32))
    config = LoraConfig(r=int(_get(lora_cfg, "r", 16)), lora_alpha=int(alpha) if alpha.is_integer() else alpha,
                        lora_dropout=float(_get(lora_cfg, "dropout", 0.05)), target_modules=targets,
                        bias="none", task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, config)
    except ValueError as err:  # e.g. target_modules naming no layer of this model
        raise GenpiError(f"model.lora: {_first_line(err)}") from None


def load_model_and_tokenizer(model_cfg: Any, for_training: bool = True):
    """``(load_model(model_cfg, for_training), load_tokenizer(model_cfg))``."""
    tok = load_tokenizer(model_cfg)
    return load_model(model_cfg, for_training=for_training), tok
