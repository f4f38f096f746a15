"""What the training probes print and write at their end: the env-split proxy (never used to choose)."""
import json
import random
import time

from genpi.synthesis.clients.base import Sampling
from genpi.synthesis.clients.hf import HFClient
from genpi.tasks import generators as G


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
        print("Q:", r["pseudo_input"]); print("REF:", s["code"]); print("GOT:", a); print()
