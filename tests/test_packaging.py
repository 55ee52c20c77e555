"""The project installs as a package: requirements.txt and pyproject.toml agree, and nothing reaches
the package through sys.path."""

from __future__ import annotations

import re
import subprocess
import tomllib

from conftest import REPO


def _requirement_lines(text: str) -> set[str]:
    return {re.sub(r"\s+", "", ln) for ln in (ln.split("#")[0].strip() for ln in text.splitlines()) if ln}


def test_requirements_txt_agrees_with_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = {re.sub(r"\s+", "", d) for d in project["dependencies"]}
    listed = _requirement_lines((REPO / "requirements.txt").read_text())
    assert listed == declared, f"only in requirements.txt: {listed - declared}; only in pyproject: {declared - listed}"
    assert any(d.startswith("pytest") for d in project["optional-dependencies"]["test"])


def test_no_sys_path_manipulation():
    tracked = subprocess.run(["git", "ls-files", "*.py"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.split()
    assert len(tracked) > 30
    offenders = [p for p in tracked if p != "tests/test_packaging.py" and "sys.path.insert" in (REPO / p).read_text()]
    assert offenders == []


def test_package_is_importable_from_anywhere(tmp_path, monkeypatch):
    import importlib

    monkeypatch.chdir(tmp_path)
    for name in ("pipeline.config", "pipeline.train.validate", "models.detector"):
        assert importlib.import_module(name).__file__.startswith(str(REPO))
