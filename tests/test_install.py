"""What a user runs after the install: every console script, from outside the checkout, from an editable install and
from a wheel; every genpi command line the README shows composes its config."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]

# How each console script composes its config without running: a Hydra app's `--cfg job`, or the script's own
# dry run. A script added to pyproject.toml must be added here (the test below says so).
DRY_RUN = {
    "genpi-train": ["--cfg", "job"],
    "genpi-synth": ["--cfg", "job"],
    "genpi-eval": ["--cfg", "job"],
    "genpi-export": ["--cfg", "job"],
    "genpi-pipeline": ["--cfg", "job"],
    "genpi-bench": ["--dry-run"],
    "genpi-env-check": ["--cfg", "job"],
    "genpi-serve": ["--cfg", "job"],
}
# The config each Hydra app composes (README lines are composed in-process with it).
CONFIG_NAME = {"genpi-train": "train", "genpi-synth": "synth", "genpi-eval": "eval", "genpi-export": "export",
               "genpi-env-check": "env_check", "genpi-serve": "serve"}
# README command lines that cannot compose in this test, each with the reason (GPU-cluster lines still compose).
README_EXCEPTIONS: dict[str, str] = {
    "genpi-train --config-dir myconf model=my_llm task=os loss=genpi_kl":
        "needs the user's folder: test_a_users_config_folder_adds_options_to_the_installed_script runs it",
}


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update({"GENPI_OUTPUT_ROOT": "outputs", "HYDRA_FULL_ERROR": "0", **(extra or {})})
    return env


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env or _env(), capture_output=True, text=True, timeout=300)


def test_every_console_script_has_a_dry_run_here():
    missing = sorted(set(SCRIPTS) - set(DRY_RUN))
    assert not missing, f"add a dry run for {missing} to DRY_RUN in this file"


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_console_script_helps_and_composes_from_another_directory(script, tmp_path):
    """The installed console script (not `python -m` from the checkout) runs from a folder outside the repo."""
    exe = Path(sys.executable).parent / script
    assert exe.is_file(), f"{script} is not installed in {exe.parent}: run `make install`"
    helped = _run([str(exe), "--help"], tmp_path)
    assert helped.returncode == 0, helped.stderr[-2000:]
    assert "genpi" in helped.stdout.lower() and "Traceback" not in helped.stderr
    composed = _run([str(exe), *DRY_RUN[script]], tmp_path)
    assert composed.returncode == 0, composed.stderr[-2000:]
    assert "Traceback" not in composed.stderr and composed.stdout.strip()
    assert not (tmp_path / "outputs").exists(), f"{script}'s dry run wrote {list((tmp_path / 'outputs').rglob('*'))}"


def test_hydra_entry_points_import_without_torch():
    """`--help`, `--cfg job` and a config refused in one line answer in about a second: the entry modules of the
    Hydra apps load torch, Lightning and transformers only once a config has passed its checks."""
    modules = sorted({target.split(":")[0] for script, target in SCRIPTS.items() if script != "genpi-bench"})
    probe = ("import importlib, sys\n"
             f"for name in {modules!r}:\n"
             "    importlib.import_module(name)\n"
             "print(sorted(m for m in ('torch', 'pytorch_lightning', 'transformers', 'matplotlib', 'vllm')"
             " if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", f"importing {modules} loaded {out.stdout.strip()}"


def test_train_composes_the_readme_example_from_another_directory(tmp_path):
    exe = Path(sys.executable).parent / "genpi-train"
    out = _run([str(exe), "task=os", "loss=genpi_kl", "debug=fdr", "--cfg", "job"], tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "name: genpi_kl" in out.stdout and "fast_dev_run: true" in out.stdout


def readme_commands() -> list[tuple[str, list[str], bool]]:
    """``(script, overrides, multirun)`` of every genpi-* line in the README's code blocks."""
    text = (REPO / "README.md").read_text()
    out = []
    for block in re.findall(r"```(?:bash|sh|console)?\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            line = line.split(" #", 1)[0].strip()
            if "genpi-" not in line:
                continue
            words = shlex.split(line)
            while words and re.match(r"^[A-Z_]+=", words[0]):  # environment assignments before the command
                words.pop(0)
            if not words:
                continue
            script = words[0].removeprefix(".venv/bin/")
            if script.startswith("genpi-"):
                args = words[1:]
                out.append((script, [a for a in args if a not in ("-m", "--multirun")],
                            "-m" in args or "--multirun" in args))
    return out


def _first_of_sweeps(overrides: list[str]) -> list[str]:
    """A multirun's first job: each sweep override (a,b / range / choice) replaced by its first value."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    out = []
    for raw, parsed in zip(overrides, OverridesParser.create().parse_overrides(overrides)):
        if parsed.is_sweep_override():
            first = next(iter(parsed.sweep_string_iterator()))
            out.append(f"{parsed.get_key_element()}={first}")
        else:
            out.append(raw)
    return out


def test_the_readme_shows_genpi_commands():
    scripts = {s for s, _, _ in readme_commands()}
    assert {"genpi-train", "genpi-synth", "genpi-eval", "genpi-pipeline"} <= scripts


@pytest.mark.parametrize("line", readme_commands(), ids=lambda c: " ".join([c[0], *c[1]])[:80])
def test_every_readme_command_line_composes(line, monkeypatch, tmp_path):
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    script, args, multirun = line
    key = " ".join([script, *args])
    if key in README_EXCEPTIONS:
        pytest.skip(README_EXCEPTIONS[key])
    monkeypatch.chdir(tmp_path)
    overrides = _first_of_sweeps(args) if multirun else args
    if script == "genpi-pipeline":
        from genpi.pipeline import plan_stages

        plan = plan_stages(overrides)
        assert plan["synth"] and plan["eval"]
        return
    if script == "genpi-bench":
        from genpi.bench import parse_args

        parse_args(overrides)
        return
    assert script in CONFIG_NAME, f"the README shows {script}, which this test cannot compose"
    import genpi.utils.hydra_utils  # noqa: F401

    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="genpi.conf", version_base="1.3"):
        cfg = compose(config_name=CONFIG_NAME[script], overrides=overrides, return_hydra_config=True)
    assert cfg.get("task") is not None or script == "genpi-export"


def _tracked_copy(dest: Path) -> Path:
    """The repository's tracked files (what a clone has), copied to ``dest``."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True)
    for rel in filter(None, files.stdout.split("\0")):
        src = REPO / rel
        if src.is_symlink():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(os.readlink(src), dest / rel)
        elif src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


@pytest.mark.slow
def test_a_wheel_ships_every_config_and_composes_when_installed(tmp_path):
    """`pip wheel .` holds every YAML of conf/; installed into a fresh venv that sees only the project's
    dependencies (not its source), the console script composes the train config from another folder."""
    import zipfile

    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs a git checkout to list the tracked files")
    src = _tracked_copy(tmp_path / "src")
    wheels = tmp_path / "wheels"
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels),
                  str(src)], tmp_path)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = wheels.glob("genpi-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    yamls = {p.relative_to(REPO / "genpi").as_posix() for p in (REPO / "genpi" / "conf").rglob("*.yaml")
             if "local" not in p.parts}
    assert yamls and {f"genpi/{y}" for y in yamls} <= names, sorted({f"genpi/{y}" for y in yamls} - names)
    assert "genpi/models/artifacts/tiny_agent.safetensors" in names

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python3*/site-packages"))
    # the project environment's dependencies, but not its editable genpi (a plain path entry runs no .pth inside)
    deps = next(p for p in map(Path, sys.path) if p.name == "site-packages" and p.is_dir()
                and str(p).startswith(sys.prefix))
    (site / "project_deps.pth").write_text(str(deps) + "\n")
    installed = _run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
                      "--no-deps", "--no-index", str(wheel)], tmp_path)
    assert installed.returncode == 0, installed.stderr[-2000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = _run([str(venv / "bin" / "python"), "-c", "import genpi; print(genpi.__file__)"], elsewhere)
    assert where.returncode == 0 and where.stdout.strip().startswith(str(site)), where.stdout + where.stderr
    out = _run([str(venv / "bin" / "genpi-train"), "task=os", "loss=genpi_kl", "debug=fdr", "--cfg", "job"], elsewhere)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "name: genpi_kl" in out.stdout


@pytest.mark.slow
def test_a_users_config_folder_adds_options_to_the_installed_script(tmp_path):
    """The Hydra way to bring your own configs (README): `--config-dir DIR` with group folders inside."""
    (tmp_path / "myconf" / "model").mkdir(parents=True)
    (tmp_path / "myconf" / "model" / "my_llm.yaml").write_text(
        "defaults:\n  - hf\n  - _self_\nname_or_path: /models/my-llm\ndtype: bfloat16\n")
    exe = Path(sys.executable).parent / "genpi-train"
    out = _run([str(exe), "--config-dir", str(tmp_path / "myconf"), "model=my_llm", "--cfg", "job"], tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "name_or_path: /models/my-llm" in out.stdout and "dtype: bfloat16" in out.stdout
