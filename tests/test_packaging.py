"""The folder tree is the architecture: what installs where, and which parts may import which."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]


def _package_folders() -> dict[str, Path]:
    """Installed package name -> source folder, from pyproject's package-dir mapping."""
    mapping = SETUPTOOLS.get("package-dir", {})
    out = {}
    for name in SETUPTOOLS["packages"]:
        parts = name.split(".")
        for i in range(len(parts), 0, -1):
            root = ".".join(parts[:i])
            if root in mapping:
                out[name] = REPO / mapping[root] / Path(*parts[i:])
                break
        else:
            out[name] = REPO / Path(*parts)
    return out


def test_every_package_folder_is_installed():
    listed = {folder.resolve() for folder in _package_folders().values()}
    for top in ("steer", "training", "service", "ui"):
        for init in (REPO / top).rglob("__init__.py"):
            assert init.parent.resolve() in listed, f"{init.parent.relative_to(REPO)} is not in pyproject's packages"
    for name, folder in _package_folders().items():
        assert (folder / "__init__.py").is_file(), f"{name} -> {folder} has no __init__.py"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_the_core_library_imports_no_application_layer():
    """Apart from its command line, steer/ imports nothing from training, service or ui."""
    layers = ("steer.training", "steer.service", "steer.ui", "training", "service", "ui")
    offenders = []
    for path in (REPO / "steer").rglob("*.py"):
        if path.parent == REPO / "steer" / "cli":
            continue
        bad = [m for m in _imports(path) if any(m == layer or m.startswith(layer + ".") for layer in layers)]
        if bad:
            offenders.append(f"{path.relative_to(REPO)}: {sorted(bad)}")
    assert not offenders, "\n".join(offenders)


def test_contracts_import_without_torch():
    """steer.core (schema, conversation, template, artifacts, errors) loads without torch, so a
    client, a validator or a game tool can use it on its own."""
    code = ("import sys, steer.core.attributes, steer.core.conversation, steer.core.template, "
            "steer.core.artifacts, steer.core.errors; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
