"""The built-in default model, built here with no download: a small Llama and a byte-level BPE tokenizer.

The tokenizer (4,096 tokens) is trained with the ``tokenizers`` library on the tasks' own texts
(``genpi/tasks/{prompts,inputs}/*.txt``, the strings inside ``genpi/tasks/samples/*.jsonl``) plus a built-in
English / shell / HTML snippet corpus, so it builds even when those folders are empty. The model is a
``LlamaForCausalLM`` with random weights drawn from a fixed seed.

The folder is cached under ``cache_dir()/models/tiny-<hash>``; the hash covers the architecture, the corpus,
:data:`BUILDER_VERSION` and the versions of the libraries that write the files, so a changed corpus or config
gets a new folder and an unchanged one is reused. Two builds of the same hash are byte-identical, on any machine.

Chat format (Llama-3 layout)::

    <|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\nHello<|eot_id|>
    <|start_header_id|>assistant<|end_header_id|>\\n\\nHi!<|eot_id|>

(no newline between turns; the header's ``\\n\\n`` is part of the layout). The tokenizer's ``eos_token`` is
``<|eot_id|>``, as in Llama-3-Instruct, so anything that stops at EOS stops at the end of a turn; the
generation config stops at ``<|eot_id|>`` and ``<|end_of_text|>``. Plain ``tokenizer(text)`` adds no BOS: the
chat template writes it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from genpi.utils.errors import GenpiError
from genpi.utils.paths import cache_dir

# Bump when anything below changes what a build writes for the same inputs: it is part of the folder's hash.
BUILDER_VERSION = "tiny-v2"
TASKS_DIR = Path(__file__).resolve().parents[1] / "tasks"
# (folder under genpi/tasks, glob): the tokenizer's training files, read in this order.
CORPUS_GLOBS = (("prompts", "*.txt"), ("samples", "*.jsonl"), ("inputs", "*.txt"))
# A build folder is complete exactly when this file is in it: it is written last, before the rename.
MARKER = "genpi_tiny.json"

DEFAULT_ARCH: dict[str, Any] = {
    "hidden_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 352,
    "vocab_size": 4096,
    "max_position_embeddings": 4096,
    "rope_theta": 10000.0,
    "initializer_range": 0.02,
    "seed": 0,
}
_FLOAT_KEYS = {"rope_theta", "initializer_range"}

BOS, EOT_TEXT, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
START_HEADER, END_HEADER, EOT = "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"
# Order fixes the ids: 0 bos, 1 end_of_text, 2 pad, 3 start_header, 4 end_header, 5 eot.
SPECIAL_TOKENS = [BOS, EOT_TEXT, PAD, START_HEADER, END_HEADER, EOT]

# Llama-3 layout. {% generation %} marks what `return_assistant_tokens_mask` reports: an assistant turn's
# content and its <|eot_id|>, not its header (the model learns to end turns, not to write headers).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|eot_id|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|eot_id|>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# General text so the tokenizer covers English, shell, HTML and JSON even when the task folders are empty.
BASE_CORPUS = """\
You are a helpful assistant. Think step by step, then act. The user asks a question and you answer it.
Read the instructions carefully. If you are not sure, look first and answer only when you know.
The quick brown fox jumps over the lazy dog. What is the capital of France? Paris is the capital of France.
Think: I should list the files first, then count the lines that match.
Act: bash
```bash
ls -la /home/user && find /var/log -name "*.log" | wc -l && grep -r "error" /etc/hosts | head -n 5
cat /etc/passwd | cut -d: -f1 | sort | uniq -c; du -sh /usr/share; ps aux | grep python; echo $HOME
for f in *.txt; do wc -w "$f"; done; awk '{print $1}' access.log | sort -n | tail -1; chmod 644 notes.md
mkdir -p /tmp/work && cd /tmp/work && touch a.txt b.txt && stat -c %s a.txt; useradd -m alice; id -u root
```
Act: finish
Act: answer(42)
The output of the OS: total 24 drwxr-xr-x 2 root root 4096 Jan 1 00:00 . -rw-r--r-- 1 user user 220 notes.md
Thought: I should search for the product first. Action: search[red cotton t-shirt for men under 30 dollars]
Action: click[B09XYZ1234] Action: click[Buy Now] Observation: [SEP] Back to Search [SEP] Page 1 (Total results: 50)
<html><body><div id="main"><button id="0">Sign in</button><input type="text" placeholder="Search"/>
<a href="/cart">Cart</a><select id="3"><option>New York</option></select><span>Price: $19.99</span></div>
<ul><li class="item">First</li><li class="item">Second</li></ul><form action="/find"><label>Date</label></form>
</body></html>
Answer: B. Action: CLICK. Action: TYPE. Value: Brooklyn. Action: SELECT. A. None of the above
Action: get_relations(Barack Obama) Action: get_neighbors(#0, people.person.spouse_s) Final Answer: #3
Observation: variable #1, which are instances of music.album. intersection(#1, #2) count(#0) argmax(#2, age)
{"has_search_bar": true, "clickables": ["search", "next >", "< prev", "size", "color"], "price": 12.5, "n": null}
0123456789 10 20 30 100 1000 2024 3.14 -1 +1 = < > <= >= != == && || ; : , . ! ? ' " ` ~ @ # % ^ & * ( ) [ ] { } / \\
"""


def _texts_of_jsonl(text: str) -> list[str]:
    """The strings inside each JSON line (what the model reads), in order; a line that is not JSON as it is."""
    out: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, str):
            out.append(value)
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)

    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            walk(json.loads(line))
        except json.JSONDecodeError:
            out.append(line)
    return out


def corpus_files() -> list[Path]:
    """The task files the tokenizer trains on, in a fixed order (whatever exists now)."""
    files: list[Path] = []
    for sub, pattern in CORPUS_GLOBS:
        files += sorted((TASKS_DIR / sub).glob(pattern))
    return files


def corpus() -> list[tuple[str, list[str]]]:
    """``(name, texts)`` per corpus source: the built-in snippets first, then each task file."""
    sources: list[tuple[str, list[str]]] = [("<builtin>", [BASE_CORPUS])]
    for path in corpus_files():
        # CRLF -> LF so a checkout with converted line endings trains (and hashes) the same.
        text = path.read_bytes().decode("utf-8").replace("\r\n", "\n")
        texts = _texts_of_jsonl(text) if path.suffix == ".jsonl" else [text]
        sources.append((path.relative_to(TASKS_DIR).as_posix(), texts))
    return sources


def with_overrides(defaults: dict[str, Any], overrides: dict[str, Any] | None, where: str, float_keys: set[str],
                   normalize: dict[str, Callable[[Any], Any]] | None = None) -> dict[str, Any]:
    """``defaults`` with the non-null ``overrides`` of config node ``where``; unknown keys are an error. Values are
    normalized (ints; floats for ``float_keys``; ``normalize[key]`` for others) so that 128, 128.0 and "128" from
    a command line name the same model and hash."""
    out = dict(defaults)
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise GenpiError(f"{where} has unknown keys {unknown}; known keys: {sorted(defaults)}")
    for key, value in overrides.items():
        if value is None:
            continue
        try:
            if normalize and key in normalize:
                out[key] = normalize[key](value)
            else:
                out[key] = float(value) if key in float_keys else int(value)
        except (TypeError, ValueError):
            kind = ("valid" if normalize and key in normalize else "a number" if key in float_keys
                    else "a whole number")
            raise GenpiError(f"{where}.{key}={value!r} is not {kind}; give e.g. {where}.{key}={defaults[key]}") from None
    return out


def arch_config(overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The tiny architecture: :data:`DEFAULT_ARCH` with ``overrides`` (``model.tiny``; null values ignored)."""
    arch = with_overrides(DEFAULT_ARCH, overrides, "model.tiny", _FLOAT_KEYS)
    if arch["hidden_size"] % arch["num_attention_heads"]:
        raise GenpiError(f"model.tiny.hidden_size={arch['hidden_size']} is not a multiple of "
                         f"num_attention_heads={arch['num_attention_heads']}")
    if arch["num_attention_heads"] % arch["num_key_value_heads"]:
        raise GenpiError(f"model.tiny.num_attention_heads={arch['num_attention_heads']} is not a multiple of "
                         f"num_key_value_heads={arch['num_key_value_heads']}")
    if arch["vocab_size"] < 512:
        raise GenpiError(f"model.tiny.vocab_size={arch['vocab_size']} is too small: a byte-level BPE needs >= 512")
    return arch


def _lib_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "absent"


def tiny_hash(cfg: dict[str, Any] | None = None) -> str:
    """The 12-hex-digit content hash naming the tiny model of ``cfg`` (``model.tiny``), without building it."""
    return _content_hash(arch_config(cfg), corpus())


def _content_hash(arch: dict[str, Any], sources: list[tuple[str, list[str]]]) -> str:
    h = hashlib.sha256()
    # Library versions read from package metadata: a cache hit never imports transformers.
    versions = {lib: _lib_version(lib) for lib in ("transformers", "tokenizers", "safetensors")}
    h.update(json.dumps([BUILDER_VERSION, arch, SPECIAL_TOKENS, CHAT_TEMPLATE, versions], sort_keys=True).encode())
    for name, texts in sources:
        h.update(hashlib.sha256(json.dumps([name, texts], ensure_ascii=False).encode()).digest())
    return h.hexdigest()[:12]


def build_tokenizer(vocab_size: int = 4096, sources: list[tuple[str, list[str]]] | None = None,
                    model_max_length: int = 4096):
    """A byte-level BPE trained on the corpus, wrapped as a ``PreTrainedTokenizerFast`` with the chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [t for _, ts in (sources if sources is not None else corpus()) for t in ts]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # The full byte alphabet: any text encodes, whatever the corpus held.
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOT, pad_token=PAD,
        # Registered so all_special_ids holds every special token (stop ids, skip_special_tokens).
        extra_special_tokens=[EOT_TEXT, START_HEADER, END_HEADER],
        padding_side="right", model_max_length=model_max_length, clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _init_weights(model, seed: int, std: float) -> None:
    """Overwrite every matrix with uniform noise of standard deviation ``std`` drawn from SHAKE-256 of
    (seed, parameter name), turned into floats by exact float64 arithmetic and one rounding. torch's own
    ``normal_`` takes different code paths (and last bits) on different CPU instruction sets and versions; this
    gives the same bytes everywhere. Norm weights stay at torch's init (ones)."""
    import numpy as np
    import torch

    half_width = std * 3.0**0.5  # the uniform on [-a, a] has std a / sqrt(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() < 2:
                continue
            raw = hashlib.shake_256(f"genpi-tiny:{seed}:{name}".encode()).digest(4 * param.numel())
            ints = torch.from_numpy(np.frombuffer(raw, dtype="<i4").astype(np.float64))  # exact, in [-2^31, 2^31)
            values = (ints + 0.5) * (half_width / 2.0**31)  # in (-a, a); the sum is exact, the product rounds once
            param.copy_(values.view_as(param).to(param.dtype))


def _build_into(folder: Path, arch: dict[str, Any], sources: list[tuple[str, list[str]]], digest: str) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer(arch["vocab_size"], sources, arch["max_position_embeddings"])
    eot, end_of_text = tok.convert_tokens_to_ids(EOT), tok.convert_tokens_to_ids(EOT_TEXT)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=arch["hidden_size"], num_hidden_layers=arch["num_hidden_layers"],
        num_attention_heads=arch["num_attention_heads"], num_key_value_heads=arch["num_key_value_heads"],
        intermediate_size=arch["intermediate_size"], max_position_embeddings=arch["max_position_embeddings"],
        rope_theta=arch["rope_theta"], initializer_range=arch["initializer_range"], tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=eot, pad_token_id=tok.pad_token_id, dtype="float32",
    )
    torch.manual_seed(arch["seed"])  # the constructor's own init draws from it; _init_weights then replaces it
    model = LlamaForCausalLM(config).to(torch.float32)
    _init_weights(model, arch["seed"], arch["initializer_range"])
    # Chat generation stops at the end of the assistant's turn (or of the text).
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=[eot, end_of_text],
                                               pad_token_id=tok.pad_token_id, do_sample=False)
    save_quietly(model, tok, folder)
    n_params = sum(p.numel() for p in model.parameters())
    (folder / MARKER).write_text(json.dumps({"builder": BUILDER_VERSION, "hash": digest, "arch": arch,
                                             "parameters": n_params,
                                             "corpus": [name for name, _ in sources]}, indent=2) + "\n")


def save_quietly(model, tokenizer, folder: Path) -> None:
    """``save_pretrained`` of a model and its tokenizer into ``folder`` without transformers' progress bars."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(str(folder), safe_serialization=True)
        tokenizer.save_pretrained(str(folder))
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _publish_permissions(folder: Path) -> None:
    """mkdtemp makes the folder owner-only; give the cache entry the modes the user's umask allows."""
    mask = os.umask(0)
    os.umask(mask)
    folder.chmod(0o777 & ~mask)
    for f in folder.iterdir():
        f.chmod(0o666 & ~mask)


def _sweep_stale(root: Path, max_age_s: float = 3600.0) -> None:
    """Remove temp build folders of builds killed long ago (a build takes seconds to minutes)."""
    now = time.time()
    for stale in root.glob(".tiny*.tmp*"):
        try:
            if now - stale.stat().st_mtime > max_age_s:
                shutil.rmtree(stale, ignore_errors=True)
        except OSError:
            pass


def is_built(folder: Path, marker: str = MARKER) -> bool:
    """Whether ``folder`` is a complete build (its marker file, written last, is there)."""
    return (Path(folder) / marker).is_file()


def build_once(folder: Path, build_into: Callable[[Path], None], marker: str = MARKER, lock: bool = False) -> Path:
    """``folder`` built by ``build_into(tmp)`` in a temp folder beside it and renamed into place, unless built.

    Concurrent builders are safe: the first rename wins and the others discard their identical copies. With
    ``lock`` (for builds that take minutes), a second builder waits for the first instead of building too.
    """
    folder = Path(folder)
    if is_built(folder, marker):
        return folder
    root = folder.parent
    root.mkdir(parents=True, exist_ok=True)
    guard = (root / f".{folder.name}.lock").open("w") if lock else None
    try:
        if guard is not None:
            fcntl.flock(guard.fileno(), fcntl.LOCK_EX)
            if is_built(folder, marker):
                return folder
        _sweep_stale(root)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp", dir=root))
        try:
            build_into(tmp)
            _publish_permissions(tmp)
            for _ in range(2):
                try:
                    os.rename(tmp, folder)  # atomic, and fails if another builder's folder is already there
                    break
                except OSError:
                    if is_built(folder, marker):
                        break
                    # An incomplete folder of that name (copied by hand, half deleted): move it aside, retry once.
                    try:
                        os.rename(folder, root / f".{folder.name}.broken-{uuid.uuid4().hex[:8]}")
                    except OSError:
                        pass
            if not is_built(folder, marker):
                raise GenpiError(f"could not create {folder}: remove that folder and retry")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if guard is not None:
            guard.close()
    return folder


def build_tiny(cfg: dict[str, Any] | None = None, cache: Path | None = None) -> Path:
    """The tiny model's folder (safetensors weights, tokenizer, generation config), built on first use.

    Args:
        cfg: architecture overrides (``model.tiny``); keys of :data:`DEFAULT_ARCH`.
        cache: genpi cache folder to use instead of :func:`genpi.utils.paths.cache_dir`; the model goes to
            ``<cache>/models/tiny-<hash>``.
    """
    arch = arch_config(cfg)
    sources = corpus()
    digest = _content_hash(arch, sources)
    root = (Path(cache).expanduser() if cache else cache_dir()) / "models"
    return build_once(root / f"tiny-{digest}", lambda tmp: _build_into(tmp, arch, sources, digest))
