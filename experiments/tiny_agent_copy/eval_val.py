"""Validation proxies for tiny agent candidates: greedy answers, with the os prompt, to two sets of 48 os questions,
neither of them genpi's problems (the env split) nor any input a candidate was trained on:
  pools: the heldout split's pool values (common words such as /var/log, bash, report.txt, which the made-up-value
         corpora never use as values);
  fresh: made-up values drawn with a seed no candidate trained with (genpi.tasks.generators.fresh_value).
Per set: how often the reference command appears verbatim (exact_code), how often the question's directory is
carried into the answer (dir_copied, of the dir_inputs questions that name one), the format rate. Results of
earlier runs in OUT.json are kept (a candidate named again is replaced).
    python eval_val.py OUT.json NAME=FOLDER [NAME=FOLDER ...]"""
import json
import random
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from genpi.synthesis.clients.base import Sampling
from genpi.synthesis.clients.hf import HFClient
from genpi.tasks import generators as G
from genpi.tasks.base import builtin_task

torch.set_num_threads(1)
out_path = Path(sys.argv[1])
res = json.loads(out_path.read_text()) if out_path.is_file() else {}
task = builtin_task("os")
SETS = {"pools": G.Slots(random.Random("validation"), "heldout"),
        "fresh": G.Slots(random.Random("validation:fresh"), "pretrain", fresh=True)}
questions = {name: [G.os_example_with_slots(slots) for _ in range(48)] for name, slots in SETS.items()}
for arg in sys.argv[2:]:
    name, folder = arg.split("=", 1)
    tok = AutoTokenizer.from_pretrained(folder)
    model = LlamaForCausalLM.from_pretrained(folder).eval()
    client = HFClient(model, tok, batch_size=16)
    res[name] = {}
    for set_name, recs in questions.items():
        answers = client.chat([task.teacher_messages(r["pseudo_input"]) for r, _ in recs],
                              Sampling(temperature=0.0, max_tokens=96))
        with_dir = [i for i, (r, s) in enumerate(recs) if s["dir"] in r["pseudo_input"]]
        res[name][set_name] = {
            "n": len(recs), "exact_code": sum(s["code"] in a for (r, s), a in zip(recs, answers)),
            "format_with": sum(map(task.check_format, answers)), "dir_inputs": len(with_dir),
            "dir_copied": sum(recs[i][1]["dir"] in answers[i] for i in with_dir),
            "examples": [{"question": r["pseudo_input"], "reference": s["code"], "answer": a}
                         for (r, s), a in list(zip(recs, answers))[:3]]}
        print(name, set_name, {k: v for k, v in res[name][set_name].items() if k != "examples"}, flush=True)
    out_path.write_text(json.dumps(res, indent=1) + "\n")
