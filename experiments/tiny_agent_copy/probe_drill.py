import random, sys, time, torch
sys.argv, args = sys.argv[:1] + ["fresh", "1", "unused"], sys.argv[1:]
exec(open(__file__.replace("probe_drill.py", "probe_corpus.py")).read().split("from transformers import")[0])  # fresh(), POOLS
from transformers import AutoTokenizer, LlamaForCausalLM
from genpi.data.tokenize import encode_chat
from genpi.models import tiny_agent as TA
from genpi.models.tiny import build_tiny
lr, bs, steps = float(args[0]), int(args[1]), int(args[2])
torch.set_num_threads(1); torch.set_flush_denormal(True); torch.manual_seed(0)
base = build_tiny(None); tok = AutoTokenizer.from_pretrained(str(base))
model = LlamaForCausalLM.from_pretrained(str(base), dtype=torch.float32)
drng = random.Random(7); seqs = []
names = list(POOLS.values())
for _ in range(20000):
    vals = [fresh(drng, drng.choice(names)) for _ in range(drng.randint(2, 5))]
    msgs = [{"role": "user", "content": "Repeat these exactly: " + " ".join(vals)}, {"role": "assistant", "content": " ".join(vals)}]
    seqs.append(encode_chat(tok, msgs, 1))
print("len", sum(len(s[0]) for s in seqs[:100]) / 100, flush=True)
pre = TA.pretrain_config({"steps": steps, "batch_size": bs, "examples_per_task": 20000, "lr": lr, "warmup_steps": 50, "view_weights": "1,0,0"})
t0 = time.time()
losses = TA._train(model, {("drill", "teacher"): seqs}, pre, tok.pad_token_id, print)
print("final", sum(losses[-50:]) / 50, time.time() - t0)
model.save_pretrained(args[3]); tok.save_pretrained(args[3])
