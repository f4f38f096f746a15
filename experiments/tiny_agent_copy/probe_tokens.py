"""Probe: made-up values built from RANDOM tokens of the whole vocabulary. Every os slot value (and every copy-drill
value) is of its pool's shape (as genpi.tasks.generators.fresh_value), its words each 1-3 alphabetic tokens of the
tokenizer drawn uniformly (so any real word, itself a concatenation of vocabulary pieces, is in the values'
distribution), never a value of a pool or of the env split (generators._taken()).
    python probe_tokens.py drill STEPS OUT                 copy drill from the random tiny base (batch 32, lr 1e-3)
    python probe_tokens.py corpus STEPS OUT INIT WEIGHTS   os corpus of such values + their drill as the env view
                                                           (env: LR 1e-3, BS 8, EXAMPLES 8192, SEED 0: the corpus seed)"""
import os
import random
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

mode, steps, out = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
torch.set_num_threads(1)
torch.set_flush_denormal(True)
torch.manual_seed(0)
base = build_tiny(None)
tok = AutoTokenizer.from_pretrained(str(base))
VOCAB = TA.vocab_pieces(tok)  # the builder's pieces: the same 2,130 tokens, in the same order


def token_value(rng: random.Random, pool_name: str, pieces=None) -> str:
    """A value for the os slot pool ``pool_name`` of fresh_value's shapes, its words 1-3 random vocabulary tokens;
    never in generators._taken(). (``pieces``, fresh_value's argument, is ignored: always VOCAB.)"""
    taken = G._taken()

    def word() -> str:
        return "".join(rng.choice(VOCAB) for _ in range(rng.randint(1, 3)))

    while True:
        if pool_name == "DIRS":
            top = rng.choice(["var", "opt", "srv", "data", "usr/local", "home/" + word(), word()])
            value = f"/{top}/{word()}" + (f"/{word()}" if rng.random() < 0.3 else "")
        elif pool_name == "EXTS":
            value = word()[:rng.randint(2, 5)]
        elif pool_name == "SHELLS":
            value = rng.choice(["/bin/", "/usr/bin/", "/usr/sbin/"]) + word()
        elif pool_name == "PROCS":
            value = word() + rng.choice(["", "", "d", "-server", "3"])
        else:  # WORDS, USERS, FILES
            value = word()
        if value not in taken:
            return value


G.fresh_value = token_value  # Slots.pick and copy_drill look fresh_value up in generators' globals at call time
lr = float(os.environ.get("LR", "1e-3"))
t0 = time.time()
if mode == "drill":
    model = LlamaForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    drng = random.Random(7)
    names = sorted(G.ENV_SLOT_VALUES)
    seqs = [encode_chat(tok, G.repeat_chat([token_value(drng, drng.choice(names)) for _ in range(drng.randint(2, 5))]),
                        1) for _ in range(20000)]
    print("vocab words", len(VOCAB), "len", sum(len(s[0]) for s in seqs[:100]) / 100, flush=True)
    print("example", tok.decode(seqs[0][0]), flush=True)
    pre = TA.pretrain_config({"steps": steps, "batch_size": int(os.environ.get("BS", "32")), "examples_per_task": 20000,
                              "lr": lr, "warmup_steps": 50, "view_weights": "1,0,0"})
    losses = TA._train(model, {("drill", "teacher"): seqs}, pre, tok.pad_token_id, print)
    print("final", sum(losses[-50:]) / 50, "seconds", round(time.time() - t0), "s/step", (time.time() - t0) / steps)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
elif mode == "corpus":
    init_from, weights, seed = sys.argv[4], sys.argv[5], int(os.environ.get("SEED", "0"))
    model = LlamaForCausalLM.from_pretrained(init_from, dtype=torch.float32)
    tasks = {"os": TA._tasks()["os"]}
    pre = TA.pretrain_config({"steps": steps, "examples_per_task": int(os.environ.get("EXAMPLES", "8192")),
                              "view_weights": weights, "lr": lr, "batch_size": int(os.environ.get("BS", "8"))})
    groups = TA.encode_corpus(tok, tasks, pre["examples_per_task"], seed, pre["max_tokens"], ["os"])
    groups = {k: v for k, v in groups.items() if k[1] != "env"}
    groups[("drill", "env")] = [encode_chat(tok, c, 1) for c in G.copy_drill(4096, 100 + seed)]
    example = G.generate_examples("os", 1, seed=seed, split="pretrain", fresh=True)[0]["pseudo_input"]
    print("corpus", {k: len(v) for k, v in groups.items()}, "example:", example, round(time.time() - t0), flush=True)
    t1 = time.time()
    losses = TA._train(model, groups, pre, tok.pad_token_id, print)
    print("s/step", round((time.time() - t1) / steps, 3), flush=True)
    save_and_probe(model, tok, tasks["os"], out, {"steps": steps, "init": Path(init_from).name, "weights": weights,
                                                  "seed": seed, "seconds": None, "loss_last": losses[-8:]}, t0, show=4)
else:
    sys.exit(f"unknown mode {mode} (drill | corpus)")
