"""The shipped tiny_agent weights: used when their record matches the request and their SHA-256 is right, else
the model is pre-trained here (which these tests stop before it starts)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from genpi.models import tiny_agent
from genpi.models.tiny import arch_config

pytestmark = pytest.mark.skipif(not tiny_agent.ARTIFACT_RECORD.is_file(), reason="no shipped tiny_agent weights")


class PretrainingStarted(Exception):
    pass


@pytest.fixture
def no_pretraining(monkeypatch):
    def refuse(*_args, **_kwargs):
        raise PretrainingStarted

    monkeypatch.setattr(tiny_agent, "_pretrain_into", refuse)


def test_the_record_describes_the_shipped_file():
    record = json.loads(tiny_agent.ARTIFACT_RECORD.read_text())
    assert hashlib.sha256(tiny_agent.ARTIFACT_WEIGHTS.read_bytes()).hexdigest() == record["weights_sha256"]
    assert record["arch"] == arch_config(None) and tiny_agent.recipe(record["pretrain"]) == tiny_agent.recipe(
        tiny_agent.pretrain_config(None))
    rates = record["format_rates"]  # the prompt changes what the model does, on every task
    assert set(rates) == {"kg", "m2w", "os", "webshop"}
    assert all(r["with_prompt"] >= r["without_prompt"] + 0.4 for r in rates.values()), rates
    assert rates["os"]["with_prompt"] >= 0.9  # the agent whose commands genpi's OS problems judge


def test_the_default_tiny_agent_comes_from_the_shipped_weights(tmp_path, no_pretraining):
    folder = tiny_agent.build_tiny_agent({}, cache=tmp_path, log=None)
    record = json.loads(tiny_agent.ARTIFACT_RECORD.read_text())
    assert folder.name == f"tiny_agent-w{record['weights_sha256'][:12]}"
    assert hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest() == record["weights_sha256"]
    assert tiny_agent.read_card(folder)["source"] == "shipped"
    assert tiny_agent.agent_folder({}, cache=tmp_path) == folder

    # a cached copy altered afterwards is noticed at load and rebuilt from the shipped file
    (folder / "model.safetensors").write_bytes(b"not the weights")
    again = tiny_agent.build_tiny_agent({}, cache=tmp_path, log=None)
    assert hashlib.sha256((again / "model.safetensors").read_bytes()).hexdigest() == record["weights_sha256"]


def test_weights_that_do_not_match_their_record_are_not_used(tmp_path, monkeypatch, no_pretraining):
    fake = tmp_path / "artifacts"
    shutil.copytree(tiny_agent.ARTIFACT_DIR, fake)
    data = bytearray((fake / "tiny_agent.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (fake / "tiny_agent.safetensors").write_bytes(bytes(data))
    monkeypatch.setattr(tiny_agent, "ARTIFACT_WEIGHTS", fake / "tiny_agent.safetensors")
    messages: list[str] = []
    with pytest.raises(PretrainingStarted):
        tiny_agent.build_tiny_agent({}, cache=tmp_path / "cache", log=messages.append)
    assert any("SHA-256" in m for m in messages), messages


def test_other_pretraining_settings_are_pretrained_here(tmp_path, no_pretraining):
    messages: list[str] = []
    with pytest.raises(PretrainingStarted):
        tiny_agent.build_tiny_agent({"tiny_agent": {"steps": 7}}, cache=tmp_path, log=messages.append)
    assert any("differ from the settings the shipped weights were trained with" in m for m in messages), messages
    assert not list(Path(tmp_path, "models").glob("tiny_agent-w*"))
