"""Tiny random-weight Llamas paired with the real tokenizers and chat templates users train with, built offline.

The tokenizers come from files inside pinned PyPI packages (no hub):

- ``llama3``: Meta's Llama 3 tiktoken BPE (``llama_models/llama3/tokenizer.model``): 128,000 merges and 256 special
  tokens, 128,256 ids. Chat layout: Llama 3's headers and ``<|eot_id|>``.
- ``llama4``: Meta's Llama 4 tiktoken BPE (``llama_models/llama4/tokenizer.model``): 200,000 merges and 2,048 special
  tokens, 202,048 ids. Chat layout: Llama 4's ``<|header_start|>`` / ``<|eot|>``.
- ``chatml``: Qwen's ChatML layout (``<|im_start|>role\\n...<|im_end|>\\n``, a default system prompt when the
  conversation has none) on the Llama 3 BPE, its ChatML tokens appended after it as Qwen appends them to its own BPE
  (Qwen's vocabulary itself ships in no package here).
- ``mistral``: Mistral's v3 SentencePiece tokenizer (``mistral_common/data/mistral_instruct_tokenizer_240323.model.v3``,
  32,768 ids with ``[INST]``/``[/INST]`` as control tokens). Chat layout: Mistral's instruct format as
  ``mistral_common`` encodes it (a system prompt goes in front of the LAST user turn: not prefix-stable).

A tiktoken file becomes a ``tokenizers`` byte-level BPE through transformers' ``TikTokenConverter`` (merges recovered
from the ranks, the tokenizer's own split pattern), wrapped as a ``PreTrainedTokenizerFast``; a SentencePiece file is
loaded with ``from_pretrained(folder)`` (``LlamaTokenizer(vocab_file=...)`` silently gives a 3-token vocabulary in
transformers 5.x). Both are saved as ordinary ``tokenizer.json`` folders that transformers and vLLM load. Tests check
the ids against the publishers' own encoders (tiktoken via ``llama_models``, ``mistral_common``).

Model: a ``LlamaForCausalLM`` of the tiny shape with random weights (the seeded init of :mod:`genpi.models.tiny`) and
tied input/output embeddings, so that the 128k-202k vocabulary costs one ``V x hidden`` matrix, not two. The folder
is cached like ``tiny``'s under ``cache_dir()/models/<name>-<hash>``; the hash covers the family, the architecture,
the tokenizer file's bytes and the library versions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from genpi import schema
from genpi.schema import RealVocabArch
from genpi.utils.errors import GenpiError
from genpi.utils.paths import cache_dir

BUILDER_VERSION = "real-vocab-v1"
MARKER = "genpi_real_vocab.json"

# The architecture (defaults and ranges in genpi.schema.RealVocabArch): tiny layers; the vocabulary is the
# tokenizer's. Embeddings are tied (one V x H matrix).
DEFAULT_ARCH: dict[str, Any] = dataclasses.asdict(RealVocabArch())

# Llama 3's documented layout (llama_models/llama3_1/prompt_format.md): each turn is a header, two newlines, the
# trimmed content and <|eot_id|>. {% generation %} marks the assistant's content and <|eot_id|> (not its header).
LLAMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] | trim }}{{ '<|eot_id|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] | trim }}{{ '<|eot_id|>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Llama 4's layout: the same shape with <|header_start|>/<|header_end|> and <|eot|>.
LLAMA4_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|header_start|>' + message['role'] + '<|header_end|>\n\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] | trim }}{{ '<|eot|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] | trim }}{{ '<|eot|>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|header_start|>assistant<|header_end|>\n\n' }}{% endif %}"
)

# Qwen2's ChatML: a default system turn when the first message is not a system message; every turn ends with
# <|im_end|> and a newline. The newline after <|im_end|> is not part of the assistant's label: generation stops at
# <|im_end|>, and the newline is the start of the next turn's text.
CHATML_DEFAULT_SYSTEM = "You are a helpful assistant."
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\n" + CHATML_DEFAULT_SYSTEM + "<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ message['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Mistral's instruct format as mistral_common's v3 tokenizer encodes it: [INST] and [/INST] are control tokens,
# the text after each gets the SentencePiece word-start space, an assistant turn ends with </s>; a system message is
# put in front of the last user turn, separated by a blank line.
MISTRAL_TEMPLATE = (
    "{% set ns = namespace(system='', last_user=-1) %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set ns.system = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}"
    "{% endfor %}"
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}"
    "{% if loop.index0 == ns.last_user and ns.system %}"
    "{{ '[INST] ' + ns.system + '\n\n' + message['content'] + '[/INST]' }}"
    "{% else %}{{ '[INST] ' + message['content'] + '[/INST]' }}{% endif %}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ ' ' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{% endif %}"
    "{% endfor %}"
)


@dataclass(frozen=True)
class Family:
    """A real tokenizer and the chat layout that goes with it."""

    name: str  # the model.name_or_path that builds it
    package: str  # the PyPI distribution that ships the tokenizer file
    kind: str  # tiktoken | sentencepiece
    file: str  # the tokenizer file, relative to the package's import folder
    template: str
    bos: str | None
    eos: str  # end of an assistant turn: what generation stops at
    pad: str
    stop: tuple[str, ...]  # every token that ends generation


FAMILIES: dict[str, Family] = {
    "tiny_llama3_vocab": Family("tiny_llama3_vocab", "llama-models", "tiktoken", "llama3/tokenizer.model",
                                LLAMA3_TEMPLATE, "<|begin_of_text|>", "<|eot_id|>", "<|finetune_right_pad_id|>",
                                ("<|eot_id|>", "<|end_of_text|>", "<|eom_id|>")),
    "tiny_llama4_vocab": Family("tiny_llama4_vocab", "llama-models", "tiktoken", "llama4/tokenizer.model",
                                LLAMA4_TEMPLATE, "<|begin_of_text|>", "<|eot|>", "<|finetune_right_pad|>",
                                ("<|eot|>", "<|end_of_text|>", "<|eom|>")),
    "tiny_chatml": Family("tiny_chatml", "llama-models", "tiktoken", "llama3/tokenizer.model",
                          CHATML_TEMPLATE, None, "<|im_end|>", "<|endoftext|>", ("<|im_end|>", "<|endoftext|>")),
    "tiny_mistral_vocab": Family("tiny_mistral_vocab", "mistral-common", "sentencepiece",
                                 "data/mistral_instruct_tokenizer_240323.model.v3", MISTRAL_TEMPLATE,
                                 "<s>", "</s>", "</s>", ("</s>",)),
}
_IMPORT_NAME = {"llama-models": "llama_models", "mistral-common": "mistral_common"}


def family(name: str) -> Family:
    if name not in FAMILIES:
        raise GenpiError(f"model.name_or_path={name!r} is not a real-vocabulary tiny model: one of {sorted(FAMILIES)}")
    return FAMILIES[name]


def tokenizer_file(fam: Family) -> Path:
    """The tokenizer file inside its installed package, or a one-line error saying which package to install."""
    spec = find_spec(_IMPORT_NAME[fam.package])
    if spec is None or not spec.submodule_search_locations:
        raise GenpiError(f"model={fam.name} needs the {fam.package} package (its tokenizer file): run `make install` "
                         f"or pip install {fam.package}=={_pinned(fam.package)}")
    path = Path(next(iter(spec.submodule_search_locations))) / fam.file
    if not path.is_file():
        raise GenpiError(f"{fam.package} {_lib_version(fam.package)} has no {fam.file}: install "
                         f"{fam.package}=={_pinned(fam.package)}")
    return path


def _pinned(package: str) -> str:
    return {"llama-models": "0.3.0", "mistral-common": "1.13.1"}[package]


def _lib_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "absent"


def arch_config(overrides: dict[str, Any] | None = None, where: str = "model.tiny") -> dict[str, Any]:
    """:data:`DEFAULT_ARCH` with the non-null ``overrides`` (``model.tiny``): unknown keys, wrong types, values out
    of range and head counts that do not divide are one-line errors."""
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = sorted(set(given) - set(DEFAULT_ARCH))
    if unknown:
        raise GenpiError(f"{where} has unknown keys {unknown} for a real-vocabulary model (its vocabulary is the "
                         f"tokenizer's); known keys: {sorted(DEFAULT_ARCH)}")
    return dataclasses.asdict(schema.read(given, RealVocabArch, where))


def content_hash(name: str, overrides: dict[str, Any] | None = None) -> str:
    """The 12-hex-digit hash naming the build of ``name`` (without building it)."""
    fam = family(name)
    arch = arch_config(overrides)
    h = hashlib.sha256()
    versions = {lib: _lib_version(lib) for lib in ("transformers", "tokenizers", "safetensors", fam.package)}
    h.update(json.dumps([BUILDER_VERSION, fam.name, fam.kind, fam.file, fam.template, fam.bos, fam.eos, fam.pad,
                         list(fam.stop), arch, versions], sort_keys=True).encode())
    h.update(hashlib.sha256(tokenizer_file(fam).read_bytes()).digest())
    return h.hexdigest()[:12]


def folder_name(name: str, overrides: dict[str, Any] | None = None) -> str:
    return f"{name}-{content_hash(name, overrides)}"


# -- tokenizers -----------------------------------------------------------------------------------------------
def _llama_tiktoken(fam: Family):
    """The publisher's own tokenizer object (llama_models' Tokenizer): its special tokens and split pattern."""
    if fam.file.startswith("llama4/"):
        from llama_models.llama4.tokenizer import Tokenizer

        return Tokenizer(tokenizer_file(fam)), Tokenizer.O200K_PATTERN
    from llama_models.llama3.tokenizer import Tokenizer

    return Tokenizer(tokenizer_file(fam)), Tokenizer.pat_str


def build_tokenizer(name: str, model_max_length: int = 4096):
    """The ``PreTrainedTokenizerFast`` of family ``name``: real vocabulary, special tokens, chat template."""
    fam = family(name)
    if fam.kind == "tiktoken":
        tok = _from_tiktoken(fam, model_max_length)
    else:
        tok = _from_sentencepiece(fam, model_max_length)
    tok.chat_template = fam.template
    return tok


def _from_tiktoken(fam: Family, model_max_length: int):
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    meta_tok, pattern = _llama_tiktoken(fam)
    specials = sorted(meta_tok.special_tokens, key=meta_tok.special_tokens.get)
    n_base = min(meta_tok.special_tokens.values())
    if fam.name == "tiny_chatml":
        # Qwen appends its ChatML tokens after the BPE; here they follow Llama 3's 256 special ids.
        specials = specials + CHATML_TOKENS
    backend = _converted_bpe(fam, pattern)
    if backend.get_vocab_size() != n_base:
        raise GenpiError(f"{fam.file}: converted {backend.get_vocab_size()} BPE tokens, the file has {n_base}")
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=fam.bos, eos_token=fam.eos, pad_token=fam.pad,
        # The chat tokens registered as special: skip_special_tokens drops them, all_special_ids lists them.
        extra_special_tokens=[t for t in specials if "reserved" not in t and t not in (fam.bos, fam.eos, fam.pad)],
        padding_side="right", model_max_length=model_max_length, clean_up_tokenization_spaces=False,
    )
    return fast


def _converted_bpe(fam: Family, pattern: str):
    """The tiktoken file as a ``tokenizers`` byte-level BPE (no special tokens), converted once per file and kept in
    the cache: the conversion recovers about 690k merges in Python (tens of seconds), and ``tiny_chatml`` shares
    Llama 3's."""
    from tokenizers import Tokenizer
    from transformers.convert_slow_tokenizer import TikTokenConverter

    source = tokenizer_file(fam)
    key = hashlib.sha256(source.read_bytes() + pattern.encode() + _lib_version("tokenizers").encode()).hexdigest()[:12]
    cached = cache_dir() / "tokenizers" / f"{fam.file.split('/')[0]}-bpe-{key}.json"
    if cached.is_file():
        return Tokenizer.from_file(str(cached))
    backend = TikTokenConverter(vocab_file=str(source), pattern=pattern).converted()
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")
    backend.save(str(tmp))
    os.replace(tmp, cached)  # atomic: a concurrent builder reads the whole file or none
    return backend


def _from_sentencepiece(fam: Family, model_max_length: int):
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(tokenizer_file(fam), Path(tmp) / "tokenizer.model")
        # legacy=False: no spurious word-start space after control tokens, as mistral_common encodes.
        config = {"tokenizer_class": "LlamaTokenizer", "bos_token": fam.bos, "eos_token": fam.eos, "unk_token": "<unk>",
                  "add_bos_token": False, "add_eos_token": False, "legacy": False,
                  "model_max_length": model_max_length, "padding_side": "right",
                  "clean_up_tokenization_spaces": False}
        (Path(tmp) / "tokenizer_config.json").write_text(json.dumps(config))
        tok = AutoTokenizer.from_pretrained(tmp)
    if len(tok) < 1000:
        raise GenpiError(f"{fam.file} loaded as a {len(tok)}-token vocabulary: the SentencePiece conversion failed")
    tok.pad_token = fam.pad
    tok.padding_side = "right"
    return tok


# -- models ---------------------------------------------------------------------------------------------------
def _build_into(folder: Path, name: str, arch: dict[str, Any], digest: str) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from genpi.models.tiny import _init_weights, save_quietly

    fam = family(name)
    tok = build_tokenizer(name, arch["max_position_embeddings"])
    stop_ids = [tok.convert_tokens_to_ids(t) for t in fam.stop]
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=arch["hidden_size"], num_hidden_layers=arch["num_hidden_layers"],
        num_attention_heads=arch["num_attention_heads"], num_key_value_heads=arch["num_key_value_heads"],
        intermediate_size=arch["intermediate_size"], max_position_embeddings=arch["max_position_embeddings"],
        rope_theta=arch["rope_theta"], initializer_range=arch["initializer_range"], tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        dtype="float32",
    )
    torch.manual_seed(arch["seed"])
    model = LlamaForCausalLM(config).to(torch.float32)
    _init_weights(model, arch["seed"], arch["initializer_range"])
    model.tie_weights()
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=stop_ids,
                                               pad_token_id=tok.pad_token_id, do_sample=False)
    save_quietly(model, tok, folder)
    (folder / MARKER).write_text(json.dumps({
        "builder": BUILDER_VERSION, "hash": digest, "family": name, "tokenizer": f"{fam.package}:{fam.file}",
        "package_version": _lib_version(fam.package), "vocab_size": len(tok), "arch": arch,
        "parameters": sum(p.numel() for p in model.parameters()),
    }, indent=2) + "\n")


def build_real_vocab(name: str, cfg: dict[str, Any] | None = None, cache: Path | None = None) -> Path:
    """The folder of the tiny model with the real tokenizer of family ``name``, built on first use.

    Args:
        name: one of :data:`FAMILIES` (``tiny_llama3_vocab``, ``tiny_chatml``, ``tiny_mistral_vocab``,
            ``tiny_llama4_vocab``).
        cfg: architecture overrides (``model.tiny``); keys of :data:`DEFAULT_ARCH`.
        cache: genpi cache folder instead of :func:`genpi.utils.paths.cache_dir`.
    """
    from genpi.models.tiny import build_once

    arch = arch_config(cfg)
    digest = content_hash(name, cfg)
    root = (Path(cache).expanduser() if cache else cache_dir()) / "models"
    # A lock: the 128k-202k vocabulary conversion takes seconds, concurrent test workers wait for one build.
    return build_once(root / f"{name}-{digest}", lambda tmp: _build_into(tmp, name, arch, digest), marker=MARKER,
                      lock=True)


def is_built(folder: Path) -> bool:
    return (Path(folder) / MARKER).is_file()


# -- memory at the real vocabulary (genpi-bench) -----------------------------------------------------------------
def vocab_sizes() -> dict[str, int]:
    """The vocabulary size of each family whose package is installed, read from its tokenizer file (no build)."""
    sizes: dict[str, int] = {}
    for name, fam in FAMILIES.items():
        if name == "tiny_chatml":
            continue  # the Llama 3 BPE again
        try:
            path = tokenizer_file(fam)
        except GenpiError:
            continue
        if fam.kind == "tiktoken":
            tok, _ = _llama_tiktoken(fam)
            sizes[name] = int(tok.n_words)
        else:
            import sentencepiece

            sizes[name] = int(sentencepiece.SentencePieceProcessor(model_file=str(path)).get_piece_size())
    return sizes


def loss_memory_child(name: str, mode: str, n_tokens: int, chunk: int) -> dict[str, Any]:
    """One KL + cross-entropy forward and backward at the real vocabulary of model ``name``, in this process: the
    model's own output head (``[V, hidden]``) and its final hidden states over ``n_tokens`` tokens of a task prompt
    in its own tokenizer; the teacher's are those of the same text (the KL is about memory here, not its value).
    ``mode`` is ``chunked`` or ``unchunked``. Returns the values, the gradient norm and this process's peak RSS
    (MB) and its rise over the loaded model's."""
    import resource

    import torch

    from genpi import losses
    from genpi.models.factory import load_model, load_tokenizer
    from genpi.tasks.base import builtin_task

    cfg = {"name_or_path": name}
    tok, model = load_tokenizer(cfg), load_model(cfg, for_training=False).eval()
    text = builtin_task("os").prompt_text
    ids = tok(text, add_special_tokens=False)["input_ids"]
    ids = (ids * (n_tokens // len(ids) + 1))[: n_tokens + 1]
    with torch.no_grad():
        hidden = model.model(input_ids=torch.tensor([ids[:-1]])).last_hidden_state[0]
    weight = model.lm_head.weight.detach()
    torch.manual_seed(0)  # the same student in both modes, so their values can be compared
    student = (hidden + 0.01 * torch.randn_like(hidden)).requires_grad_(True)
    targets = torch.tensor(ids[1:])
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if mode == "chunked":
        kl = losses.chunked_distill_loss(student, hidden, weight, kind="forward_kl", chunk_size=chunk)
        ce = losses.chunked_token_cross_entropy(student, weight, targets, chunk_size=chunk)
    else:
        s_logits, t_logits = student @ weight.T, hidden @ weight.T
        kl = losses.distill_loss(s_logits, t_logits, torch.ones(len(targets), dtype=torch.bool), kind="forward_kl")
        ce = losses.token_cross_entropy(s_logits, targets)
    (kl + ce).backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"vocab": int(weight.shape[0]), "hidden": int(weight.shape[1]), "kl": kl.item(), "ce": ce.item(),
            "grad_norm": student.grad.norm().item(), "peak_mb": peak / 1024, "delta_mb": (peak - base) / 1024}


def bench_memory(models: list[str], n_tokens: int, chunk: int) -> dict[str, Any]:
    """``genpi-bench``'s memory at the real vocabularies: for each model, unchunked vs chunked KL + cross-entropy,
    each in a fresh process (so one's peak cannot hide the other's). A variant the kernel kills is reported so."""
    import subprocess
    import sys

    out: dict[str, Any] = {"tokens": n_tokens, "chunk": chunk, "models": {}}
    for name in models:
        build_real_vocab(name)  # once, here: the children only load it
        row: dict[str, Any] = {}
        for mode in ("unchunked", "chunked"):
            cmd = [sys.executable, "-m", "genpi.bench", "--_real-vocab-child", name, mode, "--mem-tokens",
                   str(n_tokens), "--chunk", str(chunk)]
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode == 0:
                row[mode] = json.loads(p.stdout.strip().splitlines()[-1])
            else:
                row[mode] = {"failed": "killed by the kernel: out of memory" if p.returncode == -9
                             else f"exit {p.returncode}: {p.stderr.strip().splitlines()[-1:]}"}
        if "delta_mb" in row["unchunked"] and "delta_mb" in row["chunked"]:
            row["peak_ratio_unchunked_over_chunked"] = row["unchunked"]["delta_mb"] / max(1e-6, row["chunked"]["delta_mb"])
            row["max_value_diff"] = max(abs(row["unchunked"][k] - row["chunked"][k]) for k in ("kl", "ce"))
        out["models"][name] = row
    return out


def describe(names: list[str] | None = None) -> list[dict[str, Any]]:
    """One row per family: its tokenizer file and package version, vocabulary, parameters, seconds to build (or,
    when cached, to hash the tokenizer file and find the folder), and each built-in task's teacher prompt in its tokens (the shared prefix the teacher caches,
    which :func:`genpi.data.tokenize.teacher_prompt` may stop a few tokens early)."""
    import time

    from genpi.data.tokenize import render, teacher_prompt
    from genpi.models.factory import load_tokenizer
    from genpi.tasks import TASK_NAMES
    from genpi.tasks.base import builtin_task

    rows = []
    for name in names or list(FAMILIES):
        fam = family(name)
        start = time.perf_counter()
        folder = build_real_vocab(name)
        built_s = time.perf_counter() - start
        meta = json.loads((folder / MARKER).read_text())
        tok = load_tokenizer({"name_or_path": name})
        prompts = {}
        for task_name in TASK_NAMES:
            task = builtin_task(task_name)
            prompt = teacher_prompt(tok, task)
            whole = render(tok, task.teacher_messages("\u2063"), add_generation_prompt=True).split("\u2063")[0]
            prompts[task_name] = {"shared_prefix_tokens": len(prompt.ids),
                                  "prompt_tokens": len(tok(whole, add_special_tokens=False)["input_ids"])}
        rows.append({"model": name, "tokenizer": f"{fam.package}=={meta['package_version']}:{fam.file}",
                     "vocab_size": meta["vocab_size"], "parameters": meta["parameters"],
                     "build_seconds": round(built_s, 1), "end_of_turn": fam.eos, "prompts": prompts})
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """:func:`describe`'s rows as a markdown table (pipes inside token names escaped)."""
    tasks = list(rows[0]["prompts"]) if rows else []
    lines = ["| model | tokenizer file | ids | parameters | end of turn | "
             + " | ".join(f"{t} prompt (shared prefix)" for t in tasks) + " |",
             "| --- | --- | ---: | ---: | --- | " + " | ".join("---:" for _ in tasks) + " |"]
    for r in rows:
        cells = [f"{r['prompts'][t]['prompt_tokens']} ({r['prompts'][t]['shared_prefix_tokens']})" for t in tasks]
        eot = r["end_of_turn"].replace("|", "\\|")
        lines.append(f"| {r['model']} | {r['tokenizer']} | {r['vocab_size']:,} | {r['parameters']:,} | "
                     f"`{eot}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """``python -m genpi.models.real_vocab [--out DIR] [names...]``: build the models and write their table."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("names", nargs="*", default=list(FAMILIES))
    ap.add_argument("--out", default=None, help="folder for tokenizers.json and tokenizers.md")
    args = ap.parse_args(argv)
    rows = describe(args.names)
    table = markdown_table(rows)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "tokenizers.json").write_text(json.dumps(rows, indent=2) + "\n")
        (out / "tokenizers.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
