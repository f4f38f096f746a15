"""Probe: can the tiny architecture learn to carry the question's slots into its commands?"""
import json, random, sys, time, string
from pathlib import Path
import torch
from genpi.tasks import generators as G
from genpi.models import tiny_agent as TA
from genpi.models.tiny import build_tiny

mode, steps, out = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
init_from = sys.argv[4] if len(sys.argv) > 4 else None
ENV_VALUES = {v for vs in G.ENV_SLOT_VALUES.values() for v in vs}
CONS, VOW = "bcdfghjklmnprstvwz", "aeiou"

def word(rng, lo=2, hi=3):
    return "".join(rng.choice(CONS) + rng.choice(VOW) + (rng.choice(CONS) if rng.random() < .4 else "")
                   for _ in range(rng.randint(lo, hi)))

def fresh(rng, name):
    while True:
        if name == "DIRS":
            top = rng.choice(["var", "opt", "srv", "home/" + word(rng, 1, 2), "data", "usr/local", word(rng, 1, 2)])
            v = f"/{top}/{word(rng)}"
            if rng.random() < .3:
                v += "/" + word(rng, 1, 2)
        elif name == "EXTS":
            v = word(rng, 1, 1)[:rng.randint(2, 4)]
        elif name == "SHELLS":
            v = rng.choice(["/bin/", "/usr/bin/", "/usr/sbin/"]) + word(rng, 1, 2)
        elif name == "PROCS":
            v = word(rng, 1, 3) + rng.choice(["", "", "d", "-server", "3"])
        else:  # WORDS USERS FILES
            v = word(rng, 1, 3)
        if v not in ENV_VALUES:
            return v

orig_pick = G.Slots.pick
POOLS = {id(getattr(G, n)): n for n in ("DIRS", "EXTS", "WORDS", "USERS", "PROCS", "FILES", "SHELLS")}
def pick(self, pool):
    if self.split == "pretrain" and mode.startswith("fresh") and id(pool) in POOLS:
        return fresh(self.rng, POOLS[id(pool)])
    return orig_pick(self, pool)
G.Slots.pick = pick

from transformers import AutoTokenizer, LlamaForCausalLM
torch.set_num_threads(1); torch.set_flush_denormal(True); torch.manual_seed(0)
base = build_tiny(None)
tok = AutoTokenizer.from_pretrained(str(base))
model = LlamaForCausalLM.from_pretrained(str(init_from or base), dtype=torch.float32)
tasks = {"os": TA._tasks()["os"]}
import os
pre = TA.pretrain_config({"steps": steps, "examples_per_task": int(os.environ.get("EXAMPLES", "4096")), "view_weights": "3,1,0",
                          "lr": float(os.environ.get("LR", "3e-3")), "batch_size": int(os.environ.get("BS", "8"))})
t0 = time.time()
groups = TA.encode_corpus(tok, tasks, pre["examples_per_task"], 0, pre["max_tokens"])
groups = {k: v for k, v in groups.items() if k[1] != "env"}
pre["view_weights"] = sys.argv[5] if len(sys.argv) > 5 else "3,1,0"
if "drill" in mode:
    from genpi.data.tokenize import encode_chat
    drng = random.Random(7); seqs = []
    for _ in range(4096):
        vals = [fresh(drng, drng.choice(list(POOLS.values()))) for _ in range(drng.randint(2, 5))]
        msgs = [{"role": "user", "content": "Repeat these exactly: " + " ".join(vals)},
                {"role": "assistant", "content": " ".join(vals)}]
        ids, lab = encode_chat(tok, msgs, 1); seqs.append((ids, lab))
    groups[("drill", "env")] = seqs
print("corpus", {k: len(v) for k, v in groups.items()}, time.time() - t0, flush=True)
losses = TA._train(model, groups, pre, tok.pad_token_id, print)
from proxy import save_and_probe
save_and_probe(model, tok, tasks["os"], out, {"mode": mode, "steps": steps, "seconds": None,
                                              "loss_last": losses[-8:]}, t0, show=6)
