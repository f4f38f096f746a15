"""The LightningDataModule: seeded train/val/test split, per-loss tokenization, length-grouped batches."""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from genpi.data.records import duplicate_inputs, input_key, load_records
from genpi.data.tokenize import IGNORE, Limits, RecordEncoder, keep_prompt
from genpi.tasks.base import Task
from genpi.utils.errors import GenpiError

SPLITS = ("train", "val", "test")
log = logging.getLogger(__name__)


def check_prompt(records: list[dict[str, Any]], task: Task, source: str) -> None:
    """A dataset trains the prompt it was made for: records whose ``context`` (or, without one, ``context_id``)
    names another prompt than the task's are refused; records with neither are trained as the task's, said in the
    log."""
    want = " ".join(task.prompt_text.split())
    where = getattr(records, "where", None) or [f"{source}[{i}]" for i in range(len(records))]
    unlabelled = 0
    for rec, at in zip(records, where):
        context, context_id = rec.get("context"), rec.get("context_id")
        if context:
            if " ".join(str(context).split()) != want:
                raise GenpiError(f"{at}: the record was made for another prompt than task {task.name}'s "
                                 f"(context_id {context_id!r}, task prompt_id {task.prompt_id!r}): pick the task the "
                                 f"dataset was synthesized for (task=...), or a dataset of this task (data.path=...)")
        elif context_id not in (None, "") and str(context_id) != task.prompt_id:
            raise GenpiError(f"{at}: context_id {context_id!r} is not task {task.name}'s prompt ({task.prompt_id!r}): "
                             "pick the task the dataset was synthesized for, or a dataset of this task")
        else:
            unlabelled += 1
    if unlabelled:
        log.warning("%s: %d records name no prompt (no context, no context_id); they are trained as task %s's",
                    source, unlabelled, task.name)


def split_records(
    records: list[dict[str, Any]], val_size: float | int, test_size: float | int, seed: int
) -> dict[str, list[dict[str, Any]]]:
    """Split by distinct input (so duplicates never straddle splits), seeded and order-independent."""
    keys = sorted({input_key(r["pseudo_input"]) for r in records})
    random.Random(seed).shuffle(keys)

    def count(size: float | int) -> int:
        return int(size) if size >= 1 else int(round(size * len(keys)))

    n_test, n_val = count(test_size), count(val_size)
    if n_test + n_val >= len(keys):
        raise GenpiError(
            f"{len(keys)} distinct inputs cannot fill val ({n_val}) and test ({n_test}) splits and leave any to train; "
            "lower data.val_size / data.test_size or synthesize more"
        )
    where = {k: "test" for k in keys[:n_test]}
    where.update({k: "val" for k in keys[n_test : n_test + n_val]})
    out: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    for r in records:
        out[where.get(input_key(r["pseudo_input"]), "train")].append(r)
    return out


class EncodedDataset(Dataset):
    """Pre-tokenized examples: a dict per record with one entry per loss it serves."""

    def __init__(self, examples: list[dict[str, Any]]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, key: int | tuple[int, dict[str, int]]) -> dict[str, Any]:
        if isinstance(key, tuple):  # (index, token totals of its accumulation window), from TokenWindowSampler
            i, window = key
            return {**self.examples[i], "window": window}
        return self.examples[key]

    def lengths(self) -> list[int]:
        return [example_length(e) for e in self.examples]


def example_length(e: dict[str, Any]) -> int:
    n = 0
    for part in ("sft", "pg"):
        if part in e:
            n += len(e[part]["input_ids"])
    if "kl" in e:
        n += len(e["kl"]["student_input_ids"]) + len(e["kl"]["teacher_input_ids"])
    return n


class LengthGroupedBatchSampler(Sampler[list[int]]):
    """Batches of similar length (low padding) in a seeded random order, split over ranks.

    Global batches of ``batch_size * num_replicas`` are formed (indices shuffled, cut into mega-batches
    of ``mega`` global batches, sorted by length inside each); rank ``r`` takes slice ``r`` of every global
    batch. So DDP on N ranks with batch b sees the same global batches as one process with batch N*b,
    and every rank gets the same number of batches (DDP needs equal step counts). Under DDP a last, incomplete
    global batch is dropped in training (``pad_last=False``); in evaluation (``pad_last=True``) it is filled up
    with examples from the start, as ``DistributedSampler`` does, so a split smaller than one global batch is
    still evaluated (those few examples then count twice).
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int = 0, shuffle: bool = True,
                 group_by_length: bool = True, mega: int = 16, num_replicas: int = 1, rank: int = 0,
                 pad_last: bool = False):
        self.lengths = lengths
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.group = group_by_length
        self.mega = mega
        self.num_replicas = num_replicas
        self.rank = rank
        self.pad_last = pad_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_batches(self) -> list[list[int]]:
        idx = list(range(len(self.lengths)))
        rng = random.Random(self.seed + self.epoch)
        if self.shuffle:
            rng.shuffle(idx)
        size = self.batch_size * self.num_replicas
        if self.group:
            chunk = self.mega * size
            idx = [i for s in range(0, len(idx), chunk)
                   for i in sorted(idx[s : s + chunk], key=lambda i: -self.lengths[i])]
        batches = [idx[s : s + size] for s in range(0, len(idx), size)]
        if self.num_replicas > 1 and batches and len(batches[-1]) < size:  # every rank needs a full slice
            if self.pad_last:
                batches[-1] = (batches[-1] + idx * size)[:size]
            else:
                batches.pop()
        if self.shuffle and self.group:
            rng.shuffle(batches)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        # Lightning calls set_epoch before each epoch, so a resumed run replays the same order.
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        return iter([b[lo:hi] for b in self.global_batches()])

    def __len__(self) -> int:
        size = self.batch_size * self.num_replicas
        if self.num_replicas > 1 and not self.pad_last:
            return len(self.lengths) // size
        return math.ceil(len(self.lengths) / size)


def target_tokens(example: dict[str, Any]) -> dict[str, int]:
    """The tokens each loss term of one example averages over: labelled positions (sft, pg), answer tokens (kl)."""
    out = {}
    for part in ("sft", "pg"):
        if part in example:
            out[part] = sum(1 for t in example[part]["labels"][1:] if t != IGNORE)
    if "kl" in example:
        out["kl"] = int(example["kl"]["response_len"])
    return out


class TokenWindowSampler(Sampler[list[tuple[int, dict[str, int]]]]):
    """The batches of ``batch_sampler``, each index paired with the token totals of its accumulation window (the
    ``accumulate`` consecutive batches of one optimizer step), so that the training module can weight every
    micro-batch by its share of the window's tokens: the step's gradient is then the token mean over the whole
    window, as one batch of ``accumulate`` times the size would give, not a mean of per-batch means."""

    def __init__(self, batch_sampler: LengthGroupedBatchSampler, dataset: EncodedDataset, accumulate: int):
        self.batch_sampler = batch_sampler
        self.dataset = dataset
        self.accumulate = max(1, int(accumulate))

    def set_epoch(self, epoch: int) -> None:
        self.batch_sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self):
        batches = list(self.batch_sampler)
        for start in range(0, len(batches), self.accumulate):
            group = batches[start : start + self.accumulate]
            totals: dict[str, int] = {"accumulate": self.accumulate}
            for batch in group:
                for i in batch:
                    for term, n in target_tokens(self.dataset[i]).items():
                        totals[term] = totals.get(term, 0) + n
            for batch in group:
                yield [(i, totals) for i in batch]


def _pad(seqs: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    return torch.tensor([s + [value] * (width - len(s)) for s in seqs], dtype=torch.long)


def _mask(seqs: list[list[int]]) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    return torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], dtype=torch.long)


def _response_mask(seqs: list[list[int]], response_lens: list[int]) -> torch.Tensor:
    """True at positions whose logits predict a response token (right padding)."""
    width = max(len(s) for s in seqs)
    m = torch.zeros(len(seqs), width, dtype=torch.bool)
    for i, (s, n) in enumerate(zip(seqs, response_lens)):
        m[i, len(s) - n - 1 : len(s) - 1] = True
    return m


class Collator:
    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = {}
        for part in ("sft", "pg"):
            rows = [e[part] for e in examples if part in e]
            if rows:
                ids = [r["input_ids"] for r in rows]
                labels = [r["labels"][1:] + [IGNORE] for r in rows]  # shifted: labels[t] is the target of logits[t]
                batch[part] = {"input_ids": _pad(ids, self.pad_id), "attention_mask": _mask(ids),
                               "labels": _pad(labels, IGNORE)}
        rows = [e["kl"] for e in examples if "kl" in e]
        if rows:
            s_ids = [r["student_input_ids"] for r in rows]
            t_ids = [r["teacher_input_ids"] for r in rows]
            lens = [r["response_len"] for r in rows]
            kl = {
                "student_input_ids": _pad(s_ids, self.pad_id), "student_attention_mask": _mask(s_ids),
                "student_response_mask": _response_mask(s_ids, lens),
                "teacher_input_ids": _pad(t_ids, self.pad_id), "teacher_attention_mask": _mask(t_ids),
                "teacher_response_mask": _response_mask(t_ids, lens),
                "response_ids": torch.tensor([t for s, n in zip(s_ids, lens) for t in s[len(s) - n :]]),
            }
            if all("env_student" in r for r in rows):  # on-policy over several turns (loss.kl.sampling.turns)
                kl["env_student"] = [r["env_student"] for r in rows]
                kl["env_teacher"] = [r["env_teacher"] for r in rows]
            if all("teacher_topk_ids" in r for r in rows):
                kl["teacher_topk_ids"] = torch.tensor([row for r in rows for row in r["teacher_topk_ids"]])
                kl["teacher_topk_logprobs"] = torch.tensor([row for r in rows for row in r["teacher_topk_logprobs"]])
            batch["kl"] = kl
        if "window" in examples[0]:
            batch["window"] = dict(examples[0]["window"])
        return batch


class GenPIDataModule(pl.LightningDataModule):
    """Serves the records of one task, tokenized per loss.

    Args:
        task: the task whose prompt the teacher sees.
        tokenizer: the model's tokenizer (its chat template is used).
        path: a dataset folder or JSONL file; ``None`` uses the task's built-in sample data.
        losses: which training sequences to build, among ``sft``, ``pg``, ``kl`` (a loss with weight 0
            is not built); validation always builds ``kl`` so ``val/kl`` is always measured.
        w_prompt_drop_prob: with-prompt baseline: SFT inputs carry the prompt, dropped with this probability.
        kl_turns: agent turns the student samples on an on-policy batch (``loss.kl.sampling.turns``): above 1 the
            training KL examples also carry the environment's turns of their conversation
            (:meth:`RecordEncoder.kl_conversation`), added when the training loader is built.
    """

    def __init__(self, task: Task, tokenizer, path: str | None = None, losses: tuple[str, ...] = ("sft", "pg"),
                 batch_size: int = 8, eval_batch_size: int | None = None, val_size: float | int = 0.1,
                 test_size: float | int = 0.1, seed: int = 0, limits: dict | None = None, pg_reason: bool = True,
                 w_prompt_drop_prob: float | None = None, group_by_length: bool = True, max_records: int | None = None,
                 num_workers: int = 0, overfit: bool = False, sft_source: str = "conversation",
                 drop_duplicates: bool = False, kl_turns: int = 1):
        super().__init__()
        self.task = task
        self.tokenizer = tokenizer
        self.path = path
        self.losses = tuple(losses)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.val_size = val_size
        self.test_size = test_size
        self.seed = seed
        self.limits = Limits(**(limits or {}))
        self.pg_reason = pg_reason
        self.w_prompt_drop_prob = w_prompt_drop_prob
        self.group_by_length = group_by_length
        self.max_records = max_records
        self.num_workers = num_workers
        self.overfit = overfit
        self.sft_source = sft_source
        self.drop_duplicates = drop_duplicates
        self.kl_turns = int(kl_turns)
        self._conversation_turns: dict[str, int] = {}  # split -> the turns its KL examples carry env turns for
        self.duplicates = 0
        self.splits: dict[str, list[dict[str, Any]]] = {}
        self.datasets: dict[str, EncodedDataset] = {}
        self.encoder: RecordEncoder | None = None

    @property
    def source(self) -> Path:
        if self.path:
            return Path(self.path)
        sample = self.task.sample_data_path()
        if sample is None:
            raise GenpiError(f"task {self.task.name!r} has no built-in sample data: set data.path to a dataset")
        return sample

    def required_texts(self) -> tuple[str, ...]:
        """The columns whose text every record must have for the losses this run trains (and val/kl measures)."""
        need = {"pseudo_input", "teacher_output_single"}  # the input, and the answer val/kl is measured on
        if "sft" in self.losses:
            need.add("teacher_output_conv" if self.sft_source == "conversation" else "teacher_output_single")
        if "pg" in self.losses:
            need.update(("student_output_single", "teacher_output_single") + (("reason",) if self.pg_reason else ()))
        return tuple(sorted(need))

    def load(self) -> None:
        if self.splits:
            return
        records = load_records(self.source, nonempty=self.required_texts())
        check_prompt(records, self.task, str(self.source))
        dups = duplicate_inputs(records, input_key)
        self.duplicates = len(dups)
        if dups:
            log.info("%s: %d of %d records repeat an earlier record's input%s", self.source, len(dups), len(records),
                     " (dropped: data.drop_duplicates=true)" if self.drop_duplicates else "")
        if self.drop_duplicates and dups:
            gone = set(dups)
            records = [r for i, r in enumerate(records) if i not in gone]
        if self.max_records:
            records = records[: self.max_records]
        if self.overfit:
            # Train and validate on the same records: the debug=overfit sanity check.
            self.splits = {"train": records, "val": records, "test": []}
        else:
            self.splits = split_records(records, self.val_size, self.test_size, self.seed)

    def encode(self, records: list[dict[str, Any]], losses: tuple[str, ...]) -> EncodedDataset:
        assert self.encoder is not None
        self.encoder.report.total += len(records)
        examples = []
        for i, rec in enumerate(records):
            e: dict[str, Any] = {}
            if "sft" in losses:
                with_prompt = self.w_prompt_drop_prob is not None and keep_prompt(self.seed, i, self.w_prompt_drop_prob)
                e["sft"] = self.encoder.sft(rec, with_prompt=with_prompt)
            if "pg" in losses:
                e["pg"] = self.encoder.pg(rec)
            if "kl" in losses:
                e["kl"] = self.encoder.kl(rec)
            examples.append(e)
        return EncodedDataset(examples)

    def add_conversations(self, split: str, turns: int) -> None:
        """Give the KL examples of ``split`` the environment's turns between their first ``turns`` agent turns
        (built once per split; on-policy sampling reads them from the batch)."""
        if turns <= 1 or self._conversation_turns.get(split, 1) >= turns:
            return
        assert self.encoder is not None
        counts = self.encoder.report.counts
        before = counts["kl_conversation"]
        for rec, e in zip(self.splits[split], self.datasets[split].examples):
            if "kl" in e:
                e["kl"].update(self.encoder.kl_conversation(rec, turns))
        self._conversation_turns[split] = turns
        if counts["kl_conversation"] > before:
            log.warning("%s: the environment's turns of %d %s conversations stop early (their total reaches "
                        "data.limits.conversation_tokens)", self.source, counts["kl_conversation"] - before, split)

    def setup(self, stage: str | None = None) -> None:
        self.load()
        if self.encoder is None:
            self.encoder = RecordEncoder(self.tokenizer, self.task, self.limits, pg_reason=self.pg_reason,
                                         sft_source=self.sft_source)
        if "train" not in self.datasets:
            self.datasets["train"] = self.encode(self.splits["train"], self.losses)
            self.datasets["val"] = self.encode(self.splits["val"], tuple(sorted(set(self.losses) | {"kl"})))
            self.encoder.report.log(f"data from {self.source}")

    def check_topk_tokenizer(self) -> None:
        """Stored top-k ids index the vocabulary of the tokenizer that made them: the data card's tokenizer must
        be this model's. A dataset without a card (or an older card) cannot be checked: said in the log."""
        from genpi.data.tokenize import tokenizer_fingerprint

        src = self.source
        card_path = (src if src.is_dir() else src.parent) / "card.json"
        made_with = None
        if card_path.is_file():
            made_with = json.loads(card_path.read_text()).get("teacher_topk_tokenizer")
        if made_with is None:
            log.warning("%s: no data card names the tokenizer of the stored top-k ids; trusting they are this "
                        "model's", src)
            return
        mine = tokenizer_fingerprint(self.tokenizer)
        if made_with != mine:
            raise GenpiError(f"the teacher top-k ids in {src} come from another tokenizer (card {made_with}, this "
                             f"model's {mine}): rerun the synth teacher_logits stage with this model, or set "
                             "loss.kl.teacher=online")

    def data_report(self) -> dict[str, Any]:
        """What metrics.json records about the data: its source, duplicates and whether they were dropped."""
        self.load()
        return {"data/source": str(self.source), "data/duplicates": self.duplicates,
                "data/duplicates_dropped": self.duplicates if self.drop_duplicates else 0}

    def truncation_counts(self) -> dict[str, int]:
        return self.encoder.report.as_dict() if self.encoder else {}

    def _world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return trainer.world_size, trainer.global_rank
        return 1, 0

    def _loader(self, split: str, batch_size: int, shuffle: bool, accumulate: int | None = None) -> DataLoader:
        ds = self.datasets[split]
        world, rank = self._world()
        sampler = LengthGroupedBatchSampler(ds.lengths(), batch_size, seed=self.seed, shuffle=shuffle,
                                            group_by_length=self.group_by_length, num_replicas=world, rank=rank,
                                            pad_last=not shuffle)
        if accumulate is not None:
            sampler = TokenWindowSampler(sampler, ds, accumulate)
        return DataLoader(ds, batch_sampler=sampler, collate_fn=Collator(self.tokenizer.pad_token_id),
                          num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        trainer = getattr(self, "trainer", None)
        accumulate = int(trainer.accumulate_grad_batches) if trainer is not None else 1
        self.add_conversations("train", self.kl_turns)
        return self._loader("train", self.batch_size, shuffle=True, accumulate=accumulate)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.eval_batch_size, shuffle=False)

    def padding_ratio(self, split: str = "train") -> float:
        """Share of padded positions over one epoch of batches, all sequences of each example counted."""
        ds = self.datasets[split]
        sampler = LengthGroupedBatchSampler(ds.lengths(), self.batch_size, seed=self.seed, shuffle=True,
                                            group_by_length=self.group_by_length)
        real = padded = 0
        for batch in sampler.global_batches():
            for key in ("sft", "pg"):
                lens = [len(ds[i][key]["input_ids"]) for i in batch if key in ds[i]]
                if lens:
                    real, padded = real + sum(lens), padded + max(lens) * len(lens)
            for key in ("student_input_ids", "teacher_input_ids"):
                lens = [len(ds[i]["kl"][key]) for i in batch if "kl" in ds[i]]
                if lens:
                    real, padded = real + sum(lens), padded + max(lens) * len(lens)
        return 1 - real / padded if padded else 0.0

    def split_keys(self) -> dict[str, list[str]]:
        """Input keys per split (saved in the run folder so evaluation can refuse overlapping inputs)."""
        self.load()
        return {s: sorted({input_key(r["pseudo_input"]) for r in rs}) for s, rs in self.splits.items()}
