"""Probe: the copy drill alone (the assistant repeats made-up syllable values) from the random tiny base.
    python probe_drill.py LR BATCH STEPS OUT"""
import random
import sys
import time

import torch
from proxy import POOL_NAMES, syllable_value
from transformers import AutoTokenizer, LlamaForCausalLM

from genpi.data.tokenize import encode_chat
from genpi.models import tiny_agent as TA
from genpi.models.tiny import build_tiny
from genpi.tasks.generators import repeat_chat

lr, bs, steps, out = float(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
torch.set_num_threads(1)
torch.set_flush_denormal(True)
torch.manual_seed(0)
base = build_tiny(None)
tok = AutoTokenizer.from_pretrained(str(base))
model = LlamaForCausalLM.from_pretrained(str(base), dtype=torch.float32)
drng = random.Random(7)
seqs = [encode_chat(tok, repeat_chat([syllable_value(drng, drng.choice(POOL_NAMES))
                                      for _ in range(drng.randint(2, 5))]), 1) for _ in range(20000)]
print("len", sum(len(s[0]) for s in seqs[:100]) / 100, flush=True)
pre = TA.pretrain_config({"steps": steps, "batch_size": bs, "examples_per_task": 20000, "lr": lr, "warmup_steps": 50,
                          "view_weights": "1,0,0"})
t0 = time.time()
losses = TA._train(model, {("drill", "teacher"): seqs}, pre, tok.pad_token_id, print)
print("final", sum(losses[-50:]) / 50, time.time() - t0)
model.save_pretrained(out)
tok.save_pretrained(out)
