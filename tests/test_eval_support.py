"""Shared by the evaluation, export and report tests: one tiny trained run per test session.

Each test module asks for it through a module fixture; the run is built once in the session's base
temporary folder and reused by the next module (training takes a while on two cores).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.helpers import compose_cfg

# A short KL-only run with a high learning rate: the adapter moves far enough from zero that the student
# differs from the floor, which the equality tests need to mean anything.
TRAIN_OVERRIDES = ["loss=kl", "trainer.max_steps=3", "trainer.max_epochs=1", "data.max_records=40",
                   "data.batch_size=4", "optim.lr=2e-2", "validate_before_fit=false", "logger=csv"]
# A fast evaluation: transformers, short answers, one timing round.
FAST_EVAL = ["eval.engine=hf", "eval.max_new_tokens=12", "eval.savings.new_tokens=4", "eval.savings.requests=1",
             "eval.savings.repeats=1"]


def trained_run(tmp_path_factory) -> Path:
    """The run folder of a tiny GenPI run (adapter, checkpoint, csv, splits), built on first use."""
    root = tmp_path_factory.getbasetemp() / "genpi-eval-trained"
    done = root / "run_dir.txt"
    if done.is_file():
        return Path(done.read_text().strip())
    from genpi.train import train

    cfg = compose_cfg("train", TRAIN_OVERRIDES, root)
    out = train(cfg)
    run_dir = Path(out["run_dir"])
    assert (run_dir / "adapter" / "adapter_config.json").is_file()
    assert json.loads((run_dir / "splits.json").read_text())["test"], "the tiny run needs a test split"
    done.write_text(str(run_dir))
    return run_dir


def compose_eval(tmp_path: Path, overrides: list[str]):
    import genpi.evaluate  # noqa: F401  (registers the genpi_eval_name resolver)

    return compose_cfg("eval", overrides, tmp_path)


def greedy_reference(run_dir: Path, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy answers of the trained model as training left it: base + the run's adapter, in transformers."""
    from peft import PeftModel

    from genpi.evaluation.generation import hf_generate
    from genpi.models.factory import load_model, load_tokenizer
    from genpi.synthesis.clients.base import end_of_turn_ids

    tok = load_tokenizer({"name_or_path": "tiny"})
    model = PeftModel.from_pretrained(load_model({"name_or_path": "tiny"}, for_training=False),
                                      str(run_dir / "adapter")).eval()
    return hf_generate(model, prompts, max_new_tokens, end_of_turn_ids(tok), tok.pad_token_id)


def eval_prompts(n: int = 3) -> tuple[list[list[int]], list[list[int]]]:
    """Teacher and student token ids for ``n`` os inputs."""
    from omegaconf import OmegaConf

    from genpi.data.tokenize import student_prefix_ids, teacher_prefix_ids
    from genpi.models.factory import load_tokenizer
    from genpi.tasks import build_task
    from tests.helpers import CONF

    task = build_task(**OmegaConf.to_container(OmegaConf.load(CONF / "task" / "os.yaml"), resolve=True))
    tok = load_tokenizer({"name_or_path": "tiny"})
    xs = ["How many files are in /etc?", "Delete every .tmp file under /var/tmp.", "Who is logged in right now?"][:n]
    return [teacher_prefix_ids(tok, task, x) for x in xs], [student_prefix_ids(tok, task, x) for x in xs]


def assert_adapter_moved(run_dir: Path) -> None:
    from safetensors.torch import load_file

    weights = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    assert any("lora_B" in k and torch.count_nonzero(v) > 0 for k, v in weights.items())
