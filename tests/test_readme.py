"""Every command in the README's fenced shell blocks, as a newcomer would copy it.

Each command either runs here (the suite runs it, at small scale where it is long, or names the test
that does) or says beside it what it needs (``# needs: ...`` on its line or the line above: a GPU, real
COCO, several hosts, a trained run). Whatever it is, what can be checked without running it is: the
script exists, every ``--flag`` is one its ``--help`` lists, ``--config`` names a file, and every
``key=value`` override loads into the experiment config (a renamed key fails here, not in a user's
terminal).
"""

from __future__ import annotations

import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest

from conftest import REPO
from pipeline.config import load_config

README = REPO / "README.md"
NEEDS = re.compile(r"#\s*needs:\s*(.+)$")

# The commands that run here without anything the checkout lacks, and the test that runs each (or its
# small-scale form). A command not in this table must say what it needs.
RUNS_HERE = {
    "launch/train.py --config configs/shapes_default.yaml": "test_readme_command_1_trains_and_reports_map",
    "pytest -q --durations=15 tests": ".ci/run",
    "launch/plan.py --config configs/shapes_default.yaml --world-size 2 --measure":
        "test_the_readme_planner_example_runs_here",
    "launch/study.py studies/mini_batch_scaling.yaml --list": "test_the_readme_study_listing_runs_here",
    "launch/study.py studies/mini_batch_scaling.yaml": "tests/test_study.py (the runner, on small studies)",
    "benchmarks/gpu_suite.py /tmp/suite --smoke": "tests/test_gpu_suite.py::test_every_part_runs_in_smoke_mode",
}


def readme_commands() -> list[tuple[int, str, str]]:
    """(line number, command, what the README says it needs or '') for each command of a fenced
    bash block; continuation lines joined, trailing comments kept apart."""
    lines = README.read_text().splitlines()
    out, in_block, pending, start, above = [], False, "", 0, ""
    for number, line in enumerate(lines, 1):
        if line.startswith("```"):
            in_block = line.strip() in ("```bash", "```sh") if not in_block else False
            above = ""
            continue
        if not in_block:
            continue
        if line.lstrip().startswith("#"):
            above = line
            continue
        text, _, comment = line.partition("  #")
        start = start or number
        if text.rstrip().endswith("\\"):
            pending += text.rstrip()[:-1] + " "
            continue
        command = " ".join((pending + text).split())
        needs = NEEDS.search("#" + comment) or NEEDS.search(above)
        out.append((start, command, needs.group(1).strip() if needs else ""))
        pending, start, above = "", 0, ""
    return out


COMMANDS = readme_commands()


def _runs_here(command: str) -> str:
    return next((test for key, test in RUNS_HERE.items() if command.endswith(key)), "")


def test_what_runs_a_command_exists():
    """Each RUNS_HERE entry names a test file (and test) that exists, or a test of this file, or .ci/run."""
    here = Path(__file__).read_text()
    for command, runner in RUNS_HERE.items():
        target = runner.split(" ")[0]
        if target.startswith("tests/"):
            path, _, name = target.partition("::")
            assert (REPO / path).is_file() and (not name or f"def {name}(" in (REPO / path).read_text()), command
        elif target.startswith("test_"):
            assert f"def {target}(" in here, command
        else:
            assert (REPO / target).is_file(), command


def test_the_readme_has_its_commands():
    assert len(COMMANDS) >= 15 and COMMANDS[0][0] == 4  # the two set-up commands open the README


@pytest.mark.parametrize("line,command,needs", COMMANDS, ids=[f"line{c[0]}" for c in COMMANDS])
def test_each_command_runs_here_or_says_what_it_needs(line, command, needs):
    assert _runs_here(command) or needs, (
        f"README.md:{line}: {command!r} is not run by the suite and does not say what it needs: add "
        "'# needs: <a GPU / COCO at ... / a hostfile / a trained run>' beside it, or run it in tests/test_readme.py")


def _script_and_args(command: str) -> tuple[Path, list[str]]:
    """The Python script the (last) command runs and its arguments."""
    last = command.split("&&")[-1]
    words = shlex.split(last)
    script = next(i for i, w in enumerate(words) if w.endswith(".py"))
    return REPO / words[script], words[script + 1:]


_HELP: dict[Path, str] = {}


def _help(script: Path, capsys) -> str:
    if script not in _HELP:
        argv = sys.argv
        sys.argv = [str(script), "--help"]
        try:
            with pytest.raises(SystemExit):
                runpy.run_path(str(script), run_name="__main__")
        finally:
            sys.argv = argv
        _HELP[script] = capsys.readouterr().out
    return _HELP[script]


@pytest.mark.parametrize("line,command,needs", [c for c in COMMANDS if ".py" in c[1] and "pytest" not in c[1]],
                         ids=[f"line{c[0]}" for c in COMMANDS if ".py" in c[1] and "pytest" not in c[1]])
def test_each_command_parses_against_the_code(line, command, needs, capsys):
    for part in command.split("&&"):
        if ".py" not in part:
            continue
        script, args = _script_and_args(part)
        assert script.is_file(), f"README.md:{line}: {script.relative_to(REPO)} does not exist"
        usage = _help(script, capsys)
        for flag in (a.split("=")[0] for a in args if a.startswith("--")):
            assert re.search(rf"(^|[\s,\[]){re.escape(flag)}\b", usage), \
                f"README.md:{line}: {script.name} has no {flag} (its --help: {usage[:600]})"
        if "--config" in args:
            config = REPO / args[args.index("--config") + 1]
            assert config.is_file(), f"README.md:{line}: {config} does not exist"
            overrides = [a for a in args if "=" in a and not a.startswith("-")]
            load_config(config, overrides)  # raises, naming the key, when an override no longer exists
        for path in (a for a in args if a.endswith(".yaml") and not a.startswith("-")):
            assert (REPO / path).is_file(), f"README.md:{line}: {path} does not exist"


def test_the_readme_planner_example_runs_here(shapes_root, capfd):
    """README's planner example on the test data at 64-96 px with a tiny backbone (without --measure,
    which tests/test_planner.py runs)."""
    from pipeline.tools.planner import main

    command = next(c for _, c, _ in COMMANDS if c.endswith(next(k for k in RUNS_HERE if "plan.py" in k)))
    _, args = _script_and_args(command)
    args = [a for a in args if a != "--measure"] + [f"data.root={shapes_root}", "data.source=coco",
                                                    "model.backbone=test_byobnet", "data.min_size=64",
                                                    "data.max_size=96"]
    assert main([str(REPO / a) if a.endswith(".yaml") else a for a in args]) == 0
    out, err = capfd.readouterr()
    assert "total per rank" in out and "activation probe:" in err


def test_the_readme_study_listing_runs_here(capsys):
    from pipeline.studies.runner import main

    command = next(c for _, c, _ in COMMANDS if c.endswith("--list"))
    _, args = _script_and_args(command)
    assert main([str(REPO / a) if a.endswith(".yaml") else a for a in args]) in (0, None)
    assert "point" in capsys.readouterr().out


def test_readme_command_1_trains_and_reports_map(shapes_root, tmp_path):
    """README command 1's training as written, with length and size overrides appended: it trains through
    DeepSpeed, evaluates with COCOeval and ends on its 'final bbox AP ... AP50 ...' line."""
    import os
    import subprocess

    from conftest import tiny_overrides

    command = COMMANDS[0][1].split("&&")[-1].split()
    script = command.index("launch/train.py")
    extra = tiny_overrides(shapes_root, tmp_path, "faster_rcnn") + ["schedule.max_iters=2"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    done = subprocess.run([sys.executable, *command[script:], *extra], cwd=REPO, env=dict(env, OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"final bbox AP [0-9.]+  AP50 [0-9.]+", done.stdout), done.stdout[-2000:]
    assert "what runs:" in done.stderr and "GFLOP per training image" in done.stderr
