"""The typed config schema: the YAML files and the dataclasses agree, every shipped option passes, and bad input of
every kind ends in one line naming the problem (exit 2), before any model loads, with nothing written that claims
success."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import genpi.evaluation.artifacts  # noqa: F401  (registers genpi_eval_name, used by eval.yaml and export.yaml)
from genpi import schema
from genpi.utils.errors import GenpiError
from tests.helpers import CONF, compose_cfg, run_bad

SAMPLES = CONF.parent / "genpi" / "tasks" / "samples"


def _yaml(cfg, key):
    return OmegaConf.to_container(cfg[key], resolve=True)


def _declared(tree: dict, cls) -> dict:
    """``tree`` restricted to the keys ``cls`` declares (nested blocks too)."""
    hints = __import__("typing").get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        if f.name in tree:
            tp = hints[f.name]
            value = tree[f.name]
            out[f.name] = _declared(value, tp) if dataclasses.is_dataclass(tp) and isinstance(value, dict) else value
    return out


def test_yaml_defaults_equal_the_dataclass_defaults(tmp_path):
    train = compose_cfg("train", [], tmp_path)
    assert _yaml(train, "loss") == dataclasses.asdict(schema.Loss())
    assert _yaml(train, "optim") == dataclasses.asdict(schema.Optim())
    assert _yaml(train, "data") == dataclasses.asdict(schema.Data())
    assert _yaml(train, "model") == dataclasses.asdict(schema.Model())
    top = {f.name: f.default for f in dataclasses.fields(schema.Train)
           if f.name not in ("loss", "optim", "data", "model", "run_name", "sweep_name", "tags",
                             "post_eval_overrides")}
    assert {k: train[k] for k in top} == top
    assert list(train.tags) == [] and list(train.post_eval_overrides) == []

    ev = compose_cfg("eval", [], tmp_path)
    assert _yaml(ev, "eval") == dataclasses.asdict(schema.Eval())
    synth = compose_cfg("synth", [], tmp_path)
    want = dataclasses.asdict(schema.Synth())
    got = _declared(_yaml(synth, "synth"), schema.Synth)
    assert {k: v for k, v in got.items() if k != "out_dir"} == {k: v for k, v in want.items() if k != "out_dir"}
    export = compose_cfg("export", [], tmp_path)
    assert _yaml(export, "export") == dataclasses.asdict(schema.Export())


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONF / "loss").glob("*.yaml")))
def test_every_loss_option_passes(tmp_path, option):
    spec = schema.check(compose_cfg("train", [f"loss={option}"], tmp_path), "train")
    assert spec.loss.name == option and spec.loss.active_terms


def test_opcd_is_the_on_policy_reverse_kl_alone(tmp_path):
    """loss=opcd as issue 13 defines it: the on-policy term alone (weight 1, reverse KL, every batch on-policy)."""
    loss = schema.check(compose_cfg("train", ["loss=opcd"], tmp_path), "train").loss
    assert (loss.sft.weight, loss.pg.weight, loss.kl.weight) == (0.0, 0.0, 1.0)
    assert loss.kl.kind == "reverse_kl" and loss.kl.on_policy is True and loss.kl.lmbda == 1.0
    assert tuple(loss.active_terms) == ("kl",)
    mixed = schema.check(compose_cfg("train", ["loss=genpi_kl", "loss.kl.on_policy=true", "loss.kl.lmbda=0.25"],
                                     tmp_path), "train").loss
    assert mixed.kl.on_policy is True and mixed.kl.lmbda == 0.25 and mixed.sft.weight > 0 and mixed.pg.weight > 0


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
def test_every_experiment_passes(tmp_path, option):
    spec = schema.check(compose_cfg("train", [f"experiment={option}"], tmp_path), "train")
    assert isinstance(spec.loss, schema.Loss)


@pytest.mark.parametrize("option", ["tiny", "tiny_agent", "llama3_8b", "qwen2_5_7b"])
def test_every_model_option_passes(tmp_path, option):
    spec = schema.check(compose_cfg("train", [f"model={option}"], tmp_path), "train")
    assert spec.model.name_or_path


def test_typed_fields_convert_and_keep_yaml_types(tmp_path):
    spec = schema.check(compose_cfg("train", ["optim.lr=1", "data.val_size=10", "resume=force"], tmp_path), "train")
    assert spec.optim.lr == 1.0 and isinstance(spec.optim.lr, float)
    assert spec.data.val_size == 10.0 and spec.resume == "force"
    assert schema.Loss.partial({"kl": {"weight": 1.0}}).active_terms == ("kl",)


# -- bad input: one line, exit 2, nothing written ------------------------------------------------------------------
def _records(n: int = 12) -> list[dict]:
    lines = (SAMPLES / "os.jsonl").read_text().splitlines()[:n]
    return [json.loads(x) for x in lines]


def _write(path: Path, records: list, transform=None) -> Path:
    rows = [transform(i, dict(r)) if transform else r for i, r in enumerate(records)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows if r is not None))
    return path


def _data_file(tmp_path: Path, kind: str) -> str:
    recs = _records()
    p = tmp_path / f"{kind}.jsonl"
    if kind == "missing_column":  # the 10th record lacks teacher_output_single
        _write(p, recs, lambda i, r: {k: v for k, v in r.items() if not (i == 9 and k == "teacher_output_single")})
    elif kind == "null_field":
        _write(p, recs, lambda i, r: {**r, "reason": None} if i == 4 else r)
    elif kind == "empty_answer":
        _write(p, recs, lambda i, r: {**r, "teacher_output_single": "  "} if i == 6 else r)
    elif kind == "array_line":
        _write(p, recs)
        p.write_text(p.read_text() + json.dumps(recs[:2]) + "\n")
    elif kind == "not_utf8":
        _write(p, recs)
        lines = p.read_bytes().split(b"\n")
        lines[4] = lines[4].replace(b"Linux", b"Lin\xff\xfeux", 1)
        p.write_bytes(b"\n".join(lines))
    elif kind == "binary":
        p.write_bytes(b"\x00\x01\x02binary\x00" * 20)
    elif kind == "bad_json":
        _write(p, recs)
        p.write_text(p.read_text() + "{not json\n")
    elif kind == "conv_type":
        _write(p, recs, lambda i, r: {**r, "teacher_output_conv": 5} if i == 2 else r)
    elif kind == "json_scalar":
        p = tmp_path / "scalar.json"
        p.write_text("42")
    elif kind == "missing":
        p = tmp_path / "no_such.jsonl"
    return str(p)


# (overrides, what the one line must name). {data:KIND} is replaced by a data file made by _data_file.
TRAIN_BAD = [
    (["optim.scheduler=cosin"], "optim.scheduler='cosin'"),
    (["loss.kl.teacher=foo"], "loss.kl.teacher='foo'"),
    (["loss.sft.weight=-0.7"], "loss.sft.weight=-0.7"),
    (["optim.lr=0"], "optim.lr=0"),
    (["data.max_records=0"], "data.max_records=0"),
    (["loss=genpi_kl", "loss.kl.kind=jsd", "loss.kl.beta=2"], "loss.kl.beta=2"),
    (["loss=genpi_kl", "loss.kl.temperature=0"], "loss.kl.temperature=0"),
    (["loss=genpi_kl", "loss.kl.kind=jsd", "loss.kl.beta=0"], "forward_kl"),
    (["loss=genpi_kl", "loss.kl.kind=jsd", "loss.kl.beta=1"], "reverse_kl"),
    (["loss.kl.kind=foo"], "loss.kl.kind='foo'"),
    (["loss.chunk_size=0"], "loss.chunk_size=0"),
    (["data.batch_size=0"], "data.batch_size=0"),
    (["data.batch_size=-4"], "data.batch_size=-4"),
    (["loss=kl", "loss.kl.weight=0"], "all 0"),
    (["loss=genpi_kl", "loss.kl.teacher=cached", "loss.kl.kind=reverse_kl"], "loss.kl.kind='reverse_kl'"),
    (["loss=genpi_kl", "loss.kl.teacher=cached", "loss.kl.temperature=2"], "loss.kl.temperature=2"),
    (["optim.warmup_ratio=1.5"], "optim.warmup_ratio=1.5"),
    (["optim.betas=[0.9]"], "optim.betas"),
    (["data.val_size=-0.1"], "data.val_size=-0.1"),
    (["data.val_size=2.5"], "data.val_size=2.5"),
    (["data.eval_batch_size=0"], "data.eval_batch_size=0"),
    (["model.lora.r=0"], "model.lora.r=0"),
    (["model.lora.dropout=1.0"], "model.lora.dropout=1"),
    (["model.dtype=float64"], "model.dtype='float64'"),
    (["loss=genpi_kl", "model.lora.enabled=false"], "model.lora.enabled=true"),
    (["resume=maybe"], "resume='maybe'"),
    (["optimized_metric=test/kl"], "optimized_metric='test/kl'"),
    (["optimized_metric=eval/gap_closed/kl_forward", "post_eval=true"], "test split"),
    (["loss=pg", "loss.w_prompt.enabled=true"], "loss.sft.weight=0"),
    (["loss=w_prompt", "loss.w_prompt.drop_prob=1.5"], "loss.w_prompt.drop_prob=1.5"),
    (["data.limits.input_tokens=0"], "data.limits.input_tokens=0"),
    (["model.tiny.num_attention_heads=3"], "model.tiny.num_attention_heads=3"),
    (["loss.sft.source=both"], "loss.sft.source='both'"),
    (["data.num_workers=-1"], "data.num_workers=-1"),
    (["seed=abc"], "seed='abc'"),
    (["trainer.max_epochs=1", "data.group_by_length=maybe"], "data.group_by_length='maybe'"),
    (["data.path={data:missing}"], "dataset not found"),
    (["data.path={data:missing_column}"], "missing_column.jsonl:10"),
    (["data.path={data:null_field}"], "null_field.jsonl:5"),
    (["data.path={data:empty_answer}"], "empty_answer.jsonl:7"),
    (["data.path={data:array_line}"], "array_line.jsonl:13"),
    (["data.path={data:not_utf8}"], "not_utf8.jsonl:5"),
    (["data.path={data:binary}"], "binary"),
    (["data.path={data:bad_json}"], "bad_json.jsonl:13"),
    (["data.path={data:conv_type}"], "conv_type.jsonl:3"),
    (["data.path={data:json_scalar}"], "scalar.json"),
    (["task=webshop", f"data.path={SAMPLES / 'os.jsonl'}"], "another prompt"),
    # on-policy distillation (issue 13)
    (["loss=opcd", "loss.kl.lmbda=1.5"], "loss.kl.lmbda=1.5"),
    (["loss=opcd", "loss.kl.lmbda=-0.1"], "loss.kl.lmbda=-0.1"),
    (["loss=opcd", "loss.kl.teacher=cached"], "loss.kl.teacher='cached'"),
    (["loss=opcd", "loss.kl.sampling.temperature=-1"], "loss.kl.sampling.temperature=-1"),
    (["loss=opcd", "loss.kl.sampling.top_p=0"], "loss.kl.sampling.top_p=0"),
    (["loss=opcd", "loss.kl.sampling.max_new_tokens=0"], "loss.kl.sampling.max_new_tokens=0"),
    (["loss=genpi", "loss.kl.on_policy=true"], "loss.kl.weight=0"),
    (["loss=opcd", "loss.kl.on_policy=maybe"], "loss.kl.on_policy='maybe'"),
    (["loss=opcd", "model.lora.enabled=false"], "model.lora.enabled=true"),
    (["loss=opcd", "trainer=fsdp"], "FSDP"),
]


@pytest.mark.parametrize(("overrides", "names"), TRAIN_BAD, ids=[" ".join(o) for o, _ in TRAIN_BAD])
def test_bad_training_input_is_one_line_and_exit_2(capsys, tmp_path, overrides, names):
    from genpi.train import train

    overrides = [o.replace(o[o.index("{data:"):], _data_file(tmp_path, o[o.index("{data:") + 6:-1]))
                 if "{data:" in o else o for o in overrides]
    code, lines, err, run_dir = run_bad(capsys, tmp_path, "train", train, overrides)
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("genpi: error: "), err
    assert names in lines[0], lines[0]
    assert "Traceback" not in err
    written = {p.name for p in run_dir.rglob("*")} if run_dir.exists() else set()
    assert not written & {"metrics.json", "run.json", "splits.json", "adapter", "last.ckpt"}, written
    assert len(TRAIN_BAD) >= 30


OTHER_BAD = [
    ("eval", ["eval.kl_on=foo"], "eval.kl_on='foo'"),
    ("eval", ["eval.engine=tpu"], "eval.engine='tpu'"),
    ("eval", ["eval.batch_size=0"], "eval.batch_size=0"),
    ("eval", ["eval.split=train"], "eval.split='train'"),
    ("eval", ["eval.savings.prefix_caching=[]"], "eval.savings.prefix_caching"),
    ("synth", ["synth.client=grpc"], "synth.client='grpc'"),
    ("synth", ["synth.chunk_size=0"], "synth.chunk_size=0"),
    ("synth", ["synth.clients.openai.base_url=ftp://user:s3cr3t@host/v1"], "ftp://***@host/v1"),
    ("export", ["export.merged=false", "export.write_adapter=false"], "nothing to export"),
]


@pytest.mark.parametrize(("config", "overrides", "names"), OTHER_BAD,
                         ids=[f"{c}:{' '.join(o)}" for c, o, _ in OTHER_BAD])
def test_bad_eval_synth_export_input_is_one_line_and_exit_2(capsys, tmp_path, config, overrides, names):
    from genpi.evaluate import run_evaluation
    from genpi.export import export
    from genpi.synth import run_synthesis

    entry = {"eval": run_evaluation, "synth": run_synthesis, "export": export}[config]
    code, lines, err, _ = run_bad(capsys, tmp_path, config, entry, overrides)
    assert code == 2 and len(lines) == 1 and names in lines[0], err
    assert "s3cr3t" not in err and "Traceback" not in err


def test_check_names_a_missing_required_value():
    cfg = OmegaConf.create({"model": {"name_or_path": "???"}, "seed": 0})
    with pytest.raises(GenpiError, match="model.name_or_path is required"):
        schema.check(cfg, "export")
