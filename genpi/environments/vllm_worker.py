"""The vLLM side of the environment evaluation, run as its own process:
``python -m genpi.environments.vllm_worker JOB RESULT``.

JOB holds the model, the adapter and the :func:`genpi.environments.evaluate.play` spec; RESULT receives what
``play`` returns. Each round of the lockstep loop is one ``LLM.generate`` call over every running episode, the
adapter given per request (``LoRARequest`` for the student, none for teacher and floor).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any


def make_generate(job: dict[str, Any]):
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    from genpi.evaluation.generation import cut_at_stop
    from genpi.models.factory import load_tokenizer
    from genpi.synthesis.clients.base import end_of_turn_ids

    spec = job["spec"]
    engine: dict[str, Any] = {"enforce_eager": True}
    if spec.get("max_model_len"):
        engine["max_model_len"] = int(spec["max_model_len"])
    if job.get("adapter"):
        engine.update(enable_lora=True, max_lora_rank=int(job["max_lora_rank"]), max_loras=1)
    t0 = time.perf_counter()
    llm = LLM(model=job["model"], dtype=job["dtype"], seed=0, **engine)
    start_s = time.perf_counter() - t0
    tokenizer = load_tokenizer(spec["model_cfg"])
    stop = end_of_turn_ids(tokenizer)
    lora = LoRARequest("genpi_student", 1, job["adapter"]) if job.get("adapter") else None
    params = SamplingParams(temperature=0.0, max_tokens=int(spec["max_new_tokens"]), stop_token_ids=stop,
                            detokenize=False)

    def generate(prompts: list[list[int]], adapters: list[bool]) -> list[list[int]]:
        requests = [lora if a else None for a in adapters]
        outs = llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params,
                            lora_request=requests if lora is not None else None, use_tqdm=False)
        return [cut_at_stop(list(o.outputs[0].token_ids), stop) for o in outs]

    return generate, tokenizer, start_s


def main(argv: list[str] | None = None) -> None:
    from genpi.environments.evaluate import play

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        raise SystemExit("usage: python -m genpi.environments.vllm_worker JOB.json RESULT.json")
    job = json.loads(Path(args[0]).read_text())
    generate, tokenizer, start_s = make_generate(job)
    if job.get("bench_widths"):  # genpi-bench: the same warm engine, several lockstep widths
        from genpi.environments.bench import timed_runs

        result = {"bench": timed_runs(job["spec"], generate, tokenizer, list(job["bench_widths"])),
                  "engine_start_s": start_s}
    else:
        result = play(job["spec"], generate, tokenizer)
        result["stats"]["engine_start_s"] = start_s
    tmp = Path(args[1]).with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(args[1])


if __name__ == "__main__":
    main()
