"""The answer turn alone: given the reference first turn and the terminal's output, does a candidate copy the output
into answer(...)? On 48 answer questions of the heldout split (pool values; not genpi's problems), with the
observation as the os corpus writes it and with the final newline a terminal prints (as genpi's problems show it).
Results of earlier runs in OUT.json are kept (a candidate named again is replaced).
    python answer_turn.py OUT.json NAME=FOLDER [NAME=FOLDER ...]"""
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
slots = G.Slots(random.Random("validation"), "heldout")
records = [G.os_example_with_slots(slots)[0] for _ in range(200)]
records = [r for r in records if "answer(" in r["teacher_output_conv"][2]["content"]][:48]
for arg in sys.argv[2:]:
    name, folder = arg.split("=", 1)
    tok = AutoTokenizer.from_pretrained(folder)
    client = HFClient(LlamaForCausalLM.from_pretrained(folder).eval(), tok, batch_size=16)
    res[name] = {}
    for label, end in (("corpus", ""), ("terminal_newline", "\n")):
        chats = [task.teacher_messages(r["pseudo_input"]) + [
            r["teacher_output_conv"][0], {"role": "user", "content": r["teacher_output_conv"][1]["content"] + end}]
            for r in records]
        answers = client.chat(chats, Sampling(temperature=0.0, max_tokens=40))
        want = [r["teacher_output_conv"][2]["content"].split("Act:")[-1].strip() for r in records]
        res[name][label] = {"n": len(records), "answer_copied": sum(w in a for w, a in zip(want, answers)),
                            "examples": [{"output": r["teacher_output_conv"][1]["content"], "answer": a}
                                         for r, a in list(zip(records, answers))[:3]]}
        print(name, label, res[name][label]["answer_copied"], "of", len(records), flush=True)
    out_path.write_text(json.dumps(res, indent=1) + "\n")
