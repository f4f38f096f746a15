"""Probe: continue a candidate on genpi's made-up-value os corpus (genpi.tasks.generators.fresh_value) with its copy
drill mixed in (VOCAB_DRILL=1: also a drill over the tokenizer's alphabetic tokens), then write probe.json.
    python probe_continue.py STEPS OUT INIT VIEW_WEIGHTS   (env: LR, BS, VOCAB_DRILL)"""
import os
import random
import re
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
model = LlamaForCausalLM.from_pretrained(init_from, dtype=torch.float32)
tasks = {"os": TA._tasks()["os"]}
pre = TA.pretrain_config({"steps": steps, "examples_per_task": 4096, "view_weights": weights,
                          "lr": float(os.environ.get("LR", "1e-3")), "batch_size": int(os.environ.get("BS", "8"))})
t0 = time.time()
groups = TA.encode_corpus(tok, tasks, pre["examples_per_task"], 0, pre["max_tokens"], ["os"])
groups = {k: v for k, v in groups.items() if k[1] != "env"}
groups[("drill", "env")] = [encode_chat(tok, c, 1) for c in G.copy_drill(4096, 1)]
if os.environ.get("VOCAB_DRILL"):
    vocab = sorted({w for w in (tok.convert_tokens_to_string([t]).strip() for t in tok.get_vocab())
                    if re.fullmatch(r"[a-z]{2,}", w)})
    print("vocab words", len(vocab), flush=True)
    vr = random.Random(11)
    for _ in range(8192):
        vals = []
        for _ in range(vr.randint(2, 5)):
            w = "".join(vr.choice(vocab) for _ in range(vr.randint(1, 2)))
            vals.append(vr.choice(["{}", "{}", "/{}/{}", "{}.{}"]).format(w, vr.choice(vocab)))
        groups[("drill", "env")].append(encode_chat(tok, G.repeat_chat(vals), 1))
losses = TA._train(model, groups, pre, tok.pad_token_id, print)
save_and_probe(model, tok, tasks["os"], out, {"steps": steps, "init": Path(init_from).name, "weights": weights,
                                              "seconds": None}, t0, show=8)
