"""The model factory and the built-in tiny model: deterministic builds and caching, the chat template and its
assistant mask, LoRA defaults, full fine-tuning, switching the adapter off, and clear errors for bad configs."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from genpi.models import factory, tiny
from genpi.utils.errors import GenpiError
from tests.conftest import TINY_CFG
from tests.helpers import vllm_env

CONF_MODEL = Path(__file__).resolve().parents[1] / "conf" / "model"
BUILD_FILES = ["model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "config.json",
               "generation_config.json", tiny.MARKER]
LINEAR = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
CONVERSATION = [
    {"role": "system", "content": "You are an agent. Act: bash or Act: finish."},
    {"role": "user", "content": "How many files are in /etc?"},
    {"role": "assistant", "content": "Think: count them.\n\nAct: bash\n```bash\nls /etc | wc -l\n```"},
    {"role": "user", "content": "The output of the OS:\n212"},
    {"role": "assistant", "content": "Act: answer(212)"},
]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in BUILD_FILES}


def _logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


# --- building and caching -------------------------------------------------------------------------------------


def test_tiny_builds_byte_identical_in_two_caches_and_in_another_process(tmp_path, tiny_path):
    a = tiny.build_tiny(cache=tmp_path / "a")
    b = tiny.build_tiny(cache=tmp_path / "b")
    assert a.parent == tmp_path / "a" / "models" and a.name == b.name == tiny_path.name
    assert _snapshot(a) == _snapshot(b)
    # the session's folder was built by another call, perhaps another process and day: the same bytes
    assert _snapshot(a) == _snapshot(tiny_path)
    meta = json.loads((a / tiny.MARKER).read_text())
    assert meta["hash"] == a.name.removeprefix("tiny-") and 1_000_000 < meta["parameters"] < 5_000_000


def test_cache_hit_returns_the_folder_without_rebuilding(tiny_path):
    before = {f.name: f.stat().st_mtime_ns for f in tiny_path.iterdir()}
    start = time.perf_counter()
    again = tiny.build_tiny()
    assert again == tiny_path and time.perf_counter() - start < 1.0
    assert {f.name: f.stat().st_mtime_ns for f in tiny_path.iterdir()} == before


def test_cache_follows_genpi_cache(tmp_path, monkeypatch):
    from genpi.utils.paths import cache_dir

    monkeypatch.setenv("GENPI_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("GENPI_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "genpi"


def test_racing_builders_publish_one_complete_folder(tmp_path):
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(tiny.build_tiny(cache=tmp_path))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and results[0] == results[1] and tiny.is_built(results[0])
    assert [p.name for p in (tmp_path / "models").iterdir()] == [results[0].name]  # no temp folder left


def test_an_incomplete_folder_is_moved_aside_and_rebuilt(tmp_path, tiny_path):
    broken = tmp_path / "models" / tiny_path.name
    broken.mkdir(parents=True)
    (broken / "config.json").write_text("{}")  # a half-copied folder: no marker
    assert tiny.build_tiny(cache=tmp_path) == broken and _snapshot(broken) == _snapshot(tiny_path)


def test_changing_the_architecture_names_another_model(tiny_path):
    assert tiny.tiny_hash() == tiny_path.name.removeprefix("tiny-")
    assert tiny.tiny_hash({"hidden_size": 64}) != tiny.tiny_hash()
    assert tiny.tiny_hash({"hidden_size": "128", "seed": None}) == tiny.tiny_hash()  # normalized, nulls ignored
    with pytest.raises(GenpiError, match="unknown keys"):
        tiny.arch_config({"hidden": 64})
    with pytest.raises(GenpiError, match="multiple of"):
        tiny.arch_config({"hidden_size": 130})


def test_tiny_model_and_generation_config(tiny_model, tiny_tokenizer):
    cfg = tiny_model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (128, 4, 4, 2)
    assert cfg.vocab_size == len(tiny_tokenizer) == 4096 and not cfg.tie_word_embeddings
    assert tiny_model.dtype == torch.float32
    assert sum(p.numel() for p in tiny_model.parameters()) == 1_787_008
    eot, end_of_text = tiny_tokenizer.convert_tokens_to_ids([tiny.EOT, tiny.EOT_TEXT])
    assert sorted(tiny_model.generation_config.eos_token_id) == sorted([eot, end_of_text])
    assert tiny_tokenizer.eos_token == tiny.EOT and tiny_tokenizer.bos_token == tiny.BOS
    assert tiny_tokenizer.pad_token == tiny.PAD and tiny_tokenizer.padding_side == "right"
    assert set(tiny_tokenizer.convert_tokens_to_ids(tiny.SPECIAL_TOKENS)) <= set(tiny_tokenizer.all_special_ids)


# --- chat template ----------------------------------------------------------------------------------------------


def test_chat_template_renders_llama3_layout_and_round_trips(tiny_tokenizer):
    text = tiny_tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    want = tiny.BOS + "".join(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content']}<|eot_id|>"
                              for m in CONVERSATION)
    assert text == want
    ids = tiny_tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"]
    assert ids[0] == tiny_tokenizer.bos_token_id and tiny_tokenizer.decode(ids) == text
    assert ids == tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    prompt = tiny_tokenizer.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("How many files are in /etc?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    assert tiny_tokenizer(text, add_special_tokens=True)["input_ids"] == ids  # no second BOS from plain encoding


def test_assistant_mask_is_exactly_the_assistant_contents_and_their_eot(tiny_tokenizer):
    out = tiny_tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True,
                                             return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    spans, current = [], []
    for tid, m in zip(ids, mask):
        if m:
            current.append(tid)
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    assert [tiny_tokenizer.decode(s) for s in spans] == [m["content"] + tiny.EOT for m in CONVERSATION
                                                          if m["role"] == "assistant"]


# --- LoRA, full fine-tuning, adapter switch ---------------------------------------------------------------------


def test_default_lora_is_the_papers_on_every_linear_layer_but_the_head(tiny_path):
    from peft import PeftModel

    cfg = OmegaConf.load(CONF_MODEL / "tiny.yaml")  # a DictConfig, as Hydra passes it
    model = factory.load_model(cfg, for_training=True)
    assert isinstance(model, PeftModel)
    pc = model.peft_config["default"]
    assert (pc.r, pc.lora_alpha, pc.lora_dropout) == (16, 32, 0.05)
    adapted = {name for name, mod in model.named_modules() if hasattr(mod, "lora_A")}
    assert {n.rsplit(".", 1)[-1] for n in adapted} == LINEAR and len(adapted) == 4 * len(LINEAR)
    assert not any("lm_head" in n for n in adapted)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    assert len(trainable) == 2 * len(adapted)


def test_lora_disabled_is_full_fine_tuning(tiny_path):
    model = factory.load_model({"name_or_path": "tiny", "lora": {"enabled": False}}, for_training=True)
    assert not hasattr(model, "peft_config")
    assert all(p.requires_grad for p in model.parameters())


def test_lora_target_list_and_bad_target(tiny_model):
    import copy

    model = factory.apply_lora(copy.deepcopy(tiny_model), {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    assert {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")} == {"q_proj", "v_proj"}
    with pytest.raises(GenpiError, match="model.lora"):
        factory.apply_lora(copy.deepcopy(tiny_model), {"target_modules": ["no_such_layer"]})


def test_disable_adapter_gives_the_base_models_logits(tiny_model, tiny_tokenizer):
    ids = tiny_tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"]
    base = _logits(tiny_model, ids)
    model = factory.load_model({"name_or_path": "tiny", "lora": {"dropout": 0.0}}, for_training=True).eval()
    assert torch.equal(_logits(model, ids), base)  # B = 0: a fresh adapter changes nothing
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    adapted = _logits(model, ids)
    assert (adapted - base).abs().max() > 1e-2
    with model.disable_adapter():
        assert torch.allclose(_logits(model, ids), base, atol=1e-6, rtol=0)
    assert torch.equal(_logits(model, ids), adapted)  # switched back on after the block


# --- loading options and errors --------------------------------------------------------------------------------


def test_resolve_model_path(tiny_path, tmp_path, monkeypatch):
    assert factory.resolve_model_path(TINY_CFG) == str(tiny_path)
    assert factory.resolve_model_path({"name_or_path": "meta-llama/Meta-Llama-3-8B-Instruct"}) == (
        "meta-llama/Meta-Llama-3-8B-Instruct")
    monkeypatch.chdir(tiny_path.parent)
    local = factory.resolve_model_path({"name_or_path": f"./{tiny_path.name}"})
    assert Path(local).is_absolute() and Path(local) == tiny_path.resolve()
    for missing in ("/no/such/model", "./no/such/model", "~/no/such/model"):
        with pytest.raises(GenpiError, match=re.escape(missing) + ".*model.name_or_path"):
            factory.resolve_model_path({"name_or_path": missing})
    with pytest.raises(GenpiError, match="is a file"):
        factory.resolve_model_path({"name_or_path": str(tiny_path / "config.json")})


def test_model_fingerprint_names_the_base(tiny_path):
    assert factory.model_fingerprint(TINY_CFG) == tiny_path.name
    assert factory.model_fingerprint({"name_or_path": str(tiny_path)}) == tiny_path.name
    assert factory.model_fingerprint({"name_or_path": "tiny", "tiny": {"num_hidden_layers": 2}}) != tiny_path.name
    assert factory.model_fingerprint({"name_or_path": "Qwen/Qwen2.5-7B-Instruct"}) == "Qwen/Qwen2.5-7B-Instruct"


def test_dtype_attention_and_safetensors_options(tiny_path):
    kwargs = factory.model_load_kwargs({"name_or_path": "tiny"})
    assert kwargs == {"dtype": torch.float32, "trust_remote_code": False, "use_safetensors": True,
                      "attn_implementation": "sdpa"}
    model = factory.load_model({"name_or_path": "tiny", "dtype": "bfloat16", "attn_implementation": "eager"},
                               for_training=False)
    assert model.dtype == torch.bfloat16 and model.config._attn_implementation == "eager"
    with pytest.raises(GenpiError, match="model.dtype"):
        factory.load_model({"name_or_path": "tiny", "dtype": "float8"})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_4bit_without_cuda_is_one_clear_line(tmp_path):
    with pytest.raises(GenpiError, match="4-bit loading needs a CUDA GPU and bitsandbytes: set model.load_in_4bit"
                       ) as err:
        factory.load_model({"name_or_path": str(tmp_path / "never-built"), "load_in_4bit": True})
    assert "\n" not in str(err.value)


def test_remote_code_runs_only_when_trusted(tmp_path):
    assert factory.model_load_kwargs({"name_or_path": "x/y"})["trust_remote_code"] is False
    assert factory.model_load_kwargs({"name_or_path": "x/y", "trust_remote_code": True})["trust_remote_code"] is True
    for name in ("tiny.yaml", "llama3_8b.yaml", "qwen2_5_7b.yaml", "hf.yaml"):
        assert OmegaConf.load(CONF_MODEL / name).trust_remote_code is False
    # A model folder whose config asks for its own code; the code leaves a file behind if it ever runs.
    folder = tmp_path / "remote"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "genpi_remote_probe", "architectures": ["ProbeModel"],
        "auto_map": {"AutoConfig": "probe.ProbeConfig", "AutoModelForCausalLM": "probe.ProbeModel"}}))
    ran = tmp_path / "ran"
    (folder / "probe.py").write_text(f"open({str(ran)!r}, 'w').write('ran')\n")
    with pytest.raises(GenpiError, match="model.trust_remote_code=true"):
        factory.load_model({"name_or_path": str(folder)}, for_training=False)
    assert not ran.exists()


def test_tokenizer_without_chat_template_or_pad(tmp_path, tiny_path):
    folder = tmp_path / "bare-tokenizer"
    folder.mkdir()
    (folder / "tokenizer.json").write_bytes((tiny_path / "tokenizer.json").read_bytes())
    config = json.loads((tiny_path / "tokenizer_config.json").read_text())
    config.pop("pad_token")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))  # and no chat_template.jinja
    with pytest.raises(GenpiError, match="no chat template.*model.chat_template"):
        factory.load_tokenizer({"name_or_path": str(folder)})
    tok = factory.load_tokenizer({"name_or_path": str(folder), "chat_template": tiny.CHAT_TEMPLATE})
    assert tok.pad_token == tok.eos_token and tok.padding_side == "right"
    assert tok.apply_chat_template(CONVERSATION[:2], tokenize=False).startswith(tiny.BOS)


def test_load_model_and_tokenizer_agree(tiny_path):
    model, tok = factory.load_model_and_tokenizer(TINY_CFG, for_training=False)
    assert model.config.vocab_size == len(tok) and model.config.pad_token_id == tok.pad_token_id


# --- configs ----------------------------------------------------------------------------------------------------


def test_model_configs_share_keys_and_comment_every_key():
    files = sorted(CONF_MODEL.glob("*.yaml"))
    assert {f.stem for f in files} >= {"tiny", "tiny_agent", "llama3_8b", "qwen2_5_7b", "hf"}
    keys = {"name_or_path", "dtype", "attn_implementation", "trust_remote_code", "load_in_4bit", "chat_template",
            "tiny", "tiny_agent", "lora"}
    for f in files:
        cfg = OmegaConf.load(f)
        assert set(cfg.keys()) == keys, f.name
        assert dict(cfg.lora) == {"enabled": True, "r": 16, "alpha": 32, "dropout": 0.05,
                                  "target_modules": "all-linear"}, f.name
        for line in f.read_text().splitlines():
            if re.match(r"\s*\w+:", line):
                assert "#" in line, f"{f.name}: uncommented key: {line}"
    tiny_cfg = OmegaConf.load(CONF_MODEL / "tiny.yaml")
    assert tiny_cfg.name_or_path == "tiny" and tiny.arch_config(dict(tiny_cfg.tiny)) == tiny.DEFAULT_ARCH
    llama = OmegaConf.load(CONF_MODEL / "llama3_8b.yaml")
    assert (llama.name_or_path, llama.dtype, llama.load_in_4bit) == ("meta-llama/Meta-Llama-3-8B-Instruct",
                                                                      "bfloat16", True)
    assert OmegaConf.load(CONF_MODEL / "qwen2_5_7b.yaml").name_or_path == "Qwen/Qwen2.5-7B-Instruct"
    assert OmegaConf.is_missing(OmegaConf.load(CONF_MODEL / "hf.yaml"), "name_or_path")


# --- vLLM -------------------------------------------------------------------------------------------------------

VLLM_SCRIPT = """
import json, sys
if __name__ == "__main__":
    from vllm import LLM, SamplingParams
    llm = LLM(model=sys.argv[1], enforce_eager=True, dtype="float32", seed=0, max_model_len=1024)
    conv = json.loads(sys.argv[2])
    out = llm.chat(conv, SamplingParams(max_tokens=4, temperature=0.0, prompt_logprobs=0))[0]
    logprobs = [None if p is None else p[t].logprob for p, t in zip(out.prompt_logprobs, out.prompt_token_ids)]
    print("GENPI_RESULT " + json.dumps({"prompt_ids": list(out.prompt_token_ids), "logprobs": logprobs}))
"""


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_loads_the_tiny_folder_with_the_same_tokens_and_logprobs(tiny_path, tiny_model, tiny_tokenizer,
                                                                       tmp_path):
    pytest.importorskip("vllm")
    script = tmp_path / "load_tiny.py"
    script.write_text(VLLM_SCRIPT)
    conv = CONVERSATION[:4]
    proc = subprocess.run([sys.executable, str(script), str(tiny_path), json.dumps(conv)], capture_output=True,
                          text=True, timeout=600, env=vllm_env(), cwd=tmp_path)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("GENPI_RESULT ")), None)
    assert line, proc.stderr[-3000:]
    result = json.loads(line.removeprefix("GENPI_RESULT "))
    ids = tiny_tokenizer.apply_chat_template(conv, tokenize=True, add_generation_prompt=True,
                                             return_dict=True)["input_ids"]
    assert result["prompt_ids"] == ids
    hf = torch.log_softmax(_logits(tiny_model, ids).double(), -1)
    want = [hf[i - 1, t].item() for i, t in enumerate(ids) if i > 0]
    assert max(abs(a - b) for a, b in zip(result["logprobs"][1:], want)) < 1e-3
