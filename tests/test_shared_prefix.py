"""Shared-prefix (cascade) attention gives the teacher the same hidden states and logits as the naive pass (the
whole prompt + suffix re-run), in float32 to 1e-5, one test per case: right padding, GQA, a prompt longer than the
suffix, Qwen-style attention; it falls back to the cached prompt, saying why, where it cannot apply; the config key
is checked before the model loads."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from genpi.models.prefix import choose_teacher_attention, hidden_after_shared_prefix, prefix_kv
from genpi.models.shared_prefix_attention import ATTENTION_NAME, attention_with_lse, merge_attention_states

REPO = Path(__file__).resolve().parents[1]
KERNELS = ("torch_flash_cpu", "eager")


def _random_model(kind: str, heads: int = 8, kv_heads: int = 2, hidden: int = 64, layers: int = 2):
    """A random-weight float32 model of ``kind`` (llama | qwen2 | mistral), built in memory in a fraction of a second."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    torch.manual_seed(0)
    common = dict(vocab_size=512, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=2048)
    if kind == "qwen2":  # Qwen2: biases on q/k/v, another RoPE base
        model = Qwen2ForCausalLM(Qwen2Config(**common, rope_theta=1_000_000.0))
    elif kind == "mistral":  # a sliding window that the test's sequences fit in
        model = MistralForCausalLM(MistralConfig(**common, sliding_window=1024))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common))
    return model.eval()


def _batch(prompt_len: int, suffix_lens: list[int], vocab: int, seed: int = 1):
    """``[B, P + max(suffix_lens)]`` ids (the same prompt in every row) and its right-padded mask."""
    g = torch.Generator().manual_seed(seed)
    width = prompt_len + max(suffix_lens)
    prompt = torch.randint(3, vocab, (1, prompt_len), generator=g)
    ids = torch.cat([prompt.expand(len(suffix_lens), -1),
                     torch.randint(3, vocab, (len(suffix_lens), width - prompt_len), generator=g)], 1)
    mask = (torch.arange(width) < (prompt_len + torch.tensor(suffix_lens)).unsqueeze(1)).long()
    return ids, mask


def _max_logit_diff(model, ids, mask, prompt_len, kernel):
    """Largest |logit difference| between the shared-prefix pass and the naive pass at the valid suffix positions."""
    decoder = model.get_decoder()
    with torch.no_grad():
        naive = model(input_ids=ids, attention_mask=mask).logits[:, prompt_len:]
        kv = prefix_kv(decoder, ids[:1, :prompt_len])
        shared = model.get_output_embeddings()(hidden_after_shared_prefix(decoder, kv, ids, mask, kernel=kernel))
    valid = mask[:, prompt_len:].bool()
    assert shared.shape == naive.shape
    return (shared - naive)[valid].abs().max().item()


@pytest.mark.parametrize("kernel", KERNELS)
def test_equal_to_naive_with_right_padding(tiny_model, kernel):
    ids, mask = _batch(200, [48, 31, 7, 1], tiny_model.config.vocab_size)
    assert _max_logit_diff(tiny_model, ids, mask, 200, kernel) < 1e-5
    assert tiny_model.config._attn_implementation != ATTENTION_NAME  # switched back after the pass


@pytest.mark.parametrize("kernel", KERNELS)
def test_equal_to_naive_with_grouped_query_attention(kernel):
    model = _random_model("llama", heads=8, kv_heads=2)  # 4 query heads per key head
    ids, mask = _batch(96, [40, 40, 40], model.config.vocab_size)
    assert _max_logit_diff(model, ids, mask, 96, kernel) < 1e-5


@pytest.mark.parametrize("kernel", KERNELS)
def test_equal_to_naive_with_a_prompt_longer_than_the_suffix(tiny_model, kernel):
    ids, mask = _batch(512, [24, 16], tiny_model.config.vocab_size)
    assert _max_logit_diff(tiny_model, ids, mask, 512, kernel) < 1e-5


@pytest.mark.parametrize("kernel", KERNELS)
def test_equal_to_naive_with_qwen_style_attention(kernel):
    model = _random_model("qwen2", heads=4, kv_heads=4)  # biased q/k/v, plain multi-head
    ids, mask = _batch(128, [32, 20], model.config.vocab_size)
    assert _max_logit_diff(model, ids, mask, 128, kernel) < 1e-5


def test_equal_to_naive_with_a_sliding_window_longer_than_the_sequence():
    model = _random_model("mistral", heads=4, kv_heads=1)
    ids, mask = _batch(100, [30, 12], model.config.vocab_size)
    assert choose_teacher_attention("auto", model.config, mask, 100)[0] == "shared"
    assert _max_logit_diff(model, ids, mask, 100, "torch_flash_cpu") < 1e-5


def test_the_shared_pass_differs_from_a_pass_without_the_prompt(tiny_model):
    """Guards the equality tests: the prompt changes the suffix's logits, so they compare something real."""
    ids, mask = _batch(64, [16, 16], tiny_model.config.vocab_size)
    decoder = tiny_model.get_decoder()
    with torch.no_grad():
        shared = hidden_after_shared_prefix(decoder, prefix_kv(decoder, ids[:1, :64]), ids, mask)
        alone = decoder(input_ids=ids[:, 64:], attention_mask=mask[:, 64:]).last_hidden_state
    assert (shared - alone).abs().max() > 1e-2


def test_merge_of_two_key_sets_is_attention_over_their_union():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 4, 9, 8), torch.randn(2, 4, 9, 8)
    out_a, lse_a = attention_with_lse(q, k[:, :, :6], v[:, :, :6], 0.3, causal=False, kernel="eager")
    out_b, lse_b = attention_with_lse(q, k[:, :, 6:], v[:, :, 6:], 0.3, causal=False, kernel="eager")
    whole = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.3)
    assert torch.allclose(merge_attention_states(out_a, lse_a, out_b, lse_b), whole, atol=1e-6)
    out, lse = attention_with_lse(q, k, v, 0.3, causal=False, kernel="torch_flash_cpu")
    assert torch.allclose(lse, torch.logsumexp(q @ k.transpose(-1, -2) * 0.3, -1), atol=1e-5)


def test_falls_back_to_the_cached_prompt_with_the_reason(tiny_model, caplog):
    mask = torch.ones(2, 10, dtype=torch.long)
    assert choose_teacher_attention("auto", tiny_model.config, mask, 4) == ("shared", "applies")
    left_padded = mask.clone()
    left_padded[1, :3] = 0
    with caplog.at_level(logging.INFO, logger="genpi.models.prefix"):
        path, why = choose_teacher_attention("shared", tiny_model.config, left_padded, 4)
    assert (path, why) == ("cached", "rows are not right padded")
    assert "right padded" in caplog.text
    from transformers import MistralConfig

    windowed = MistralConfig(sliding_window=16, hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    path, why = choose_teacher_attention("auto", windowed, torch.ones(2, 40, dtype=torch.long), 4)
    assert path == "cached" and "sliding-window" in why
    assert choose_teacher_attention("auto", windowed, mask, 4)[0] == "shared"  # 10 positions: the window hides none
    assert choose_teacher_attention("naive", tiny_model.config, mask, 4)[0] == "naive"


def test_module_teacher_paths_agree(tiny_tokenizer):
    """The training module's teacher gives one answer whichever path loss.kl.teacher_attention selects."""
    from tests.test_module import _batch as module_batch
    from tests.test_module import _module

    module, task = _module(tiny_tokenizer, {"kl": {"weight": 1.0, "teacher_attention": "shared"}}, prefix_cache=True)
    assert module.teacher_attention == "shared"
    batch = module_batch(tiny_tokenizer, task, ("kl",))
    hidden = {}
    for path in ("shared", "cached", "naive"):
        module.teacher_attention = path
        hidden[path] = module.teacher_hidden(batch["kl"])
        if path != "naive":
            assert module.last_teacher_path[0] == path
    weight = module.lm_head()[0]
    for path in ("cached", "shared"):
        assert torch.allclose(hidden[path] @ weight.T, hidden["naive"] @ weight.T, atol=1e-5)


def test_teacher_attention_keys_are_checked():
    from genpi.schema import GenpiError, TeacherAttention, read

    assert read({"teacher_attention": "auto", "prefix_cache": False}, TeacherAttention, "loss.kl").requested == "naive"
    assert read({}, TeacherAttention, "loss.kl").requested == "auto"
    with pytest.raises(GenpiError, match="prefix_cache=true"):
        read({"teacher_attention": "shared", "prefix_cache": False}, TeacherAttention, "loss.kl")


@pytest.mark.slow
def test_a_bad_teacher_attention_stops_before_the_model_loads(tmp_path, tiny_path):
    bad = subprocess.run([sys.executable, "-m", "genpi.train", f"paths.output_root={tmp_path}", "debug=fdr",
                          "loss=genpi_kl", "loss.kl.teacher_attention=sharde"], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "loss.kl.teacher_attention='sharde'" in bad.stderr and "shared" in bad.stderr
    assert not list(tmp_path.rglob("*.ckpt"))  # nothing written that claims a run


@pytest.mark.slow
def test_bench_quick_reports_the_three_teacher_paths(tmp_path, tiny_path):
    from genpi.bench import main

    out = tmp_path / "bench.json"
    out.write_text(json.dumps({"topk": {"kept": True}}))  # a section measured earlier is kept
    main(["--only", "teacher_attention", "--quick", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["topk"] == {"kept": True}
    section = report["teacher_attention"]
    rows = section["timing"]["tiny"]["P"]
    assert set(rows) == {"64", "256"}
    for row in rows.values():
        assert all(diff < 1e-5 for diff in row["max_abs_diff_vs_naive"].values())
        assert set(row["time"]) == {"naive", "cached", "shared"}
        assert all(t["n"] == 3 and t["min_s"] <= t["median_s"] <= t["max_s"] for t in row["time"].values())
        # attention over the prompt is part of the least work, so the bound is below the token ratio
        assert 1 < row["flop_bound_speedup"] < row["token_ratio"]
        assert row["shared_share_of_flop_bound"] == pytest.approx(row["shared_speedup"] / row["flop_bound_speedup"])
    memory = section["memory"]["tiny"]["batch"]
    assert memory["4"]["shared"]["prompt_kv_copies"] == 1 and memory["4"]["cached"]["prompt_kv_copies"] == 4
    assert memory["4"]["cached"]["peak_added_mb"] > memory["4"]["shared"]["peak_added_mb"]


def test_runs_under_bf16_autocast_within_its_rounding(tiny_model):
    """bf16-mixed training: RoPE leaves queries in float32 and values in bf16; the pass must still run and agree
    with the naive pass to bf16 rounding (the cached path's own distance to it is the yardstick)."""
    from genpi.models.prefix import hidden_after_prefix

    ids, mask = _batch(96, [40, 22], tiny_model.config.vocab_size)
    decoder = tiny_model.get_decoder()
    with torch.no_grad():
        kv = prefix_kv(decoder, ids[:1, :96])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            naive = decoder(input_ids=ids, attention_mask=mask).last_hidden_state[:, 96:].float()
            shared = hidden_after_shared_prefix(decoder, kv, ids, mask).float()
            cached = hidden_after_prefix(decoder, tiny_model.config, kv, ids, mask).float()
    valid = mask[:, 96:].bool()
    shared_err, cached_err = (shared - naive)[valid].abs().max(), (cached - naive)[valid].abs().max()
    assert shared_err < 3 * max(float(cached_err), 1e-2)


def test_a_bench_run_over_some_prompt_lengths_keeps_the_reports_other_rows():
    from genpi.bench import _keep_other_teacher_rows

    def section(rounds, rows, batch=1):
        return {"rounds": rounds, "threads": 1, "kernel": "eager",
                "timing": {"wide": {"batch_size": batch, "suffix_tokens": 192, "P": dict(rows)}},
                "memory": {"wide": {"old": True}}}

    old = section(20, {"256": "a", "1024": "b", "4096": "old"})
    merged = _keep_other_teacher_rows(old, {**section(20, {"4096": "new"}), "memory": {}})
    assert merged["timing"]["wide"]["P"] == {"256": "a", "1024": "b", "4096": "new"}
    assert merged["memory"] == {"wide": {"old": True}}
    assert old["timing"]["wide"]["P"]["4096"] == "old"  # the earlier report is not modified in place
    # another number of rounds, or another batch, is not comparable: the new run stands alone
    assert _keep_other_teacher_rows(old, section(3, {"4096": "new"}))["timing"]["wide"]["P"] == {"4096": "new"}
    assert _keep_other_teacher_rows(old, section(20, {"4096": "new"}, batch=2))["timing"]["wide"]["P"] == {"4096": "new"}
