"""The tree keeps its architecture: imports point down the layers (``pipeline.LAYERS``), ``models``
imports nothing from ``pipeline``, every dotted name or path the docs and comments cite exists, and a
wheel built from ``pyproject.toml`` holds every module of the tree. Static checks: nothing is imported."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import REPO
from pipeline import LAYERS

PACKAGES = ("pipeline", "models")


def _modules() -> dict[str, Path]:
    """Every module of the two packages, by dotted name."""
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imported(path: Path) -> set[str]:
    """The first-party modules ``path`` imports, wherever the import statement is (functions too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}  # from pipeline.x import submodule
    return {n for n in names if n.split(".")[0] in PACKAGES}


def _layer(module: str) -> int | None:
    """Index of ``module``'s layer in ``pipeline.LAYERS``; -1 for ``models``, None for the package root."""
    parts = module.split(".")
    if parts[0] == "models":
        return -1
    if len(parts) == 1:
        return None
    return LAYERS.index(parts[1]) if parts[1] in LAYERS else None


def test_every_pipeline_module_belongs_to_a_layer():
    stray = [m for m in _modules() if m.startswith("pipeline.") and _layer(m) is None]
    assert not stray, f"{stray}: add the subpackage to pipeline.LAYERS (pipeline/__init__.py) or move the module"


def test_imports_point_down_the_layers():
    wrong = []
    for module, path in _modules().items():
        own = _layer(module)
        if own is None:
            continue
        for target in _imported(path):
            layer = _layer(target)
            if target.startswith("pipeline") and own == -1:
                wrong.append(f"{path.relative_to(REPO)} imports {target}: models/ must not import pipeline")
            elif layer is not None and layer > own:
                wrong.append(f"{path.relative_to(REPO)} ({LAYERS[own] if own >= 0 else 'models'}) imports {target} "
                             f"({LAYERS[layer]}), a higher layer")
    assert not wrong, "\n".join(wrong)


def test_the_layer_check_catches_an_upward_import(tmp_path):
    """The check itself: a data module importing the trainer, and a model importing the config, are caught."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from pipeline.train.trainer import run\n")
    assert _imported(bad) == {"pipeline.train.trainer", "pipeline.train.trainer.run"}
    assert _layer("pipeline.train.trainer.run") > _layer("pipeline.data.dataset")
    bad.write_text("import pipeline.config\n")
    assert _imported(bad) == {"pipeline.config"} and _layer("models.detector") == -1


# ---- the names the docs cite ----

DOC_FILES = ("README.md", "BENCHMARKS.md", "launch/README.md", "docs/RESULTS.md")
CODE_DIRS = ("pipeline", "models", "launch", "benchmarks", "tests")
DOTTED = re.compile(r"(?<![\w./-])((?:pipeline|models)(?:\.[A-Za-z_]\w*)+)")
PATH = re.compile(r"(?<![\w./-])((?:pipeline|models|launch|benchmarks|tests|configs|ds_configs|studies)/[\w./-]*\w)(?![\w{*<./-])")


def _top_names(path: Path) -> dict[str, ast.AST]:
    names = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names[node.name] = node
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                if isinstance(target, ast.Name):
                    names[target.id] = node
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update({(a.asname or a.name).split(".")[0]: node for a in node.names})
    return names


def _class_names(node: ast.ClassDef) -> set[str]:
    names = set()
    for item in node.body:
        if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(item.name)
        elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
            names.add(item.target.id)
        elif isinstance(item, ast.Assign):
            names |= {t.id for t in item.targets if isinstance(t, ast.Name)}
    return names


def _resolves(dotted: str) -> bool:
    """Whether ``dotted`` names a module, package, or a name defined in one (and, for a class, its member)."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        base = REPO.joinpath(*parts[:cut])
        module = base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"
        if module.is_file():
            rest = parts[cut:]
            break
    else:
        return False
    if not rest:
        return True
    names = _top_names(module)
    if rest[0] not in names:
        return False
    node = names[rest[0]]
    return len(rest) == 1 or not isinstance(node, ast.ClassDef) or rest[1] in _class_names(node)


def _cited(text: str) -> tuple[set[str], set[str]]:
    dotted = {m.rstrip(".") for m in DOTTED.findall(text)}
    paths = set(PATH.findall(text))
    return dotted, paths


def _sources() -> list[Path]:
    files = [REPO / f for f in DOC_FILES if (REPO / f).is_file()]
    for folder in CODE_DIRS:
        files += sorted((REPO / folder).rglob("*.py")) + sorted((REPO / folder).rglob("*.md"))
    return [f for f in files if f.resolve() != Path(__file__).resolve()]  # this file cites stale names on purpose


def test_every_cited_name_and_path_exists():
    stale = []
    for source in _sources():
        dotted, paths = _cited(source.read_text())
        where = source.relative_to(REPO)
        stale += [f"{where}: {name}" for name in sorted(dotted) if not _resolves(name)]
        stale += [f"{where}: {path}" for path in sorted(paths)
                  if not (REPO / path).exists() and not (source.parent / path).exists()]  # or a link beside it
    assert not stale, "names or paths that do not exist (moved or renamed?):\n" + "\n".join(stale)


def test_the_citation_check_catches_stale_names():
    """The check itself, against names known to exist and to be gone."""
    assert _resolves("pipeline.distributed.engine.build_engine")
    assert _resolves("pipeline.data.dataset.CocoDetection.missing_files")
    assert _resolves("pipeline.data")
    assert not _resolves("pipeline.engine.fill_ds_config")  # cited once, never defined there
    assert not _resolves("pipeline.data.dataset.CocoDetection.no_such_method")
    assert not _resolves("pipeline.build.log_dist")
    dotted, paths = _cited("see ``pipeline.checkpoint.manager.save``; pipeline/trainer.py, runs/x.py, "
                           "https://example.org/pipeline/x.py and ds_configs/zero{stage}_fp32.json")
    assert dotted == {"pipeline.checkpoint.manager.save"} and paths == {"pipeline/trainer.py"}


# ---- the wheel ----

def test_wheel_holds_every_module(tmp_path):
    """``pip wheel`` of the project (what a non-editable install gets) contains every module of the tree."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        (source / name).write_bytes((REPO / name).read_bytes())
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            target = source / path.relative_to(REPO)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path / "out"),
                           str(source)], capture_output=True, text=True, timeout=600)
    if done.returncode and "No matching distribution" in done.stderr:
        pytest.skip(f"no package index for the build backend: {done.stderr[-300:]}")
    assert done.returncode == 0, done.stderr[-2000:]
    wheel, = (tmp_path / "out").glob("*.whl")
    packed = {n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".py")}
    tree = {str(p.relative_to(REPO)) for package in PACKAGES for p in (REPO / package).rglob("*.py")}
    assert tree - packed == set(), f"modules missing from the wheel: {sorted(tree - packed)}"
