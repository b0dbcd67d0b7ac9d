"""Every shell command of README.md keeps working.

Each command of the README's ```bash blocks (continuation lines joined, comments dropped, `&&` steps apart) is:

- run, as written or as its quick variant (`QUICK_VARIANTS`: the same command with flags appended that shrink the
  work; argparse keeps the last value of a repeated flag), when it needs only this repository and minutes of CPU:
  the main job, the tabletop demonstrations and the evaluation of the model the main job writes;
- otherwise parsed by the program's own argument parser (commands that need a GPU, the Hub, the user's data or
  hours: 7B, FSDP, DeepSpeed, Meta-World), with `accelerate launch`'s own options parsed by accelerate's parser and
  its `--config_file` read, so that a renamed flag, a missing recipe or config file fails here;
- or one of the commands `.ci/run` runs (set-up and the test suite), or the install of an extra that pyproject.toml
  declares.

A README command that is none of these fails `test_every_readme_command_is_checked`, naming it.
"""

import argparse
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
import torch
import yaml
from accelerate.commands.launch import launch_command_parser
from conftest import REPO

README = REPO / "README.md"
CI = REPO / ".ci" / "run"
PYTHONS = {"python", ".venv/bin/python"}
ENVIRONMENT = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
# The main job is `finetune.py` without arguments, which runs this recipe; its quick variant names it, so that flags
# can follow (`test_bare_finetune_is_the_tabletop_recipe` checks that the two are the same arguments).
MAIN_JOB_RECIPE = "configs/recipes/tabletop.yaml"
# Commands run by `test_tabletop_commands_run`, in this order, each by its program and `--env` (None: no `--env`),
# with the flags that make it quick (appended to the command as written).
QUICK_VARIANTS = {
    ("scripts/finetune.py", None): [
        "--num_demo_episodes", "24", "--vision_pretraining_steps", "2", "--max_steps", "2", "--per_device_train_batch_size", "8",
        "--eval_steps", "2", "--closed_loop_episodes", "2", "--logging_steps", "1",
    ],
    ("scripts/demos.py", "tabletop"): ["--episodes", "6"],
    ("scripts/evaluate.py", "tabletop"): ["--episodes", "4"],
}

# The Meta-World MT10 commands (README lines that name mt10), run in their order by `test_metaworld_mt10_commands_run`
# on two tasks, one episode each and a few steps, with these flags appended per program.
MT10_QUICK_VARIANTS = {
    "scripts/demos.py": ["--tasks", "reach-v3", "drawer-close-v3", "--episodes-per-task", "1"],
    "scripts/finetune.py": ["--max_steps", "2", "--per_device_train_batch_size", "4", "--eval_split_ratio", "0.5", "--eval_steps", "2",
                            "--save_steps", "2", "--logging_steps", "1"],
    "scripts/evaluate.py": ["--tasks", "reach-v3", "drawer-close-v3", "--episodes-per-task", "1", "--max-steps", "8", "--no_baselines"],
}


@dataclass(frozen=True)
class Step:
    """One command of a README line (a line may chain several with `&&`)."""

    line: str  # the README line, continuations joined
    env: tuple[tuple[str, str], ...]  # leading `NAME=value` assignments
    argv: tuple[str, ...]

    @property
    def program(self) -> str | None:
        """`scripts/<name>.py` that the step runs (with Python or `accelerate launch`), else None."""
        return next((word for word in self.argv if word.startswith("scripts/") and word.endswith(".py")), None)

    @property
    def env_choice(self) -> str | None:
        return self.argv[self.argv.index("--env") + 1] if "--env" in self.argv else None

    @property
    def arguments(self) -> list[str]:
        """The program's own arguments (after `scripts/<name>.py`)."""
        return list(self.argv[self.argv.index(self.program) + 1 :])


def shell_steps(text: str) -> list[Step]:
    """The commands of the ```bash blocks of a Markdown text."""
    steps = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            while words:
                step, words = (words[: words.index("&&")], words[words.index("&&") + 1 :]) if "&&" in words else (words, [])
                env = []
                while step and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", step[0]):
                    env.append(tuple(step.pop(0).split("=", 1)))
                steps.append(Step(" ".join(line.split()), tuple(env), tuple(step)))
    return steps


README_STEPS = shell_steps(README.read_text())
CI_STEPS = shell_steps(f"```bash\n{CI.read_text()}```")


class Parsed(Exception):
    """Raised in place of running a program once its parser has accepted the command line."""


def load_program(name: str) -> ModuleType:
    """`scripts/<name>` as a module of its own name (so that `scripts/evaluate.py` does not shadow `evaluate`)."""
    path = REPO / name
    spec = importlib.util.spec_from_file_location(f"readme_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_with_the_program(program: str, arguments: list[str], monkeypatch) -> object:
    """The program's own parse of `arguments`, without running it: its `parse_arguments` / `parse_args` function when
    it has one, else its `main` up to the first `ArgumentParser.parse_args` (which then raises `Parsed`)."""
    module = load_program(program)
    for name in ("parse_arguments", "parse_args"):
        if callable(getattr(module, name, None)):
            return getattr(module, name)(arguments)
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(parser, args=None, namespace=None):
        raise Parsed(original(parser, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    with pytest.raises(Parsed) as parsed:
        module.main(arguments)
    return parsed.value.args[0]


def check_setup(step: Step) -> None:
    """`bash scripts/setup.sh [options]`: options that the script accepts; `.ci/run` runs it."""
    accepted = set(re.findall(r"^\s*(--[a-z]+)\)", (REPO / "scripts" / "setup.sh").read_text(), re.M))
    assert set(step.argv[2:]) <= accepted, f"{step.line}: setup.sh accepts {sorted(accepted)}"
    assert any(ci.argv[:2] == ("bash", "scripts/setup.sh") for ci in CI_STEPS)


def check_pytest(step: Step) -> None:
    """The test command (environment variables aside) is the one `.ci/run` runs."""
    command = step.argv[1:]
    assert any(ci.argv[0] in PYTHONS and ci.argv[1:] == command for ci in CI_STEPS), f"{step.line}: .ci/run runs {CI.read_text()}"


def check_install(step: Step) -> None:
    """`pip install -e ".[extra,...]"`: extras that pyproject.toml declares."""
    target = step.argv[-1]
    extras = re.fullmatch(r"\.\[([\w,-]+)\]", target)
    assert step.argv[:3] == ("pip", "install", "-e") and extras, step.line
    section = (REPO / "pyproject.toml").read_text().split("[project.optional-dependencies]\n", 1)[1].split("\n[", 1)[0]
    declared = re.findall(r"^([\w-]+)\s*=", section, re.M)  # (tomllib needs Python 3.11; the project supports 3.10)
    assert set(extras.group(1).split(",")) <= set(declared), f"{step.line}: pyproject.toml declares {sorted(declared)}"


def check_accelerate(step: Step) -> None:
    """`accelerate launch [options] scripts/...`: accelerate's own parser accepts the options, a `--config_file` is a
    YAML mapping in this repository."""
    launch = launch_command_parser().parse_args(list(step.argv[2:]))
    assert launch.training_script == step.program
    if launch.config_file is not None:
        assert isinstance(yaml.safe_load((REPO / launch.config_file).read_text()), dict), launch.config_file


@pytest.mark.parametrize("step", README_STEPS, ids=[" ".join(step.argv)[:80] for step in README_STEPS])
def test_every_readme_command_is_checked(step, monkeypatch):
    monkeypatch.chdir(REPO)  # the README's paths are relative to the repository
    words = step.argv
    if words[:2] == ("bash", "scripts/setup.sh"):
        return check_setup(step)
    if words[0] in PYTHONS and words[1:3] == ("-m", "pytest"):
        return check_pytest(step)
    if words[:2] == ("pip", "install"):
        return check_install(step)
    if words[:2] == ("accelerate", "launch"):
        check_accelerate(step)
    elif not (words[0] in PYTHONS and step.program == words[1]):
        pytest.fail(f"README command {step.line!r} is neither run nor parsed by this test; add it here.")
    if any(word.startswith("cuda") for word in words):  # a GPU command: parsed as on a machine with one
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    parse_with_the_program(step.program, step.arguments, monkeypatch)


def test_the_readme_shows_the_two_fresh_machine_commands():
    """The main job and the test suite, each from a fresh machine."""
    lines = [step.line for step in README_STEPS]
    assert "bash scripts/setup.sh && .venv/bin/python scripts/finetune.py" in lines
    assert "bash scripts/setup.sh --dev && .venv/bin/python -m pytest -q" in lines


def test_bare_finetune_is_the_tabletop_recipe(monkeypatch):
    """The quick variant of the main job names its recipe; without arguments the program reads the same one."""
    monkeypatch.chdir(REPO)
    finetune = load_program("scripts/finetune.py")
    assert finetune.parse_arguments([]) == finetune.parse_arguments([MAIN_JOB_RECIPE])


@pytest.fixture
def workspace(tmp_path):
    """A folder in which the README's relative paths resolve (scripts, configs, .venv) and its outputs stay."""
    for name in ("scripts", "configs", ".venv", "assets"):
        (tmp_path / name).symlink_to(REPO / name)
    return tmp_path


def run_step(step: Step, extra: list[str], cwd: Path) -> subprocess.CompletedProcess:
    argv = list(step.argv)
    if argv[0] in PYTHONS:
        argv[0] = sys.executable
    if step.program == "scripts/finetune.py" and not step.arguments:
        argv.append(MAIN_JOB_RECIPE)
    result = subprocess.run([*argv, *extra], cwd=cwd, env={**ENVIRONMENT, **dict(step.env)}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{step.line} {' '.join(extra)}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result


def test_tabletop_commands_run(workspace):
    """The main job, then the tabletop demonstrations and the evaluation of the model the main job wrote, as the README
    writes them with the flags of `QUICK_VARIANTS` appended."""
    for (program, env), extra in QUICK_VARIANTS.items():
        steps = [step for step in README_STEPS if step.program == program and step.env_choice == env and step.argv[0] in PYTHONS
                 and (program != "scripts/finetune.py" or not step.arguments)]  # finetune.py: the bare main job
        assert steps, f"README.md no longer runs {program} --env {env}; update QUICK_VARIANTS."
        run_step(steps[0], extra, workspace)
    assert (workspace / "outputs" / "finetune" / "model.safetensors").is_file()
    assert (workspace / "outputs" / "tabletop_demos" / "preview.png").is_file()
    assert (workspace / "outputs" / "eval.json").is_file()


def test_metaworld_mt10_commands_run(workspace):
    """The MT10 generalist and its adaptation to a new task, as the README writes them, on two tasks and a few steps
    (`MT10_QUICK_VARIANTS`): demonstrations, the MT10 recipe, its evaluation, then a LoRA adapter trained on new
    demonstrations and evaluated on the base model."""
    pytest.importorskip("metaworld", reason="Meta-World is an optional extra: pip install -e '.[metaworld]'")
    steps = [step for step in README_STEPS if "mt10" in step.line and step.argv[0] in PYTHONS]
    assert [step.program for step in steps] == ["scripts/demos.py", "scripts/finetune.py", "scripts/evaluate.py"] * 2, [s.line for s in steps]
    for step in steps:
        run_step(step, MT10_QUICK_VARIANTS[step.program], workspace)
    outputs = workspace / "outputs"
    assert (outputs / "metaworld_mt10" / "model.safetensors").is_file()
    evaluation = json.loads((outputs / "metaworld_mt10" / "eval.json").read_text())
    assert sorted(evaluation["success"]) == ["drawer-close-v3", "reach-v3"]
    assert (outputs / "mt10_coffee_lora" / "adapter" / "adapter_model.safetensors").is_file()
