"""genpi-pipeline: synthesis, then training on what it wrote, then evaluation of the trained adapter.

``python -m genpi.pipeline task=os synth.client=vllm loss=genpi_kl``

Overrides go to the stages that know them: ``synth.*`` to genpi-synth, ``eval.*`` to genpi-eval,
training groups (loss, optim, trainer, data, callbacks, debug, experiment) to genpi-train, and shared
ones (task, model, seed, logger, paths, ...) to all three. Each stage runs as its own process with its
own run folder, exactly as if launched by hand; the folders are printed at the end.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time

STAGE_KEYS = {
    "synth": ("synth",),
    "train": ("loss", "optim", "trainer", "data", "callbacks", "debug", "experiment", "hparams_search", "ckpt_path",
              "resume", "validate_before_fit", "run_name", "post_eval", "post_eval_overrides", "optimized_metric"),
    "eval": ("eval",),
}


def route(overrides: list[str]) -> dict[str, list[str]]:
    """Which overrides each stage gets: by the first key component (``loss.kl.weight=1`` -> train)."""
    out: dict[str, list[str]] = {s: [] for s in STAGE_KEYS}
    for o in overrides:
        key = re.split(r"[.=/]", o.lstrip("+~"), maxsplit=1)[0]
        owners = [s for s, keys in STAGE_KEYS.items() if key in keys]
        for s in owners or STAGE_KEYS:
            out[s].append(o)
    return out


def _run(stage: str, module: str, args: list[str], marker: str) -> str:
    print(f"\n=== genpi {stage}: python -m {module} {' '.join(args)}", flush=True)
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-m", module, *args], stdout=subprocess.PIPE, text=True, bufsize=1)
    found = None
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stdout.write(line)
        if line.startswith(marker):
            found = line[len(marker):].strip()
    if proc.wait() != 0:
        raise SystemExit(f"genpi pipeline: the {stage} stage failed (exit {proc.returncode}); its output is above")
    if not found:
        raise SystemExit(f"genpi pipeline: the {stage} stage did not print '{marker}'")
    print(f"=== genpi {stage}: done in {time.time() - t0:.0f}s -> {found}", flush=True)
    return found


def main(argv: list[str] | None = None) -> None:
    overrides = list(sys.argv[1:] if argv is None else argv)
    routed = route(overrides)
    dataset = _run("synth", "genpi.synth", routed["synth"], "dataset:")
    run_dir = _run("train", "genpi.train", [*routed["train"], f"data.path={dataset}"], "run folder:")
    report = _run("eval", "genpi.evaluate", [*routed["eval"], f"run_dir={run_dir}"], "report:")
    print(f"\ndataset: {dataset}\nrun folder: {run_dir}\nreport: {report}")


if __name__ == "__main__":
    main()
