"""genpi-pipeline: synthesis, then training on what it wrote, then evaluation of the trained adapter, from ONE config.

Usage:
    genpi-pipeline [OVERRIDES...]          e.g.  genpi-pipeline experiment=demo
    genpi-pipeline task=webshop model=tiny_agent loss=kl synth.pseudo_inputs.num_inputs=64 eval.engine=hf
    genpi-pipeline [OVERRIDES...] --cfg job   print each stage's composed config and command, run nothing

The pipeline composes one config, ``conf/pipeline.yaml`` (the training config, experiment files included, plus the
``synth`` group), and hands every stage the same task, model (with every key the overrides or the experiment file
changed) and seed, so the three stages cannot disagree about what they run on. ``synth.*`` keys go to synthesis,
``eval.*`` overrides (and the list ``pipeline.eval_overrides``) to evaluation, everything else to training;
``paths.*``, ``logger`` and ``experiment_name`` to all three. Each stage runs as its own process with its own run
folder, exactly as if launched by hand (``genpi-synth``, ``genpi-train``, ``genpi-eval``), and the folders are
printed at the end. Started again with the same config, the pipeline reuses what the first run wrote: synthesis
resumes from its store, and a finished training run or evaluation is not run again (it says so).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from genpi.utils.errors import GenpiError

SHARED_GROUPS = ("task", "model")
TO_ALL = ("paths", "logger", "experiment_name")


def split_overrides(overrides: list[str]) -> dict[str, list[str]]:
    """``synth.*`` -> synth, ``eval.*`` -> eval, everything else -> the pipeline (training) config."""
    out: dict[str, list[str]] = {"synth": [], "eval": [], "pipeline": []}
    for o in overrides:
        key = re.split(r"[.=/]", o.lstrip("+~"), maxsplit=1)[0]
        out[key if key in ("synth", "eval") else "pipeline"].append(o)
    return out


def _compose(config_name: str, overrides: list[str]) -> DictConfig:
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    import genpi.runs  # noqa: F401  (the config-hash resolver of run folders)
    import genpi.utils.hydra_utils  # noqa: F401  (registers genpi's resolvers)
    from genpi.evaluation import artifacts  # noqa: F401  (the resolver naming evaluation folders)

    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="genpi.conf", version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides, return_hydra_config=True)


def _literal(value: Any) -> str:
    """A value in Hydra's override grammar."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_literal(v)}" for k, v in value.items()) + "}"
    text = str(value).replace("\\", "\\\\").replace("'", "\\'")
    return f"'{text}'"


def _leaves(node: Any, prefix: str) -> dict[str, Any]:
    if isinstance(node, dict) and node:
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_leaves(v, f"{prefix}.{k}"))
        return out
    return {prefix: node}


def block_overrides(block: str, wanted: DictConfig, reference: DictConfig) -> list[str]:
    """Overrides that turn ``reference[block]`` into ``wanted[block]`` (unresolved values, leaf by leaf)."""
    want = _leaves(OmegaConf.to_container(wanted[block], resolve=False), block)
    have = _leaves(OmegaConf.to_container(reference[block], resolve=False), block) if block in reference else {}
    out = []
    for key, value in want.items():
        if key not in have:
            out.append(f"++{key}={_literal(value)}")
        elif have[key] != value:
            out.append(f"{key}={_literal(value)}")
    return out


def plan_stages(overrides: list[str]) -> dict[str, Any]:
    """Compose the pipeline's config once and derive each stage's command-line overrides from it."""
    parts = split_overrides(overrides)
    cfg = _compose("pipeline", parts["pipeline"] + parts["synth"])
    choices = cfg.hydra.runtime.choices
    common = [f"{g}={choices[g]}" for g in SHARED_GROUPS] + [f"seed={cfg.seed}"]
    reference = _compose("pipeline", common)
    for group in SHARED_GROUPS:
        common += block_overrides(group, cfg, reference)
    to_all = [o for o in parts["pipeline"] if re.split(r"[.=/]", o.lstrip("+~"), maxsplit=1)[0] in TO_ALL]
    if cfg.get("experiment_name") and not any(o.startswith("experiment_name=") for o in to_all):
        to_all.append(f"experiment_name={_literal(cfg.experiment_name)}")
    synth_reference = _compose("synth", common + to_all)
    synth = common + to_all + block_overrides("synth", cfg, synth_reference)
    evaluate = common + to_all + list(cfg.pipeline.eval_overrides or []) + parts["eval"]
    return {"config": cfg, "synth": synth, "train": parts["pipeline"], "eval": evaluate}


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
        raise SystemExit(proc.returncode if proc.returncode == 2 else 1)
    if not found:
        raise GenpiError(f"the {stage} stage ended without printing '{marker}': see its output above")
    print(f"=== genpi {stage}: done in {time.time() - t0:.0f}s -> {found}", flush=True)
    return found


def _run_dir(config_name: str, args: list[str]) -> Path:
    """The folder Hydra would run ``config_name`` with ``args`` in (``hydra.run.dir`` resolved)."""
    cfg = _compose(config_name, args)
    return Path(str(OmegaConf.select(cfg, "hydra.run.dir")))


def finished_training(run_dir: Path) -> bool:
    metrics = run_dir / "metrics.json"
    return (run_dir / "adapter" / "adapter_config.json").is_file() and metrics.is_file() and \
        "train/steps" in json.loads(metrics.read_text())


def finished_evaluation(eval_dir: Path, run_dir: Path) -> bool:
    report, adapter = eval_dir / "report.md", run_dir / "adapter" / "adapter_config.json"
    return report.is_file() and (eval_dir / "metrics.json").is_file() and \
        report.stat().st_mtime >= adapter.stat().st_mtime


def run(overrides: list[str]) -> dict[str, str]:
    plan = plan_stages(overrides)
    dataset = _run("synth", "genpi.synth", [*plan["synth"], "synth.progress=false"], "dataset:")
    train_args = [*plan["train"], f"data.path={_literal(dataset)}"]
    run_dir = _run_dir("train", train_args)
    if finished_training(run_dir):
        print(f"\n=== genpi train: reusing the finished run in {run_dir} (same config; delete the folder to train "
              "again)", flush=True)
    else:
        run_dir = Path(_run("train", "genpi.train", train_args, "run folder:"))
    eval_args = [*plan["eval"], f"run_dir={_literal(str(run_dir))}"]
    eval_dir = _run_dir("eval", eval_args)
    if finished_evaluation(eval_dir, run_dir):
        report = str(eval_dir / "report.md")
        print(f"\n=== genpi eval: reusing the evaluation in {eval_dir} (newer than the adapter)", flush=True)
    else:
        report = _run("eval", "genpi.evaluate", eval_args, "report:")
    print(f"\ndataset: {dataset}\nrun folder: {run_dir}\nreport: {report}", flush=True)
    return {"dataset": dataset, "run_dir": str(run_dir), "report": report}


def dry_run(overrides: list[str]) -> None:
    """``--cfg job``: each stage's command and composed config; nothing runs."""
    plan = plan_stages(overrides)
    synth_cfg = _compose("synth", plan["synth"])
    dataset = str(OmegaConf.select(synth_cfg, "synth.out_dir"))
    train_args = [*plan["train"], f"data.path={_literal(dataset)}"]
    run_dir = _run_dir("train", train_args)
    eval_args = [*plan["eval"], f"run_dir={_literal(str(run_dir))}"]
    for stage, name, args in (("synth", "synth", plan["synth"]), ("train", "train", train_args),
                              ("eval", "eval", eval_args)):
        cfg = OmegaConf.to_container(_compose(name, args), resolve=False)
        cfg.pop("hydra", None)
        print(f"# === {stage}: genpi-{stage} {' '.join(args)}")
        print(OmegaConf.to_yaml(cfg))


def main(argv: list[str] | None = None) -> None:
    from genpi.utils.errors import exit_on_error

    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(__doc__)
        return
    fn = run
    if "--cfg" in args:
        i = args.index("--cfg")
        del args[i:i + 2]
        fn = dry_run
    exit_on_error(_hydra_errors_as_genpi_errors(fn))(args)


def _hydra_errors_as_genpi_errors(fn):
    """Hydra's composition errors (an unknown option or key) keep Hydra's own message, which lists the valid
    choices, without the traceback."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    def wrapped(args: list[str]) -> Any:
        try:
            return fn(args)
        except (HydraException, OmegaConfBaseException) as err:
            raise GenpiError(str(err).strip()) from None

    return wrapped


if __name__ == "__main__":
    main()
