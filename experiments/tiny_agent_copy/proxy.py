"""What the training probes share: their own made-up syllable values (the first probes' generator, kept as it made
their numbers; genpi's builder uses genpi.tasks.generators.fresh_value) and what they print and write at their end,
the env-split proxy (never used to choose)."""
import json
import random
import time

from genpi.synthesis.clients.base import Sampling
from genpi.synthesis.clients.hf import HFClient
from genpi.tasks import generators as G

ENV_VALUES = {v for vs in G.ENV_SLOT_VALUES.values() for v in vs}
POOL_NAMES = ("DIRS", "EXTS", "WORDS", "USERS", "PROCS", "FILES", "SHELLS")
CONS, VOW = "bcdfghjklmnprstvwz", "aeiou"


def word(rng, lo=2, hi=3):
    return "".join(rng.choice(CONS) + rng.choice(VOW) + (rng.choice(CONS) if rng.random() < .4 else "")
                   for _ in range(rng.randint(lo, hi)))


def syllable_value(rng, name):
    """A made-up value of syllable words for the os slot pool ``name``, never an env value."""
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


def save_and_probe(model, tok, task, out, record: dict, t0: float, show: int) -> None:
    """Save the candidate in ``out``; answer 48 env-split os questions greedily with and without the prompt; write
    ``out/probe.json`` (``record``, its ``seconds`` since ``t0`` filled in, + exact commands and format rates) and
    print ``show`` examples."""
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    client = HFClient(model, tok, batch_size=16)
    rng = G.Slots(random.Random("probe"), G.ENV_SPLIT)
    recs = [G.os_example_with_slots(rng) for _ in range(48)]
    greedy = Sampling(temperature=0.0, max_tokens=96)
    withp = client.chat([task.teacher_messages(r["pseudo_input"]) for r, _ in recs], greedy)
    without = client.chat([task.student_messages(r["pseudo_input"]) for r, _ in recs], greedy)
    res = {**record, "seconds": round(time.time() - t0), "exact_code": sum(s["code"] in a for (r, s), a in zip(recs, withp)),
           "format_with": sum(map(task.check_format, withp)), "format_without": sum(map(task.check_format, without)),
           "n": len(recs)}
    print(json.dumps(res))
    (out / "probe.json").write_text(json.dumps(res))
    for (r, s), a in list(zip(recs, withp))[:show]:
        print(f"Q: {r['pseudo_input']}\nREF: {s['code']}\nGOT: {a}\n")
