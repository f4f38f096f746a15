"""Probe: can the tiny architecture learn to carry the question's slots into its commands? Trains on the os task's
teacher and student views (made-up syllable values with mode fresh*, pool values with mode pools; a copy drill mixed
in with mode *drill*), then writes probe.json.
    python probe_corpus.py MODE STEPS OUT [INIT [VIEW_WEIGHTS]]   (env: EXAMPLES, LR, BS)"""
import os
import random
import sys
import time
from pathlib import Path

import torch
from proxy import POOL_NAMES, save_and_probe, syllable_value
from transformers import AutoTokenizer, LlamaForCausalLM

from genpi.data.tokenize import encode_chat
from genpi.models import tiny_agent as TA
from genpi.models.tiny import build_tiny
from genpi.tasks import generators as G

mode, steps, out = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
init_from = sys.argv[4] if len(sys.argv) > 4 else None
orig_pick = G.Slots.pick
POOLS = {id(getattr(G, n)): n for n in POOL_NAMES}


def pick(self, pool):
    if self.split == "pretrain" and mode.startswith("fresh") and id(pool) in POOLS:
        return syllable_value(self.rng, POOLS[id(pool)])
    return orig_pick(self, pool)


G.Slots.pick = pick
torch.set_num_threads(1)
torch.set_flush_denormal(True)
torch.manual_seed(0)
base = build_tiny(None)
tok = AutoTokenizer.from_pretrained(str(base))
model = LlamaForCausalLM.from_pretrained(str(init_from or base), dtype=torch.float32)
tasks = {"os": TA._tasks()["os"]}
pre = TA.pretrain_config({"steps": steps, "examples_per_task": int(os.environ.get("EXAMPLES", "4096")),
                          "view_weights": "3,1,0", "lr": float(os.environ.get("LR", "3e-3")),
                          "batch_size": int(os.environ.get("BS", "8"))})
t0 = time.time()
groups = TA.encode_corpus(tok, tasks, pre["examples_per_task"], 0, pre["max_tokens"])
groups = {k: v for k, v in groups.items() if k[1] != "env"}
pre["view_weights"] = sys.argv[5] if len(sys.argv) > 5 else "3,1,0"
if "drill" in mode:
    drng = random.Random(7)
    groups[("drill", "env")] = [
        encode_chat(tok, G.repeat_chat([syllable_value(drng, drng.choice(POOL_NAMES))
                                        for _ in range(drng.randint(2, 5))]), 1) for _ in range(4096)]
print("corpus", {k: len(v) for k, v in groups.items()}, time.time() - t0, flush=True)
losses = TA._train(model, groups, pre, tok.pad_token_id, print)
save_and_probe(model, tok, tasks["os"], out, {"mode": mode, "steps": steps, "seconds": None,
                                              "loss_last": losses[-8:]}, t0, show=6)
