"""The vLLM side of evaluation, run as its own process: ``python -m genpi.evaluation.vllm_worker JOB RESULT``.

JOB is a JSON file made by :func:`genpi.evaluation.generation.vllm_job`; RESULT receives
``{"outputs": {set name: [token ids per prompt]}, "timing": {...} | null, "engine_start_s", "vllm_version"}``.
JOB may also be ``{"jobs": [job, ...]}``: their engines are built one after the other in this one process (vLLM's
import and start are paid once), and RESULT is ``{"results": [result, ...]}`` in the same order.
One engine serves every prompt set; the adapter, when a set asks for it, is a ``LoRARequest`` on that
engine (the base weights are never merged). vLLM builds its engine here, under the ``__main__`` guard.
"""

from __future__ import annotations

import gc
import json
import sys
import time
from pathlib import Path
from typing import Any


def run(job: dict[str, Any]) -> dict[str, Any]:
    from vllm import LLM, SamplingParams
    from vllm import __version__ as vllm_version
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    from genpi.evaluation.generation import PromptSet, TimingSpec, cut_at_stop, measure, timing_conditions

    engine: dict[str, Any] = {"enforce_eager": True, "enable_prefix_caching": job["engine"]["enable_prefix_caching"]}
    if job["engine"].get("max_model_len"):
        engine["max_model_len"] = int(job["engine"]["max_model_len"])
    if job.get("adapter"):
        engine.update(enable_lora=True, max_lora_rank=int(job["max_lora_rank"]), max_loras=1)
    try:
        import torch

        if torch.cuda.is_available():
            engine["gpu_memory_utilization"] = float(job["engine"]["gpu_memory_utilization"])
            # CUDA graphs pay off on a GPU; on the CPU eager mode avoids a long compile for no gain.
            engine["enforce_eager"] = False
    except ImportError:
        pass
    t0 = time.perf_counter()
    llm = LLM(model=job["model"], dtype=job["dtype"], seed=int(job["seed"]), **engine)
    engine_start = time.perf_counter() - t0
    lora = LoRARequest("genpi_student", 1, job["adapter"]) if job.get("adapter") else None

    gen = job["generate"]
    stop = list(gen["stop_token_ids"])

    def generate(prompts: list[list[int]], adapter: bool, max_tokens: int, ignore_eos: bool) -> list[list[int]]:
        params = SamplingParams(temperature=0.0, max_tokens=int(max_tokens), detokenize=False,
                                stop_token_ids=[] if ignore_eos else stop, ignore_eos=ignore_eos)
        outs = llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params,
                            lora_request=lora if adapter else None, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    sets = [PromptSet(**s) for s in gen["sets"]]
    outputs = {s.name: [cut_at_stop(ids, stop) for ids in generate(s.prompts, s.adapter, gen["max_tokens"], False)]
               for s in sets}
    timing = None
    if job.get("timing"):
        timing = measure(lambda prompts, adapter, n: generate(prompts, adapter, n, True), timing_conditions(sets),
                         TimingSpec(**job["timing"]))
    return {"outputs": outputs, "timing": timing, "engine_start_s": engine_start, "vllm_version": vllm_version,
            "engine_args": {k: v for k, v in engine.items()}}


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        raise SystemExit("usage: python -m genpi.evaluation.vllm_worker JOB.json RESULT.json")
    job = json.loads(Path(args[0]).read_text())
    if "jobs" in job:
        results = []
        for one in job["jobs"]:
            results.append(run(one))
            gc.collect()  # the finished engine's memory before the next one is built
        result: dict[str, Any] = {"results": results}
    else:
        result = run(job)
    tmp = Path(args[1]).with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(args[1])


if __name__ == "__main__":
    main()
