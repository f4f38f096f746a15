"""``model=tiny_agent``: the built-in tiny Llama, pre-trained here once so that the tasks' prompts change what it does.

A randomly initialized model proves that the machinery runs, not that a prompt gets internalized. This one is
pre-trained (every weight, a few minutes on a CPU) on a corpus genpi makes from its four tasks
(:mod:`genpi.tasks.generators`, the ``pretrain`` split of the template slots), in three views per input:

- ``teacher``: the task's prompt and the input, then the agent's conversation in the task's format (OS:
  Think/Act with one action; WebShop: search[...] / click[...]; Mind2Web: a choice letter and its action; KG:
  a tool call), the environment's replies in between;
- ``student``: the input alone, then a plain answer in another style (prose, no actions);
- ``env``: the task's environment persona, then the agent's turns, answered as the environment would (so the
  model can play both sides of role swapping).

So with the prompt it follows the format and without it it rarely does; GenPI then has something to move into
the adapter. Slot values belong to one split each, so pre-training, GenPI training (``heldout`` slots) and the
sample data (``train`` slots) never share an input.

The folder, ``cache_dir()/models/tiny_agent-<hash>``, is built on first use and reused after: the hash covers
the tiny base model (architecture and tokenizer corpus), the pre-training settings, the tasks (prompts,
templates, personas), the generators' source, :data:`BUILDER_VERSION` and the library versions. Pre-training is
seeded and runs on a fixed number of threads (``pretrain.threads``), so the same versions on the same kind of CPU
give the same bytes; ``genpi_tiny_agent.json`` in the folder records the weights' SHA-256, the training losses and
the measured format rates with and without the prompt on held-out inputs.

Training reads each long prompt once per batch: a batch holds sequences of one task and one view, whose common
token prefix (the prompt, the persona) is run once and its keys/values expanded over the batch, gradients
flowing back through the expansion. That makes a batch of 8 cost about one prompt plus 8 short tails.

Why a plain PyTorch loop (:func:`_train`) and not Lightning, and why here in ``models/``: the loop is the recipe
that made the shipped weights (a seeded batch order, one task and view per step; AdamW, a warm-up + cosine
``LambdaLR``, gradient norm clipped at 1.0; one thread), and ``weights_sha256`` in their record is what a rebuild is
checked against. Lightning's automatic optimization performs the same operations, so a port should be able to
reproduce those bytes, but only a full 36-minute single-thread rebuild would show it, and the port would add little
this one-off build uses (no logging or devices): it is not done. Longer recipes (hours on one thread) need to
survive a kill: :class:`Checkpoints` saves the loop's whole state every two minutes and a rebuild resumes it to the
same weights. The model factory builds
it on first use, as it builds ``tiny``, so it lives beside ``tiny``; it imports :mod:`genpi.tasks` only inside
functions, and nothing in ``genpi.tasks`` imports ``genpi.models``, so there is no import circle.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from genpi.models.tiny import _content_hash as _tiny_content_hash
from genpi.models.tiny import _lib_version, arch_config, build_once, build_tiny, corpus, is_built, with_overrides
from genpi.utils.errors import GenpiError
from genpi.utils.paths import cache_dir

BUILDER_VERSION = "tiny-agent-v1"
MARKER = "genpi_tiny_agent.json"
VIEWS = ("teacher", "student", "env")

DEFAULT_PRETRAIN: dict[str, Any] = {
    "examples_per_task": 4096,  # distinct pre-training inputs per task (template slots of the pretrain split)
    "steps": 11400,             # optimizer steps; each takes one batch of one (task, view)
    "batch_size": 8,            # sequences per step
    "lr": 1.0e-3,               # AdamW peak learning rate (cosine decay after warm-up)
    "warmup_steps": 48,
    "weight_decay": 0.0,
    "max_tokens": 1536,         # longest training sequence (prompt included); longer ones are cut
    "view_weights": "3,1,1",    # how often a step takes the teacher, student and env view (comma list)
    "seed": 0,                  # data order and sampling seed
    "threads": 1,               # torch threads while pre-training: fixed, so that builds are reproducible (1: no thread
                                # synchronization, which a busy machine makes very slow)
    "eval_inputs": 16,          # held-out inputs per task for the reported format rates
    "eval_max_tokens": 96,      # greedy answer length for those rates
    # The four-task recipe (experiments/tiny_agent_copy/four_task.json, chosen on the copying probes' validation sets):
    # the first shipped weights had fresh_slots "", copy_steps 0, fresh_values words, terminal_newline False,
    # task_weights "", copy_mix 0, 384 examples per task, 2,400 steps at lr 3e-3 and view_weights 2,1,1.
    "fresh_slots": "os",        # tasks (comma list; only os has such slots) whose pre-training inputs take made-up slot
                                # values, so that a command can be right only by carrying the question's values into it
    "copy_steps": 1500,         # steps of a copy drill (repeat made-up words) before the corpus; 0 = none
    "copy_batch_size": 32,      # sequences per copy-drill step (short ones: no prompt)
    "copy_lr": 1.0e-3,          # the copy drill's peak learning rate
    "fresh_values": "pieces",   # what made-up values (fresh_slots, the drills) are made of: words (half made-up
                                # syllables, half the prompts' words) | pieces (1-3 alphabetic tokens of the
                                # vocabulary, drawn uniformly, so that any word they spell may be a value; an
                                # extension is a piece's first letters)
    "terminal_newline": True,   # os observations end in a newline, as a terminal prints them and genpi's problems
                                # show them (the corpus's do not; the env's answer turns then copy worse)
    "task_weights": "os:4",     # how many times a task's views come in a cycle of steps ("os:3"; unnamed tasks 1)
    "copy_mix": 3,              # drill steps in every cycle of the corpus's (task, view) steps, so that copying is
                                # not forgotten while the corpus trains (0 = none; every copying probe needed it)
}
_FLOAT_KEYS = {"lr", "weight_decay", "copy_lr"}
FRESH_TASKS = ("os",)  # tasks whose generators have made-up slot values (genpi.tasks.generators.fresh_value)
FRESH_VALUES = ("words", "pieces")  # fresh_value without / with the vocabulary's pieces


def recipe(pretrain: dict[str, Any]) -> dict[str, Any]:
    """The settings that make a build: ``pretrain`` without the later settings that are off (no made-up slots; no
    copy drill, whose batch size and learning rate then mean nothing; no drill in the corpus). Equal recipes give
    equal weights."""
    out = dict(pretrain)
    if not out.get("fresh_slots"):
        out.pop("fresh_slots", None)
    if not out.get("copy_mix"):
        out.pop("copy_mix", None)
    if not out.get("task_weights"):
        out.pop("task_weights", None)
    if not out.get("terminal_newline"):
        out.pop("terminal_newline", None)
    if out.get("fresh_values") == "words" or not (out.get("fresh_slots") or out.get("copy_steps") or out.get("copy_mix")):
        out.pop("fresh_values", None)  # the default, or no made-up values to make
    if not out.get("copy_steps"):
        for key in ("copy_steps", "copy_batch_size", "copy_lr"):
            out.pop(key, None)
    return out


def _flag(value: Any) -> bool:
    """true/false from a config or a command line (``true``, ``1``, ``yes``; ``false``, ``0``, ``no``)."""
    text = str(value).strip(" '\"").lower()
    if text not in ("true", "1", "yes", "false", "0", "no"):
        raise ValueError(value)
    return text in ("true", "1", "yes")


def _task_weights(value: Any) -> str:
    """A ``{task: weight}`` mapping from a config, or ``"os:3,kg:2"`` from a command line, as ``"kg:2,os:3"``."""
    if isinstance(value, dict) or hasattr(value, "items"):
        pairs = [(str(k), v) for k, v in value.items()]
    elif isinstance(value, (list, tuple)) or type(value).__name__ == "ListConfig":  # [os:3, kg:2] from a config
        pairs = [str(part).replace(" ", "").split(":", 1) for part in value]
    else:
        pairs = [part.split(":", 1) for part in str(value).strip("{}[]() '\"").replace(" ", "").split(",") if part]
    from genpi.tasks.base import TASK_NAMES

    out = {}
    for pair in pairs:
        if len(pair) != 2 or pair[0] not in TASK_NAMES or not str(pair[1]).isdigit() or int(pair[1]) < 1:
            raise GenpiError(f"model.tiny_agent.task_weights={value!r}: give task:weight pairs of the tasks "
                             f"{list(TASK_NAMES)} with whole weights >= 1, e.g. os:3")
        out[pair[0]] = int(pair[1])
    return ",".join(f"{k}:{v}" for k, v in sorted(out.items()) if v != 1)


def pretrain_config(overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """:data:`DEFAULT_PRETRAIN` with ``overrides`` (``model.tiny_agent``; null values ignored)."""
    def weights(value: Any) -> str:
        return ",".join(str(int(w)) for w in str(value).strip("[]() ").split(","))

    def tasks(value: Any) -> str:  # "os", "os,kg", "[os]" or a list from a config
        parts = value if isinstance(value, (list, tuple)) else str(value or "").strip("[]() ").split(",")
        return ",".join(str(t).strip(" '\"") for t in parts if str(t).strip(" '\""))

    out = with_overrides(DEFAULT_PRETRAIN, overrides, "model.tiny_agent", _FLOAT_KEYS,
                         {"view_weights": weights, "fresh_slots": tasks, "task_weights": _task_weights,
                          "terminal_newline": _flag,
                          "fresh_values": lambda v: str(v).strip(" '\"")})
    unknown = [t for t in out["fresh_slots"].split(",") if t and t not in FRESH_TASKS]
    if unknown:
        raise GenpiError(f"model.tiny_agent.fresh_slots={out['fresh_slots']!r}: only {', '.join(FRESH_TASKS)} can take "
                         f"made-up slot values, not {', '.join(unknown)}")
    if out["copy_steps"] < 0 or (out["copy_steps"] and out["copy_batch_size"] < 1):
        raise GenpiError(f"model.tiny_agent.copy_steps={out['copy_steps']} / copy_batch_size={out['copy_batch_size']}: "
                         "give copy_steps >= 0 and copy_batch_size >= 1")
    if out["fresh_values"] not in FRESH_VALUES:
        raise GenpiError(f"model.tiny_agent.fresh_values={out['fresh_values']!r}: choose one of {list(FRESH_VALUES)}")
    if out["copy_mix"] < 0:
        raise GenpiError(f"model.tiny_agent.copy_mix={out['copy_mix']}: give a whole number of drill steps per "
                         "cycle >= 0 (0 = no drill in the corpus)")
    per_view = [int(w) for w in out["view_weights"].split(",")]
    if len(per_view) != len(VIEWS) or min(per_view) < 0 or not sum(per_view):
        raise GenpiError(f"model.tiny_agent.view_weights={out['view_weights']!r}: give {len(VIEWS)} non-negative "
                         f"whole numbers for the views {list(VIEWS)}, e.g. 2,1,1")
    if out["steps"] < 1 or out["batch_size"] < 1 or out["examples_per_task"] < out["batch_size"]:
        raise GenpiError(f"model.tiny_agent needs steps >= 1 and examples_per_task >= batch_size >= 1, got {out}")
    return out


def _tasks() -> dict[str, Any]:
    from genpi.tasks.base import TASK_NAMES, builtin_task

    return {name: builtin_task(name) for name in TASK_NAMES}


def agent_hash(arch: dict[str, Any], pretrain: dict[str, Any], tasks: dict[str, Any] | None = None) -> str:
    """The 12-hex-digit content hash naming a tiny_agent build, computed without building anything."""
    from genpi.tasks import generators

    tasks = tasks if tasks is not None else _tasks()
    task_parts = [[t.prompt_turns, t.student_template, t.teacher_template, t.env_persona, t.end_token]
                  for _, t in sorted(tasks.items())]
    versions = {lib: _lib_version(lib) for lib in ("torch", "transformers", "tokenizers", "safetensors")}
    blob = json.dumps([BUILDER_VERSION, _tiny_content_hash(arch, corpus()), recipe(pretrain), task_parts,
                       hashlib.sha256(Path(generators.__file__).read_bytes()).hexdigest(), versions], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def agent_folder(model_cfg: dict[str, Any] | None = None, cache: Path | None = None) -> Path:
    """Where the tiny_agent of ``model_cfg`` (its ``tiny`` and ``tiny_agent`` keys) is or would be: the shipped
    weights' folder (``tiny_agent-w<sha>``) when :func:`shipped_weights` applies, else a local pre-training's
    (``tiny_agent-<content hash>``). Builds at most the tiny base (seconds) to compare tokenizers."""
    cfg = dict(model_cfg or {})
    arch, pretrain = arch_config(cfg.get("tiny")), pretrain_config(cfg.get("tiny_agent"))
    root = (Path(cache).expanduser() if cache else cache_dir()) / "models"
    record, _why = shipped_weights(arch, pretrain, build_tiny(cfg.get("tiny"), cache))
    if record is not None:
        return root / f"tiny_agent-w{record['weights_sha256'][:12]}"
    return root / f"tiny_agent-{agent_hash(arch, pretrain)}"


# -- the shipped weights ----------------------------------------------------------------------------
# Pre-training took 2.5 hours with 1 thread of a 2-core CPU (the record's `seconds`), far too long for a first
# `make demo`. The weights it produced are
# therefore shipped in the package (7 MB), with a record of what made them; `python -m genpi.models.tiny_agent build
# --write-artifact` (`make tiny-agent`) reproduces them. They are used only when the record matches the requested
# architecture and pre-training settings and the tokenizer built here is byte-identical to the one they were trained
# with; their SHA-256 is checked on every load. Otherwise the model is pre-trained here as before.

ARTIFACT_DIR = Path(__file__).resolve().parent / "artifacts"
ARTIFACT_WEIGHTS = ARTIFACT_DIR / "tiny_agent.safetensors"
ARTIFACT_RECORD = ARTIFACT_DIR / "tiny_agent.json"


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tokenizer_sha256(model_folder: Path) -> str:
    """The SHA-256 of a model folder's ``tokenizer.json``: what the shipped weights' token ids mean."""
    return _sha256(Path(model_folder) / "tokenizer.json")


def shipped_weights(arch: dict[str, Any], pretrain: dict[str, Any], base: Path) -> tuple[dict[str, Any] | None, str]:
    """The shipped weights' record if they apply to this request, else ``(None, why not)``."""
    if not ARTIFACT_RECORD.is_file() or not ARTIFACT_WEIGHTS.is_file():
        return None, f"no shipped weights in {ARTIFACT_DIR}"
    record = json.loads(ARTIFACT_RECORD.read_text())
    if record.get("builder") != BUILDER_VERSION:
        return None, f"the shipped weights are of builder {record.get('builder')}, this is {BUILDER_VERSION}"
    if record.get("arch") != arch or recipe(record.get("pretrain") or {}) != recipe(pretrain):
        return None, "model.tiny / model.tiny_agent differ from the settings the shipped weights were trained with"
    if record.get("tokenizer_sha256") != tokenizer_sha256(base):
        return None, "the tokenizer built here differs from the one the shipped weights were trained with"
    return record, ""


def _assemble_shipped(tmp: Path, base: Path, record: dict[str, Any]) -> None:
    """A tiny_agent folder from the base's config and tokenizer files and the shipped weights."""
    import shutil

    for f in base.iterdir():
        if f.name not in ("model.safetensors", "genpi_tiny.json"):
            shutil.copy2(f, tmp / f.name)
    shutil.copy2(ARTIFACT_WEIGHTS, tmp / "model.safetensors")
    if _sha256(tmp / "model.safetensors") != record["weights_sha256"]:
        raise GenpiError(f"{ARTIFACT_WEIGHTS} changed while it was copied: retry")
    (tmp / MARKER).write_text(json.dumps({**record, "name": tmp.name, "source": "shipped"}, indent=2) + "\n")


def build_tiny_agent(model_cfg: dict[str, Any] | None = None, cache: Path | None = None,
                     log: Callable[[str], None] | None = print, use_shipped: bool = True) -> Path:
    """The tiny_agent folder (weights, tokenizer, generation config, ``genpi_tiny_agent.json``): the shipped
    weights when they apply (SHA-256 checked), else pre-trained here on first use (the default recipe: 2.5 hours on
    one thread; a second process waits for the first instead of training too)."""
    cfg = dict(model_cfg or {})
    arch, pretrain = arch_config(cfg.get("tiny")), pretrain_config(cfg.get("tiny_agent"))
    say = log or (lambda _msg: None)
    base = build_tiny(cfg.get("tiny"), cache)
    root = (Path(cache).expanduser() if cache else cache_dir()) / "models"
    record, why = shipped_weights(arch, pretrain, base) if use_shipped else (None, "use_shipped=False")
    if record is not None:
        if _sha256(ARTIFACT_WEIGHTS) != record["weights_sha256"]:
            record, why = None, f"{ARTIFACT_WEIGHTS.name} does not match the SHA-256 in {ARTIFACT_RECORD.name}"
    if record is not None:
        folder = root / f"tiny_agent-w{record['weights_sha256'][:12]}"
        if is_built(folder, MARKER) and _sha256(folder / "model.safetensors") == record["weights_sha256"]:
            return folder
        if is_built(folder, MARKER):  # the cached copy was altered: rebuild it from the shipped file
            import shutil

            shutil.rmtree(folder, ignore_errors=True)
        return build_once(folder, lambda tmp: _assemble_shipped(tmp, base, record), marker=MARKER, lock=True)
    folder = root / f"tiny_agent-{agent_hash(arch, pretrain)}"
    if is_built(folder, MARKER):
        return folder
    drill = f" after a {pretrain['copy_steps']}-step copy drill" if pretrain["copy_steps"] else ""
    say(f"genpi: pre-training the tiny_agent model here ({why}): {pretrain['steps']} steps{drill} (the default "
        f"recipe's 11,400 took 2.5 hours on one thread), once; it is cached at {folder}")
    resume = root / f".{folder.name}.resume"  # _pretrain_into says when it resumes from there
    built = build_once(folder, lambda tmp: _pretrain_into(tmp, base, arch, pretrain, folder.name, say, resume),
                       marker=MARKER, lock=True)
    Checkpoints(resume).clear()  # only once the build is in place: a kill before that resumes again
    return built


def write_artifact(model_cfg: dict[str, Any] | None = None, cache: Path | None = None,
                   log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Pre-train here (never the shipped weights) and write the result as the shipped artifact and its record."""
    import shutil

    cfg = dict(model_cfg or {})
    folder = build_tiny_agent(cfg, cache, log, use_shipped=False)
    card = read_card(folder)
    base = build_tiny(cfg.get("tiny"), cache)
    ARTIFACT_DIR.mkdir(parents=True, exist_ok=True)
    shutil.copy2(folder / "model.safetensors", ARTIFACT_WEIGHTS)
    record = {key: card[key] for key in ("builder", "arch", "pretrain", "weights_sha256", "seconds", "loss_first",
                                         "loss_last", "format_rates", "parameters")}
    record["tokenizer_sha256"] = tokenizer_sha256(base)
    record["versions"] = {lib: _lib_version(lib) for lib in ("torch", "transformers", "tokenizers", "safetensors")}
    ARTIFACT_RECORD.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return record


# -- the corpus ----------------------------------------------------------------------------------

def view_messages(task, example: dict[str, Any], view: str) -> tuple[list[dict[str, str]], int]:
    """The chat of one view of a generated example, and the index of its first trained (assistant) turn."""
    x, conv = example["pseudo_input"], example["teacher_output_conv"]
    if view == "teacher":
        head = task.teacher_messages(x)
        return head + conv, len(head)
    if view == "student":
        head = task.student_messages(x)
        return head + [{"role": "assistant", "content": example["student_output_single"]}], len(head)
    if view == "env":
        return task.env_messages(x, conv), 1
    raise ValueError(f"unknown view {view!r}; choose one of {VIEWS}")


def encode_corpus(tokenizer, tasks: dict[str, Any], examples_per_task: int, seed: int, max_tokens: int,
                  fresh: tuple[str, ...] | list[str] = (), pieces: tuple[str, ...] | None = None,
                  terminal_newline: bool = False) -> dict[tuple[str, str], list[tuple[list[int], list[int]]]]:
    """``(task, view) -> [(ids, labels)]`` over the pretrain split's examples (made-up slot values for the tasks
    in ``fresh``, of ``pieces`` if given; os observations ending in a newline with ``terminal_newline``)."""
    from genpi.data.tokenize import encode_chat
    from genpi.tasks.generators import generate_examples

    groups: dict[tuple[str, str], list[tuple[list[int], list[int]]]] = {}
    for name, task in sorted(tasks.items()):
        examples = generate_examples(name, examples_per_task, seed=seed, split="pretrain", fresh=name in fresh,
                                     pieces=pieces, terminal_newline=terminal_newline)
        for view in VIEWS:
            seqs = []
            for ex in examples:
                ids, labels = encode_chat(tokenizer, *view_messages(task, ex, view))
                seqs.append((ids[:max_tokens], labels[:max_tokens]))
            groups[(name, view)] = seqs
    return groups


def shared_prefix_loss(model, batch: list[tuple[list[int], list[int]]], pad_id: int, min_prefix: int = 16):
    """Mean token cross-entropy of a batch of ``(ids, labels)``, a prefix shared by every sequence run once
    (:mod:`genpi.models.prefix`). Returns ``(loss, n_label_tokens)``."""
    import torch

    from genpi.models.prefix import IGNORE, common_prefix_length, shared_prefix_hidden

    seqs, labels = [s for s, _ in batch], [lab for _, lab in batch]
    width = max(len(s) for s in seqs)
    ids = torch.tensor([s + [pad_id] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    # targets[:, t] is the token that position t predicts
    targets = torch.tensor([lab[1:] + [IGNORE] * (width - len(lab) + 1) for lab in labels])
    p = common_prefix_length(ids, mask, targets)
    if p < min_prefix:
        p = 0
        hidden = model.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    else:
        hidden = shared_prefix_hidden(model.get_decoder(), model.config, ids, mask, p)
    keep = targets[:, p:] != IGNORE
    logits = model.get_output_embeddings()(hidden[keep])
    return torch.nn.functional.cross_entropy(logits.float(), targets[:, p:][keep]), int(keep.sum())


def _schedule(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


class Checkpoints:
    """Resumable pre-training: every ``EVERY_S`` seconds of training, the stage in progress (model, optimizer,
    schedule, batch order and random states, losses so far) is saved atomically to ``folder/state.pt``; a build of
    the same name started after a kill reads it and goes on from that step, giving the same weights as a build that
    was never stopped (same versions and CPU). The folder, ``.<build name>.resume`` beside the build, is removed once
    the build is in place. A state saved by another build (``identity``: the name, the recipe and this file's
    SHA-256) or one that does not load is set aside with a message, and pre-training starts over. ``folder=None``:
    no checkpoints."""

    FILE = "state.pt"
    EVERY_S = 120.0

    def __init__(self, folder: Path | None, identity: dict[str, Any] | None = None,
                 say: Callable[[str], None] = lambda _msg: None):
        self.folder = Path(folder) if folder is not None else None
        self.identity = identity or {}  # what made the state: a state of another identity is not resumed
        self.say = say
        self.done: list[float] = []      # losses of the stages already finished
        self.seconds_before = 0.0        # training time of the runs before this one
        self.started = time.perf_counter()
        self._last = time.perf_counter()

    def load(self) -> dict[str, Any] | None:
        import torch

        if self.folder is None or not (self.folder / self.FILE).is_file():
            return None
        try:
            state = torch.load(self.folder / self.FILE, map_location="cpu", weights_only=True)
        except Exception as exc:  # a truncated or foreign file: start over rather than fail every rebuild
            self.say(f"genpi: the checkpoint {self.folder / self.FILE} does not load ({type(exc).__name__}): "
                     "pre-training starts over")
            return None
        if "identity" in state and state["identity"] != self.identity:
            differ = sorted(k for k in {**state["identity"], **self.identity}
                            if state["identity"].get(k) != self.identity.get(k))
            self.say(f"genpi: the checkpoint in {self.folder} was saved by another build ({', '.join(differ)} "
                     "differ): pre-training starts over")
            return None
        self.done, self.seconds_before = list(state["done"]), float(state["seconds"])
        return state

    def seconds(self) -> float:
        return self.seconds_before + time.perf_counter() - self.started

    def due(self) -> bool:
        return self.folder is not None and time.perf_counter() - self._last >= self.EVERY_S

    def save(self, stage: str, step: int, model, opt=None, sched=None, rng=None, order=None,
             losses: list[float] | None = None) -> None:
        import os

        import torch

        if self.folder is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        state = {"identity": self.identity, "stage": stage, "step": step, "model": model.state_dict(),
                 "losses": list(losses or []),
                 "done": list(self.done), "seconds": self.seconds(), "torch_rng": torch.get_rng_state(),
                 "opt": opt.state_dict() if opt is not None else None,
                 "sched": sched.state_dict() if sched is not None else None,
                 "rng": rng.getstate() if rng is not None else None,
                 "order": [[list(key), idx] for key, idx in order.items()] if order is not None else None}
        part = self.folder / f"{self.FILE}.part"
        torch.save(state, part)
        os.replace(part, self.folder / self.FILE)
        self._last = time.perf_counter()

    def clear(self) -> None:
        import shutil

        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


def _pretrain_into(tmp: Path, base: Path, arch: dict[str, Any], pretrain: dict[str, Any], name: str,
                   say: Callable[[str], None], resume: Path | None = None) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    threads = torch.get_num_threads()
    torch.set_num_threads(int(pretrain["threads"]))
    # Tiny gradients late in training turn into denormal floats, which x86 CPUs process many times slower.
    torch.set_flush_denormal(True)
    try:
        torch.manual_seed(int(pretrain["seed"]))
        tokenizer = AutoTokenizer.from_pretrained(str(base))
        model = LlamaForCausalLM.from_pretrained(str(base), dtype=torch.float32)
        tasks = _tasks()
        # the build's name covers the recipe, the tasks, the generators and the versions; the state also records the
        # training code that made it
        ckpt = Checkpoints(resume, identity={"name": name, "recipe": json.dumps(recipe(pretrain), sort_keys=True),
                                             "builder": _sha256(Path(__file__))}, say=say)
        state = ckpt.load()
        if state is not None:
            say(f"genpi: tiny_agent resumes at {state['stage']} step {state['step']} "
                f"({ckpt.seconds_before:.0f} s of training before)")
        pieces = vocab_pieces(tokenizer) if pretrain["fresh_values"] == "pieces" else None
        if pretrain["copy_steps"] and (state is None or state["stage"] == "drill"):
            ckpt.done = ckpt.done + _copy_drill(model, tokenizer, pretrain, say, pieces, ckpt=ckpt, resume=state)
            state = None
            ckpt.save("corpus", 0, model)  # the drill's end: a kill from here on does not repeat it
        groups = encode_corpus(tokenizer, tasks, int(pretrain["examples_per_task"]), int(pretrain["seed"]),
                               int(pretrain["max_tokens"]), [t for t in pretrain["fresh_slots"].split(",") if t],
                               pieces, bool(pretrain["terminal_newline"]))
        if pretrain["copy_mix"]:
            groups[DRILL_KEY] = _drill_group(tokenizer, groups, pretrain, pieces)
        losses = ckpt.done + _train(model, groups, pretrain, tokenizer.pad_token_id, say, ckpt=ckpt, stage="corpus",
                                    resume=state)
        seconds = ckpt.seconds()
        model.eval()
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        rates = format_rates(model, tokenizer, tasks, int(pretrain["eval_inputs"]), int(pretrain["eval_max_tokens"]))
    finally:
        torch.set_num_threads(threads)
        torch.set_flush_denormal(False)
    weights = hashlib.sha256((tmp / "model.safetensors").read_bytes()).hexdigest()
    say("genpi: tiny_agent format rates on held-out inputs: " + ", ".join(
        f"{t} {r['with_prompt']:.0%} with the prompt / {r['without_prompt']:.0%} without" for t, r in rates.items()))
    (tmp / MARKER).write_text(json.dumps({
        "builder": BUILDER_VERSION, "name": name, "arch": arch, "pretrain": pretrain, "base": base.name,
        "weights_sha256": weights, "seconds": round(seconds, 1), "loss_first": losses[:12], "loss_last": losses[-12:],
        "format_rates": rates, "parameters": sum(p.numel() for p in model.parameters()),
    }, indent=2) + "\n")


DRILL_KEY = ("copy", "drill")  # the drill's group in the corpus stage (copy_mix > 0)


def _cycle(groups, pretrain: dict[str, Any]) -> list[tuple[str, str]]:
    """One cycle of the steps' groups: every task, each view as often as its weight; the drill ``copy_mix`` times."""
    weights = dict(zip(VIEWS, (int(w) for w in pretrain["view_weights"].split(","))))
    weights[DRILL_KEY[1]] = int(pretrain.get("copy_mix") or 0)
    per_task = task_weights(pretrain.get("task_weights") or "")
    return [(task, view) for task, view in sorted(groups)
            for _ in range(weights[view] * (1 if view == DRILL_KEY[1] else per_task.get(task, 1)))]


def task_weights(value: str) -> dict[str, int]:
    """``"os:3,kg:2"`` -> ``{"os": 3, "kg": 2}`` (tasks not named weigh 1)."""
    return {task: int(weight) for task, weight in (part.split(":") for part in value.split(",") if part)}


def vocab_pieces(tokenizer) -> tuple[str, ...]:
    """The vocabulary's alphabetic tokens (lowercase a-z, the word-start marker dropped): the pieces of made-up values
    with ``fresh_values=pieces``."""
    import re

    spelled = (tokenizer.convert_tokens_to_string([t]).strip() for t in tokenizer.get_vocab())
    return tuple(sorted({w for w in spelled if re.fullmatch(r"[a-z]+", w)}))


def _drill_group(tokenizer, groups, pretrain: dict[str, Any], pieces: tuple[str, ...] | None = None
                 ) -> list[tuple[list[int], list[int]]]:
    """The drill chats of the corpus stage, of a seed the drill stage does not use: as many as its steps take when
    they are spread evenly over the cycles (the drill comes first in a cycle, so a run that ends within one can take
    up to ``copy_mix`` steps more, which reuse chats). Kept so, as builds were made with it."""
    from genpi.data.tokenize import encode_chat
    from genpi.tasks.generators import copy_drill

    cycle = _cycle({**groups, DRILL_KEY: []}, pretrain)
    steps = -(-int(pretrain["steps"]) * cycle.count(DRILL_KEY) // len(cycle))
    chats = copy_drill(steps * int(pretrain["batch_size"]), int(pretrain["seed"]) + 1, pieces)
    return [encode_chat(tokenizer, chat, 1) for chat in chats]


def _copy_drill(model, tokenizer, pretrain: dict[str, Any], say: Callable[[str], None],
                pieces: tuple[str, ...] | None = None, ckpt: Checkpoints | None = None,
                resume: dict[str, Any] | None = None) -> list[float]:
    """The first stage when ``copy_steps`` > 0: the assistant repeats made-up words the user gave
    (:func:`genpi.tasks.generators.copy_drill`), every chat seen once. From the task corpus alone the tiny model
    did not learn to copy in 2,400 steps; after a drill, with the drill mixed into the corpus, it copies values like
    the drilled ones (``experiments/tiny_agent_copy/``, which also shows what it does not yet do)."""
    from genpi.data.tokenize import encode_chat
    from genpi.tasks.generators import copy_drill

    steps, bs = int(pretrain["copy_steps"]), int(pretrain["copy_batch_size"])
    chats = copy_drill(steps * bs, int(pretrain["seed"]), pieces)
    group = [encode_chat(tokenizer, chat, 1) for chat in chats]
    stage = {**pretrain, "steps": steps, "batch_size": bs, "lr": pretrain["copy_lr"], "view_weights": "1,0,0"}
    say(f"genpi: tiny_agent copy drill, {steps} steps of {bs}")
    return _train(model, {("copy", "teacher"): group}, stage, tokenizer.pad_token_id, say, ckpt=ckpt, stage="drill",
                  resume=resume)


def _train(model, groups: dict[tuple[str, str], list[tuple[list[int], list[int]]]], pretrain: dict[str, Any],
           pad_id: int, say: Callable[[str], None], ckpt: Checkpoints | None = None, stage: str = "corpus",
           resume: dict[str, Any] | None = None) -> list[float]:
    """Full-weight pre-training; steps cycle over (task, view) groups, each view as often as its weight. With
    ``ckpt``, the state is saved when due; ``resume`` (a saved state of this ``stage``) goes on from its step."""
    import torch

    rng = random.Random(int(pretrain["seed"]))
    order: dict[tuple[str, str], list[int]] = {key: [] for key in groups}
    keys = _cycle(groups, pretrain)
    bs, total = int(pretrain["batch_size"]), int(pretrain["steps"])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=float(pretrain["lr"]), weight_decay=float(pretrain["weight_decay"]),
                            betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, total, int(pretrain["warmup_steps"])))
    model.train()
    losses: list[float] = []
    start = 0
    if resume is not None:  # the model's weights always; the rest unless saved at the stage's first step
        model.load_state_dict(resume["model"])
        torch.set_rng_state(resume["torch_rng"])
        start, losses = int(resume["step"]), list(resume["losses"])
        if resume["opt"] is not None:
            opt.load_state_dict(resume["opt"])
            sched.load_state_dict(resume["sched"])
            rng.setstate(resume["rng"])
            order = {tuple(key): list(idx) for key, idx in resume["order"]}
    t0 = time.perf_counter()
    for step in range(start, total):
        key = keys[step % len(keys)]
        if len(order[key]) < bs:
            more = list(range(len(groups[key])))
            rng.shuffle(more)
            order[key] += more
        batch = [groups[key][i] for i in order[key][:bs]]
        order[key] = order[key][bs:]
        loss, _ = shared_prefix_loss(model, batch, pad_id)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(round(loss.item(), 4))
        if (step + 1) % max(1, total // 8) == 0 or step + 1 == total:
            recent = losses[-len(keys):]
            say(f"genpi: tiny_agent step {step + 1}/{total}, loss {sum(recent) / len(recent):.3f}, "
                f"{time.perf_counter() - t0:.0f} s")
        if ckpt is not None and step + 1 < total and ckpt.due():
            ckpt.save(stage, step + 1, model, opt, sched, rng, order, losses)
    return losses


# -- what the prompt does -------------------------------------------------------------------------

def format_rates(model, tokenizer, tasks: dict[str, Any], n_inputs: int, max_tokens: int,
                 split: str = "heldout", seed: int = 1) -> dict[str, dict[str, float]]:
    """Share of greedy answers that pass the task's format check, with and without the prompt, per task, on
    ``n_inputs`` inputs of ``split`` (never the pretrain split's)."""
    from genpi.synthesis.clients.base import Sampling
    from genpi.synthesis.clients.hf import HFClient
    from genpi.tasks.generators import generate_examples

    client = HFClient(model, tokenizer, batch_size=16)
    sampling = Sampling(temperature=0.0, max_tokens=max_tokens)
    out: dict[str, dict[str, float]] = {}
    for name, task in sorted(tasks.items()):
        inputs = [e["pseudo_input"] for e in generate_examples(name, n_inputs, seed=seed, split=split)]
        with_p = client.chat([task.teacher_messages(x) for x in inputs], sampling)
        without = client.chat([task.student_messages(x) for x in inputs], sampling)
        out[name] = {"with_prompt": sum(map(task.check_format, with_p)) / len(inputs),
                     "without_prompt": sum(map(task.check_format, without)) / len(inputs), "inputs": len(inputs)}
    return out


def read_card(folder: Path) -> dict[str, Any]:
    """The build record (``genpi_tiny_agent.json``) of a tiny_agent folder."""
    return json.loads((Path(folder) / MARKER).read_text())


def main(argv: list[str] | None = None) -> None:
    """``python -m genpi.models.tiny_agent build [--write-artifact]``: build (or reuse) the model; with
    ``--write-artifact``, pre-train here and replace the shipped weights and their record."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m genpi.models.tiny_agent", description=main.__doc__)
    ap.add_argument("command", choices=["build"])
    ap.add_argument("--write-artifact", action="store_true",
                    help="pre-train here and write genpi/models/artifacts/tiny_agent.{safetensors,json}")
    args = ap.parse_args(argv)
    if args.write_artifact:
        record = write_artifact()
        print(f"wrote {ARTIFACT_WEIGHTS} (sha256 {record['weights_sha256']}) and {ARTIFACT_RECORD}")
        print(json.dumps(record["format_rates"], indent=1))
    else:
        print(build_tiny_agent())


if __name__ == "__main__":
    main()
