"""Probe: continue a candidate on the os corpus whose made-up values are made of the vocabulary's pieces
(the builder's fresh_values=pieces: genpi.tasks.generators.fresh_value with tiny_agent.vocab_pieces) and whose
observations end in a newline as a terminal prints them (the builder's terminal_newline), with a copy drill of such
values mixed in, then write probe.json.
    python probe_pieces.py STEPS OUT INIT VIEW_WEIGHTS   (env: LR, BS)"""
import os
import sys
import time
from pathlib import Path

import torch
from proxy import save_and_probe
from transformers import AutoTokenizer, LlamaForCausalLM

from genpi.data.tokenize import encode_chat
from genpi.models import tiny_agent as TA
from genpi.models.tiny import build_tiny
from genpi.tasks import generators as G

steps, out, init_from, weights = int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
torch.set_num_threads(1)
torch.set_flush_denormal(True)
torch.manual_seed(0)
tok = AutoTokenizer.from_pretrained(str(build_tiny(None)))
pieces = TA.vocab_pieces(tok)
model = LlamaForCausalLM.from_pretrained(init_from, dtype=torch.float32)
tasks = {"os": TA._tasks()["os"]}
pre = TA.pretrain_config({"steps": steps, "examples_per_task": 4096, "view_weights": weights,
                          "lr": float(os.environ.get("LR", "1e-3")), "batch_size": int(os.environ.get("BS", "8"))})
t0 = time.time()
# a seed per chunk, so that a continued candidate meets new inputs
seed = sum(map(ord, out.name))
groups = TA.encode_corpus(tok, tasks, pre["examples_per_task"], seed, pre["max_tokens"], ["os"], pieces,
                          terminal_newline=True)
groups = {k: v for k, v in groups.items() if k[1] != "env"}
groups[("drill", "env")] = [encode_chat(tok, c, 1) for c in G.copy_drill(8192, seed, pieces)]
print("pieces", len(pieces), {k: len(v) for k, v in groups.items()}, flush=True)
TA._train(model, groups, pre, tok.pad_token_id, print)
save_and_probe(model, tok, tasks["os"], out, {"steps": steps, "init": Path(init_from).name, "weights": weights,
                                              "seconds": None}, t0, show=4)
