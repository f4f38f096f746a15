"""The pipeline on real tokenizers and chat templates: Llama 3 (tiktoken, 128,256 ids), Qwen's ChatML layout and
Mistral's v3 SentencePiece (32,768 ids), each paired with a tiny random Llama (``model=tiny_llama3_vocab``,
``tiny_chatml``, ``tiny_mistral_vocab``); Llama 4's 202,048-id vocabulary for the chunked losses.

The tokenizers are checked against their publishers' own encoders (``llama_models``' tiktoken tokenizer and chat
format, ``mistral_common``); the training sequences against what ``apply_chat_template`` gives at inference; the
label spans by decoding. Each model is built once per session (the user's genpi cache, like ``tiny``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from genpi.data.tokenize import IGNORE, RecordEncoder, check_chat_template, render
from genpi.tasks.base import Task, builtin_task
from genpi.utils.errors import GenpiError
from tests.conftest import REAL_VOCAB_FAMILIES
from tests.helpers import CONF, compose_cfg

pytest.importorskip("llama_models")
pytest.importorskip("mistral_common")

REPO = CONF.parent
FAMILIES = REAL_VOCAB_FAMILIES
# The layout each template writes around an assistant answer: what its label must decode to, given the content.
END_OF_TURN = {"tiny_llama3_vocab": "<|eot_id|>", "tiny_chatml": "<|im_end|>", "tiny_mistral_vocab": "</s>"}

TEXTS = ["Hello world!", "  two leading spaces\n\n\ttabs and\r\nCRLF", "ls -la /var/log | wc -l && echo $HOME",
         "naïve café, 日本語, emoji 🤖", "1234567 3.14159 -42", "<html><div id=\"x\">a</div></html>", "'s 're 'll"]


def _label_spans(tok, ids: list[int], labels: list[int]) -> list[str]:
    """The text of each run of labelled tokens, decoded in context (the decoded prefix before it cut off), so
    SentencePiece's word-start spaces come out as they are in the whole text."""
    spans, i = [], 0
    while i < len(ids):
        if labels[i] == IGNORE:
            i += 1
            continue
        j = i
        while j < len(ids) and labels[j] != IGNORE:
            j += 1
        before = tok.decode(ids[:i])
        spans.append(tok.decode(ids[:j])[len(before):])
        i = j
    return spans


def _chat_ids(tok, messages, add_generation_prompt=False) -> list[int]:
    out = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


# -- the tokenizers equal their publishers' ------------------------------------------------------------------
def test_llama3_ids_and_chat_equal_metas_own_tokenizer(real_tokenizers):
    from llama_models.datatypes import RawMessage, StopReason
    from llama_models.llama3.chat_format import ChatFormat
    from llama_models.llama3.tokenizer import Tokenizer

    tok, meta = real_tokenizers["tiny_llama3_vocab"], Tokenizer.get_instance()
    assert len(tok) == meta.n_words == 128_256
    for text in TEXTS:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert ids == meta.encode(text, bos=False, eos=False), text
        assert tok.decode(ids) == text
    # Special tokens written in text are single ids, as in Meta's encoder with all specials allowed.
    assert tok("<|eot_id|>x", add_special_tokens=False)["input_ids"] == [meta.special_tokens["<|eot_id|>"], 87]
    chat = [("system", "You operate a shell."), ("user", "List the files"), ("assistant", "Think: ok\nAct: bash"),
            ("user", "total 0")]
    want = ChatFormat(meta).encode_dialog_prompt(
        [RawMessage(role=r, content=c, stop_reason=StopReason.end_of_turn) for r, c in chat]).tokens
    assert _chat_ids(tok, [{"role": r, "content": c} for r, c in chat], add_generation_prompt=True) == want


def test_mistral_chat_ids_equal_mistral_commons(real_tokenizers):
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    from genpi.models.real_vocab import FAMILIES as SPECS
    from genpi.models.real_vocab import tokenizer_file

    tok = real_tokenizers["tiny_mistral_vocab"]
    ref = MistralTokenizer.from_file(str(tokenizer_file(SPECS["tiny_mistral_vocab"])))
    assert len(tok) == 32_768
    kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    for chat in ([("user", "How many files are in /etc?")],
                 [("user", "Hello there"), ("assistant", "Hi! How can I help?"), ("user", "List files\nnow, ok?")],
                 [("system", "Answer briefly."), ("user", "a"), ("assistant", "b 🤖"), ("user", "c")]):
        want = ref.encode_chat_completion(ChatCompletionRequest(messages=[kinds[r](content=c) for r, c in chat])).tokens
        assert _chat_ids(tok, [{"role": r, "content": c} for r, c in chat]) == want, chat


def test_chatml_renders_qwens_layout_with_single_token_markers(real_tokenizers):
    tok = real_tokenizers["tiny_chatml"]
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    assert render(tok, msgs) == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                                 "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n")
    ids = tok("<|im_start|>assistant\n<|im_end|>", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["<|im_start|>", "assistant", "Ċ", "<|im_end|>"]
    assert len(tok) == 128_256 + 3 and tok.eos_token == "<|im_end|>"


@pytest.mark.parametrize("name", FAMILIES)
def test_model_folder_loads_as_a_plain_transformers_model(name, real_tokenizers):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from genpi.models.factory import model_fingerprint, resolve_model_path

    folder = Path(resolve_model_path({"name_or_path": name}))
    assert folder.name == model_fingerprint({"name_or_path": name})
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.vocab_size == len(tok) == len(real_tokenizers[name])
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    stops = set(model.generation_config.eos_token_id)
    assert tok.convert_tokens_to_ids(END_OF_TURN[name]) in stops
    # Rebuilding names the same folder: the cache is hit, not rebuilt.
    assert resolve_model_path({"name_or_path": name}) == str(folder)


@pytest.mark.parametrize("tiny, message", [
    ({"vocab_size": 4096}, "model.tiny has unknown keys ['vocab_size'] for a real-vocabulary model"),
    ({"hidden_size": 63}, "model.tiny.num_attention_heads=2 is not allowed: a divisor of model.tiny.hidden_size=63"),
    ({"seed": "x"}, "model.tiny.seed='x' is not allowed: a whole number"),
    ({"num_hidden_layers": 0}, "model.tiny.num_hidden_layers=0 is not allowed: > 0"),
])
def test_bad_architecture_is_one_line_before_any_build(tiny, message, tmp_path, monkeypatch):
    from genpi.models.factory import resolve_model_path

    monkeypatch.setenv("GENPI_CACHE", str(tmp_path))
    with pytest.raises(GenpiError) as err:
        resolve_model_path({"name_or_path": "tiny_llama3_vocab", "tiny": tiny})
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
    assert not (tmp_path / "models").exists()  # nothing built


def test_yaml_architecture_agrees_with_the_schema():
    from omegaconf import OmegaConf

    from genpi.schema import RealVocabArch, defaults

    for name in FAMILIES + ["tiny_llama4_vocab"]:
        yaml = OmegaConf.to_container(OmegaConf.load(CONF / "model" / f"{name}.yaml"))
        assert yaml["name_or_path"] == name
        assert yaml["tiny"] == defaults(RealVocabArch), name


# -- training sequences: ids as at inference, exact labels, shared prompt ---------------------------------------
@pytest.fixture(scope="module", params=["os", "kg"])
def task_and_records(request):
    from genpi.data.records import load_records

    task = builtin_task(request.param)
    return task, load_records(task.sample_data_path())[:6]


@pytest.mark.parametrize("name", FAMILIES)
def test_sft_ids_are_the_chat_templates_and_labels_decode_to_the_agent_turns(name, real_tokenizers, task_and_records):
    tok, (task, records) = real_tokenizers[name], task_and_records
    enc = RecordEncoder(tok, task)
    for rec in records:
        x = rec["pseudo_input"]
        conv = list(rec["teacher_output_conv"])
        for with_prompt in (False, True):
            sft = enc.sft(rec, with_prompt=with_prompt)
            head = task.teacher_messages(x) if with_prompt else task.student_messages(x)
            assert sft["input_ids"] == _chat_ids(tok, head + conv)  # what the model meets at inference
            spans = _label_spans(tok, sft["input_ids"], sft["labels"])
            # Each agent turn exactly as the template writes it: content (trimmed where the template trims) and the
            # end-of-turn marker; no header, nothing of the next turn.
            contents = [m["content"] for m in conv if m["role"] == "assistant"]
            assert len(spans) == len(contents)
            for span, content in zip(spans, contents):
                body = content.strip() if name == "tiny_llama3_vocab" else content
                lead = " " if name == "tiny_mistral_vocab" else ""
                assert span == lead + body + END_OF_TURN[name]
            if with_prompt:
                assert sft["input_ids"][: len(enc.prompt.ids)] == enc.prompt.ids


@pytest.mark.parametrize("name", FAMILIES)
def test_kl_views_share_the_prompt_prefix_and_align_the_response(name, real_tokenizers, task_and_records):
    tok, (task, records) = real_tokenizers[name], task_and_records
    enc = RecordEncoder(tok, task)
    assert enc.prompt.text and tok.decode(enc.prompt.ids) == enc.prompt.text
    for rec in records:
        kl = enc.kl(rec)
        n = kl["response_len"]
        teacher, student = kl["teacher_input_ids"], kl["student_input_ids"]
        assert teacher[: len(enc.prompt.ids)] == enc.prompt.ids
        assert teacher[-n:] == student[-n:]
        answer = [{"role": "assistant", "content": rec["teacher_output_single"]}]
        x = rec["pseudo_input"]
        # The teacher's view + answer decodes to the rendered chat up to the end-of-turn token (ChatML's newline
        # after it is not generated), and is the template's own tokenization.
        eot = END_OF_TURN[name]
        rendered = render(tok, task.teacher_messages(x) + answer)
        assert tok.decode(teacher) == rendered[: rendered.rindex(eot) + len(eot)]
        assert teacher == _chat_ids(tok, task.teacher_messages(x) + answer)[: len(teacher)]
        assert student == _chat_ids(tok, task.student_messages(x) + answer)[: len(student)]
        assert tok.decode(teacher[-1:]) == eot and tok.decode(student[-1:]) == eot


@pytest.mark.parametrize("name", FAMILIES)
def test_pg_target_decodes_to_the_prompt_and_reason(name, real_tokenizers, task_and_records):
    tok, (task, records) = real_tokenizers[name], task_and_records
    pg = RecordEncoder(tok, task).pg(records[0])
    (span,) = _label_spans(tok, pg["input_ids"], pg["labels"])
    target = span.removesuffix(END_OF_TURN[name])
    assert target.strip().startswith(task.prompt_text.strip()[:200])
    assert pg["input_ids"] == _chat_ids(tok, [{"role": "user", "content": "x"}])[:0] + pg["input_ids"]


def test_inputs_that_merge_with_the_prompts_end_keep_one_shared_prefix(real_tokenizers):
    """Llama 3's BPE writes ':\\n' as one token and '\\n\\n' as another: an input starting with a newline would change
    the prompt's last token, so the shared prefix stops before it, and every input still starts with it."""
    tok = real_tokenizers["tiny_llama3_vocab"]
    task = builtin_task("os")
    enc = RecordEncoder(tok, task)
    full = render(tok, task.teacher_messages("\u2063"), add_generation_prompt=True).split("\u2063")[0]
    assert full.startswith(enc.prompt.text) and len(enc.prompt.text) < len(full)
    for x in ["\n\nstarts with blank lines", " leading space", "plain", "42 files", ":colon"]:
        rec = {"pseudo_input": x, "teacher_output_single": "Act: finish", "teacher_output_conv": []}
        kl = enc.kl(rec)
        assert kl["teacher_input_ids"][: len(enc.prompt.ids)] == enc.prompt.ids


# -- templates genpi cannot train on exactly: one line naming the template and what differs -------------------
def _task_with_system_turn() -> Task:
    return Task(name="unit", prompt_turns=[{"role": "system", "content": "You operate a shell."},
                                          {"role": "user", "content": "My problem is:"}], parser=None)


def test_template_that_moves_the_system_prompt_is_refused_in_one_line(real_tokenizers):
    """Mistral's format puts the system prompt in front of the LAST user turn: a teacher view with a system turn
    renders differently once the conversation goes on."""
    with pytest.raises(GenpiError) as err:
        RecordEncoder(real_tokenizers["tiny_mistral_vocab"], _task_with_system_turn())
    msg = str(err.value)
    assert "\n" not in msg and "tiny_mistral_vocab" in msg and "not prefix-stable" in msg
    assert "You operate a shell." in msg  # what differs: where the system prompt went
    # The same task is fine where the system turn stays first (Llama 3, ChatML).
    for name in ("tiny_llama3_vocab", "tiny_chatml"):
        RecordEncoder(real_tokenizers[name], _task_with_system_turn())


def test_template_that_inserts_todays_date_is_refused_in_one_line(real_tokenizers):
    """A Llama 3.1-style default system turn with today's date (the template calls strftime_now)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(real_tokenizers["tiny_llama3_vocab"].name_or_path)
    tok.chat_template = ("{{ bos_token }}<|start_header_id|>system<|end_header_id|>\n\nToday Date: "
                         "{{ strftime_now('%d %b %Y') }}<|eot_id|>" + tok.chat_template.split("{{ bos_token }}", 1)[1])
    with pytest.raises(GenpiError) as err:
        check_chat_template(tok, builtin_task("os"))
    msg = str(err.value)
    assert "\n" not in msg and "today's date" in msg and "tiny_llama3_vocab" in msg
    assert "03 Feb 2001" in msg and "13 Dec 2011" in msg  # the two renderings that differ
    # A default system prompt that every view gets alike (ChatML's) is accepted.
    check_chat_template(real_tokenizers["tiny_chatml"], builtin_task("os"))


def test_label_boundary_inside_a_token_is_refused(real_tokenizers):
    """A template that glues the answer to the header text with no separator: Llama 3's BPE merges them into one
    token, which would be half label, half not."""
    from transformers import AutoTokenizer

    from genpi.data.tokenize import encode_chat

    tok = AutoTokenizer.from_pretrained(real_tokenizers["tiny_llama3_vocab"].name_or_path)
    tok.chat_template = ("{% for m in messages %}{{ m['role'] + ':' }}{% if m['role'] == 'assistant' %}"
                         "{% generation %}{{ m['content'] + '<|eot_id|>' }}{% endgeneration %}"
                         "{% else %}{{ m['content'] + '<|eot_id|>' }}{% endif %}{% endfor %}"
                         "{% if add_generation_prompt %}assistant:{% endif %}")
    with pytest.raises(GenpiError, match="spans the end of a context part"):
        encode_chat(tok, [{"role": "user", "content": "x"}, {"role": "assistant", "content": "::done"}])


# -- the pipeline on each model: synthesis, every loss, evaluation, export, vLLM -------------------------------
SMALL_SYNTH = ["synth.pseudo_inputs.num_inputs=3", "synth.chunk_size=3", "synth.conversations.max_turns=2",
               "synth.outputs.sampling.max_tokens=8", "synth.reasons.sampling.max_tokens=8",
               "synth.conversations.sampling.max_tokens=8", "synth.conversations.env_sampling.max_tokens=8",
               "synth.progress=false", "synth.teacher_logits.top_k=5",
               "synth.stages=[pseudo_inputs,outputs,reasons,conversations,teacher_logits]",
               # Sampled: greedy, these random tied-embedding models repeat the generation prompt's last token
               # (a special or blank one), which decodes to empty text, and training refuses empty columns.
               *(f"synth.{s}.temperature=1.0" for s in ("outputs.sampling", "reasons.sampling",
                                                        "conversations.sampling", "conversations.env_sampling"))]


@pytest.fixture(scope="module")
def hf_datasets(tmp_path_factory, real_tokenizers) -> dict[str, Path]:
    """One small dataset per model, synthesized through the hf client with every stage (top-k logits included)."""
    from genpi.synth import run_synthesis

    out = {}
    for name in FAMILIES:
        root = tmp_path_factory.mktemp(f"synth-{name}")
        out[name] = Path(run_synthesis(compose_cfg("synth", [f"model={name}", *SMALL_SYNTH], root)))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_hf_synthesis_writes_records_whose_top_k_rows_match_the_response_tokens(name, hf_datasets, real_tokenizers):
    from genpi.data.records import load_records
    from genpi.data.tokenize import response_ids

    records = load_records(hf_datasets[name])
    assert len(records) == 3
    tok = real_tokenizers[name]
    for rec in records:
        assert rec["teacher_output_conv"] and rec["teacher_output_conv"][0]["role"] == "assistant"
        # One top-k row per response token of this tokenizer, end-of-turn included.
        assert len(rec["teacher_topk_ids"]) == len(response_ids(tok, rec["teacher_output_single"]))
        assert max(max(row) for row in rec["teacher_topk_ids"]) < len(tok)


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("loss", ["genpi", "w_prompt"])
def test_fast_dev_run_on_synthesized_data(name, loss, hf_datasets, tmp_path):
    """``genpi`` trains the KL (from the stored top-k logits), SFT and PG terms at once; ``w_prompt`` the SFT with
    the prompt kept as a shared token prefix."""
    from genpi.train import train

    out = train(compose_cfg("train", [f"model={name}", f"loss={loss}", "debug=fdr",
                                      f"data.path={hf_datasets[name]}", "data.val_size=1", "data.test_size=0"],
                            tmp_path))
    assert out["trainer"].global_step == 1
    logged = out["trainer"].logged_metrics
    assert all(float(v) == float(v) for v in logged.values())  # no NaN at a real vocabulary


@pytest.mark.slow
@pytest.mark.parametrize("loss", sorted(p.stem for p in (CONF / "loss").glob("*.yaml")))
def test_every_loss_option_fast_dev_run_on_the_sentencepiece_model(loss, tmp_path):
    """Every ``loss=`` option once, on the cheapest real tokenizer (the terms all run at 128k in the test above)."""
    from genpi.train import train

    out = train(compose_cfg("train", ["model=tiny_mistral_vocab", f"loss={loss}", "debug=fdr", "data.max_records=8",
                                      "loss.kl.sampling.max_new_tokens=6"], tmp_path))
    assert out["trainer"].global_step == 1


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_evaluation_runs_on_the_real_vocabulary(name, trained_runs, tmp_path):
    from genpi.evaluate import run_evaluation

    cfg = compose_cfg("eval", [f"model={name}", f"run_dir={trained_runs(name)}", "eval.engine=hf",
                               "eval.max_new_tokens=8", "eval.savings.new_tokens=4", "eval.savings.requests=1",
                               "eval.savings.repeats=1"], tmp_path)
    metrics = json.loads((Path(run_evaluation(cfg)).parent / "metrics.json").read_text())
    # The prompt the student no longer needs is counted in this tokenizer's tokens.
    assert metrics["savings"]["prompt_tokens_saved"] > 500


# -- chunked losses at real vocabularies -----------------------------------------------------------------------
@pytest.mark.parametrize("vocab", [128_256, 202_048])
def test_chunked_losses_equal_the_full_ones_at_real_vocabularies(vocab):
    import torch

    from genpi.losses import chunked_distill_loss, chunked_token_cross_entropy, distill_loss, token_cross_entropy

    torch.manual_seed(0)
    n, hidden = 12, 16
    weight = torch.randn(vocab, hidden) / hidden**0.5
    student = torch.randn(n, hidden, requires_grad=True)
    teacher = torch.randn(n, hidden)
    targets = torch.randint(0, vocab, (n,))
    targets[3] = vocab - 1  # the last ids (special tokens) are reachable
    for kind in ("forward_kl", "reverse_kl"):
        full = distill_loss((student @ weight.T)[None], (teacher @ weight.T)[None], torch.ones(1, n, dtype=torch.bool),
                            kind=kind)
        (g_full,) = torch.autograd.grad(full, student)
        chunked = chunked_distill_loss(student, teacher, weight, kind=kind, chunk_size=5)
        (g_chunk,) = torch.autograd.grad(chunked, student)
        assert torch.allclose(full, chunked, atol=1e-5) and torch.allclose(g_full, g_chunk, atol=1e-6)
    ce = token_cross_entropy((student @ weight.T)[None], targets[None])
    assert torch.allclose(ce, chunked_token_cross_entropy(student, weight, targets, chunk_size=5), atol=1e-5)


def test_real_vocabulary_sizes_come_from_the_packages_files():
    from genpi.models.real_vocab import vocab_sizes

    sizes = vocab_sizes()
    assert sizes["tiny_llama3_vocab"] == 128_256 and sizes["tiny_llama4_vocab"] == 202_048
    assert sizes["tiny_mistral_vocab"] == 32_768


@pytest.mark.parametrize("option", FAMILIES + ["tiny_llama4_vocab"])
def test_model_options_pass_the_schema_check(tmp_path, option):
    from genpi import schema

    spec = schema.check(compose_cfg("train", [f"model={option}"], tmp_path), "train")
    assert spec.model.name_or_path == option


def test_loss_memory_at_a_real_vocabulary_uses_the_models_head_and_agrees_chunked():
    from genpi.models.real_vocab import loss_memory_child

    chunked = loss_memory_child("tiny_mistral_vocab", "chunked", 48, 16)
    full = loss_memory_child("tiny_mistral_vocab", "unchunked", 48, 16)
    assert chunked["vocab"] == full["vocab"] == 32_768 and chunked["hidden"] == 64
    for key in ("kl", "ce", "grad_norm"):
        assert chunked[key] == pytest.approx(full[key], rel=1e-4), key
    assert full["ce"] > 5  # a random model over 32k ids: near log(32768) = 10.4, not a degenerate 0


@pytest.mark.slow
def test_genpi_bench_reports_memory_at_the_real_vocabulary(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "genpi.bench", "--only", "real_vocab",
                           "--real-vocab-models", "tiny_mistral_vocab", "--real-vocab-tokens", "64", "--chunk", "16",
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads(out.read_text())["real_vocab_memory"]["models"]["tiny_mistral_vocab"]
    assert row["unchunked"]["vocab"] == 32_768 and row["max_value_diff"] < 1e-3
    assert row["unchunked"]["delta_mb"] > 0 and row["chunked"]["delta_mb"] >= 0
