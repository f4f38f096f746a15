"""Tokenization per loss, masks, splits, batching and record loading."""

from __future__ import annotations

import json

import pytest

from genpi.data.datamodule import (
    Collator,
    GenPIDataModule,
    LengthGroupedBatchSampler,
    input_key,
    split_records,
)
from genpi.data.records import COLUMNS, load_records, save_hf, write_jsonl
from genpi.data.tokenize import IGNORE, Limits, RecordEncoder, teacher_prompt
from genpi.tasks import TASK_NAMES
from genpi.tasks.base import builtin_task
from genpi.utils.errors import GenpiError


def label_spans(tok, ids, labels):
    spans, cur = [], []
    for i, lab in zip(ids, labels):
        if lab != IGNORE:
            cur.append(i)
        elif cur:
            spans.append(tok.decode(cur))
            cur = []
    if cur:
        spans.append(tok.decode(cur))
    return spans


EOT = "<|eot_id|>"


@pytest.fixture(scope="module", params=TASK_NAMES)
def task_and_records(request):
    task = builtin_task(request.param)
    return task, load_records(task.sample_data_path())


def test_sft_labels_are_exactly_the_agent_turns(tiny_tokenizer, task_and_records):
    task, records = task_and_records
    enc = RecordEncoder(tiny_tokenizer, task, Limits(conversation_tokens=None, input_tokens=None))
    for rec in records[:8]:
        ex = enc.sft(rec)
        want = [t["content"] + EOT for t in rec["teacher_output_conv"] if t["role"] == "assistant"]
        assert label_spans(tiny_tokenizer, ex["input_ids"], ex["labels"]) == want
        # the student sees no prompt
        assert task.prompt_turns[0]["content"][:40] not in tiny_tokenizer.decode(ex["input_ids"])


def test_w_prompt_sft_starts_with_the_shared_prompt_ids(tiny_tokenizer, task_and_records):
    task, records = task_and_records
    enc = RecordEncoder(tiny_tokenizer, task, Limits(conversation_tokens=None))
    prompt = teacher_prompt(tiny_tokenizer, task)
    ex = enc.sft(records[0], with_prompt=True)
    assert ex["input_ids"][: len(prompt.ids)] == prompt.ids
    want = [t["content"] + EOT for t in records[0]["teacher_output_conv"] if t["role"] == "assistant"]
    # the prompt's own worked example is not trained on
    assert label_spans(tiny_tokenizer, ex["input_ids"], ex["labels"]) == want


def test_pg_target_is_prompt_then_reason(tiny_tokenizer, task_and_records):
    task, records = task_and_records
    rec = records[0]
    with_reason = RecordEncoder(tiny_tokenizer, task).pg(rec)
    (span,) = label_spans(tiny_tokenizer, with_reason["input_ids"], with_reason["labels"])
    assert span.startswith(rec["context"]) and span.endswith(rec["reason"] + EOT)
    no_reason = RecordEncoder(tiny_tokenizer, task, pg_reason=False).pg(rec)
    assert label_spans(tiny_tokenizer, no_reason["input_ids"], no_reason["labels"]) == [rec["context"] + EOT]


def test_kl_response_is_aligned_and_prompt_is_a_shared_prefix(tiny_tokenizer, task_and_records):
    task, records = task_and_records
    enc = RecordEncoder(tiny_tokenizer, task)
    prompt = teacher_prompt(tiny_tokenizer, task)
    for rec in records[:8]:
        ex = enc.kl(rec)
        n = ex["response_len"]
        assert ex["teacher_input_ids"][-n:] == ex["student_input_ids"][-n:]
        assert tiny_tokenizer.decode(ex["teacher_input_ids"][-n:]) == rec["teacher_output_single"] + EOT
        assert ex["teacher_input_ids"][: len(prompt.ids)] == prompt.ids
        assert len(ex["teacher_input_ids"]) - len(ex["student_input_ids"]) >= len(prompt.ids) // 2


def test_collator_masks_select_the_same_response_tokens(tiny_tokenizer, task_and_records):
    task, records = task_and_records
    enc = RecordEncoder(tiny_tokenizer, task)
    batch = Collator(tiny_tokenizer.pad_token_id)([{"kl": enc.kl(r)} for r in records[:5]])["kl"]
    s_targets = batch["student_input_ids"][:, 1:][batch["student_response_mask"][:, :-1]]
    t_targets = batch["teacher_input_ids"][:, 1:][batch["teacher_response_mask"][:, :-1]]
    assert s_targets.tolist() == t_targets.tolist() == batch["response_ids"].tolist()


def test_truncation_is_counted_and_pg_target_not_cut_by_default(tiny_tokenizer, task_and_records):
    task, records = task_and_records
    enc = RecordEncoder(tiny_tokenizer, task, Limits(conversation_tokens=20, pg_answer_tokens=4))
    for rec in records[:3]:
        ex = enc.pg(rec)
        (span,) = label_spans(tiny_tokenizer, ex["input_ids"], ex["labels"])
        assert span.startswith(rec["context"])  # long target intact
        assert len(enc.sft(rec)["input_ids"]) == 20
    assert enc.report.counts["sft_conversation"] == 3
    assert enc.report.counts["pg_student_answer"] == 3
    cut = RecordEncoder(tiny_tokenizer, task, Limits(pg_target_tokens=16))
    cut.pg(records[0])
    assert cut.report.counts["pg_target"] == 1


def test_split_is_seeded_disjoint_and_keeps_duplicates_together():
    recs = [{"pseudo_input": f"input {i % 40}"} for i in range(60)]
    recs.append({"pseudo_input": "  INPUT 3 "})
    a = split_records(recs, 0.1, 0.1, seed=1)
    b = split_records(list(reversed(recs)), 0.1, 0.1, seed=1)
    keys = {s: {input_key(r["pseudo_input"]) for r in rs} for s, rs in a.items()}
    assert keys == {s: {input_key(r["pseudo_input"]) for r in rs} for s, rs in b.items()}
    assert not (keys["train"] & keys["val"]) and not (keys["train"] & keys["test"]) and not (keys["val"] & keys["test"])
    assert len(keys["val"]) == len(keys["test"]) == 4
    c = split_records(recs, 0.1, 0.1, seed=2)
    assert {input_key(r["pseudo_input"]) for r in c["test"]} != keys["test"]
    with pytest.raises(GenpiError, match="val_size"):
        split_records(recs[:3], 0.5, 0.5, seed=0)


def test_length_grouped_sampler_covers_everything_and_shards():
    lengths = [(i * 37) % 101 for i in range(50)]
    s = LengthGroupedBatchSampler(lengths, 4, seed=0)
    flat = [i for b in s for i in b]
    assert sorted(flat) == list(range(50))
    r0 = [i for b in LengthGroupedBatchSampler(lengths, 4, num_replicas=2, rank=0) for i in b]
    r1 = [i for b in LengthGroupedBatchSampler(lengths, 4, num_replicas=2, rank=1) for i in b]
    assert not set(r0) & set(r1)
    assert len(list(LengthGroupedBatchSampler(lengths, 4, num_replicas=2, rank=0))) == len(
        list(LengthGroupedBatchSampler(lengths, 4, num_replicas=2, rank=1)))
    s.set_epoch(1)
    assert [i for b in s for i in b] != flat


def test_grouping_lowers_padding(tiny_tokenizer):
    task = builtin_task("os")
    common = dict(losses=("sft", "pg", "kl"), batch_size=8, seed=0)
    grouped = GenPIDataModule(task, tiny_tokenizer, group_by_length=True, **common)
    plain = GenPIDataModule(task, tiny_tokenizer, group_by_length=False, **common)
    grouped.setup()
    plain.setup()
    assert grouped.padding_ratio() < plain.padding_ratio()


def test_weight_zero_terms_are_not_built(tiny_tokenizer):
    dm = GenPIDataModule(builtin_task("os"), tiny_tokenizer, losses=("sft",))
    dm.setup()
    assert set(dm.datasets["train"][0]) == {"sft"}
    assert set(dm.datasets["val"][0]) == {"sft", "kl"}  # val/kl is always measured


def test_records_errors_name_the_problem(tmp_path):
    with pytest.raises(GenpiError, match="not found"):
        load_records(tmp_path / "nope.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(GenpiError, match="empty"):
        load_records(empty)
    rec = {c: "x" for c in COLUMNS}
    del rec["reason"]
    bad = write_jsonl([rec], tmp_path / "bad.jsonl")
    with pytest.raises(GenpiError, match=r"missing column 'reason'.*|bad\.jsonl"):
        load_records(bad)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"a": 1}\n{oops\n')
    with pytest.raises(GenpiError, match="broken.jsonl:2"):
        load_records(broken)


def test_save_to_disk_folder_loads_as_release_format(tmp_path):
    rec = {c: f"{c}-value" for c in COLUMNS}
    rec["teacher_output_conv"] = [{"role": "assistant", "content": "Act: finish"}, {"role": "user", "content": "ok"}]
    folder = save_hf([rec], tmp_path / "ds")
    (loaded,) = load_records(folder)
    assert loaded["teacher_output_conv"] == rec["teacher_output_conv"]
    assert loaded["pseudo_input"] == "pseudo_input-value"
    # a plain-string conversation is one agent turn
    rec2 = dict(rec, teacher_output_conv="Act: finish")
    (loaded2,) = load_records(write_jsonl([rec2], tmp_path / "r.jsonl"))
    assert loaded2["teacher_output_conv"] == [{"role": "assistant", "content": "Act: finish"}]
    json.dumps(loaded2)


def test_json_array_files_and_jsonl_read_the_same_records(tmp_path):
    records = [{c: f"{c}-{i}" for c in COLUMNS} for i in range(3)]
    as_jsonl = load_records(write_jsonl(records, tmp_path / "r.jsonl"))
    array = tmp_path / "r.json"
    array.write_text(json.dumps(records))
    as_array = load_records(array)
    assert as_array == as_jsonl and len(as_array) == 3
    assert as_array.where == [f"{array}[{i}]" for i in range(3)] and as_jsonl.where[2].endswith("r.jsonl:3")
    bad = [dict(r) for r in records]
    bad[2]["teacher_output_single"] = None
    array.write_text(json.dumps(bad))
    with pytest.raises(GenpiError, match=r"r\.json\[2\]: column 'teacher_output_single' must be a string, not null"):
        load_records(array)


def test_duplicate_inputs_are_counted_and_optionally_dropped(tiny_tokenizer, tmp_path):
    task = builtin_task("os")
    records = load_records(task.sample_data_path())[:20]
    doubled = write_jsonl([*records, *(dict(r, pseudo_input=r["pseudo_input"].upper()) for r in records[:5])],
                          tmp_path / "dups.jsonl")
    kept = GenPIDataModule(task, tiny_tokenizer, path=str(doubled), losses=("sft",), val_size=2, test_size=2)
    kept.load()
    assert kept.data_report()["data/duplicates"] == 5 and kept.data_report()["data/duplicates_dropped"] == 0
    assert sum(len(v) for v in kept.splits.values()) == 25
    dropped = GenPIDataModule(task, tiny_tokenizer, path=str(doubled), losses=("sft",), val_size=2, test_size=2,
                              drop_duplicates=True)
    dropped.load()
    assert dropped.data_report()["data/duplicates_dropped"] == 5
    assert sum(len(v) for v in dropped.splits.values()) == 20
