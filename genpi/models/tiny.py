"""The built-in default model: a small Llama built from a config with a fixed seed, and a byte-level
BPE tokenizer trained here on the tasks' texts. Cached under a content hash; the same bytes on every
machine with the same library versions."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from genpi.paths import cache_dir

BUILDER_VERSION = "tiny-v1"
TASKS_DIR = Path(__file__).resolve().parents[1] / "tasks"

DEFAULT_ARCH: dict[str, Any] = {
    "hidden_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 352,
    "vocab_size": 4096,
    "max_position_embeddings": 4096,
    "rope_theta": 10000.0,
    "seed": 0,
}

SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|pad|>", "<|start_header_id|>", "<|end_header_id|>",
                  "<|eot_id|>"]

# Llama-3 layout. The {% generation %} markers let transformers return the assistant-token mask.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|eot_id|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|eot_id|>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# A little general text so the tokenizer covers English, shell, HTML and JSON even with no task files.
BASE_CORPUS = """\
You are a helpful assistant. Think step by step, then act. The user asks a question and you answer it.
Think: I should list the files first. Act: bash
```bash
ls -la /home/user && find /var/log -name "*.log" | wc -l && grep -r "error" /etc/hosts | head -n 5
cat /etc/passwd | cut -d: -f1 | sort | uniq -c; du -sh /usr/share; ps aux | grep python; echo $HOME
```
Act: finish. Act: answer(42). The output of the OS: total 24 drwxr-xr-x 2 root root 4096 Jan 1 00:00 .
Thought: I should search for the product. Action: search[red cotton t-shirt for men under 30 dollars]
Action: click[B09XYZ1234] Action: click[Buy Now] Observation: [SEP] Back to Search [SEP] Page 1 (Total results: 50)
<html><body><div id="main"><button id="0">Sign in</button><input type="text" placeholder="Search"/>
<a href="/cart">Cart</a><select id="3"><option>New York</option></select><span>Price: $19.99</span></div></html>
Answer: B. Action: CLICK. Action: TYPE. Value: Brooklyn. Action: SELECT. A. None of the above
Action: get_relations(Barack Obama) Action: get_neighbors(#0, people.person.spouse_s) Final Answer: #3
Observation: variable #1, which are instances of music.album. intersection(#1, #2) count(#0) argmax(#2, age)
{"has_search_bar": true, "clickables": ["search", "next >", "< prev", "size", "color"]} 0123456789
"""


def _corpus_files() -> list[Path]:
    files: list[Path] = []
    for sub, pattern in (("prompts", "*.txt"), ("samples", "*.jsonl"), ("inputs", "*.txt")):
        files += sorted((TASKS_DIR / sub).glob(pattern))
    return files


def corpus_texts() -> list[str]:
    return [BASE_CORPUS] + [p.read_text(encoding="utf-8") for p in _corpus_files()]


def arch_config(overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    arch = dict(DEFAULT_ARCH)
    arch.update({k: v for k, v in (overrides or {}).items() if v is not None})
    unknown = set(arch) - set(DEFAULT_ARCH)
    if unknown:
        from genpi.errors import GenpiError

        raise GenpiError(f"model.tiny has unknown keys {sorted(unknown)}; known: {sorted(DEFAULT_ARCH)}")
    return arch


def content_hash(arch: dict[str, Any]) -> str:
    import tokenizers
    import transformers

    h = hashlib.sha256()
    h.update(json.dumps([BUILDER_VERSION, arch, CHAT_TEMPLATE, transformers.__version__, tokenizers.__version__],
                        sort_keys=True).encode())
    for text in corpus_texts():
        h.update(hashlib.sha256(text.encode()).digest())
    return h.hexdigest()[:12]


def build_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus_texts(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                   pad_token="<|pad|>", padding_side="right", model_max_length=4096)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _build_into(folder: Path, arch: dict[str, Any]) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer(arch["vocab_size"])
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    eos_text = tok.convert_tokens_to_ids("<|end_of_text|>")
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=arch["hidden_size"], num_hidden_layers=arch["num_hidden_layers"],
        num_attention_heads=arch["num_attention_heads"], num_key_value_heads=arch["num_key_value_heads"],
        intermediate_size=arch["intermediate_size"], max_position_embeddings=arch["max_position_embeddings"],
        rope_theta=arch["rope_theta"], tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=eot,
        pad_token_id=tok.pad_token_id, torch_dtype="float32",
    )
    torch.manual_seed(arch["seed"])
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=[eot, eos_text],
                                               pad_token_id=tok.pad_token_id, do_sample=False)
    model.save_pretrained(str(folder), safe_serialization=True)
    tok.save_pretrained(str(folder))
    (folder / "genpi_tiny.json").write_text(json.dumps({"builder": BUILDER_VERSION, "arch": arch}, indent=2))


def build_tiny(cfg: dict[str, Any] | None = None, cache: Path | None = None) -> Path:
    """The tiny model's folder (model + tokenizer), built on first use and reused after."""
    arch = arch_config(cfg)
    root = Path(cache) if cache else cache_dir() / "models"
    folder = root / f"tiny-{content_hash(arch)}"
    if (folder / "genpi_tiny.json").is_file():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
    try:
        _build_into(tmp, arch)
        try:
            os.rename(tmp, folder)  # atomic; a racing builder that got there first wins
        except OSError:
            if not (folder / "genpi_tiny.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
