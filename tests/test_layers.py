"""The layers hold at run time as well as in the import graph: each torch-free module, imported
alone in a fresh interpreter, leaves torch unimported; and the contracts `lint-imports` checks
do fail when a torch import is added to a torch-free module."""

from __future__ import annotations

import pkgutil
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import clicooper_bus

ROOT = Path(clicooper_bus.__file__).resolve().parent
WINGS = ("net", "tlog", "chain", "protocol")
TOP = ("protocol", "layout", "config", "plan", "errors", "telemetry")


def torch_free_modules() -> list[str]:
    names = [f"clicooper_bus.{m}" for m in TOP]
    for wing in WINGS:
        names += [f"clicooper_bus.{wing}.{m.name}"
                  for m in pkgutil.iter_modules([str(ROOT / wing)])]
    return names


def _source(name: str) -> Path:
    """The file of module `name`: a module's .py, or a package's __init__.py."""
    path = ROOT.parent / name.replace(".", "/")
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def test_the_torch_free_list_is_the_tree():
    mods = torch_free_modules()
    assert len(mods) >= 25, mods  # every wing's modules were found
    for name in mods:
        assert _source(name).is_file(), name


def test_each_torch_free_module_imports_without_torch():
    code = ("import importlib, sys\n"
            "bad = []\n"
            "for name in sys.argv[1:]:\n"
            "    importlib.import_module(name)\n"
            "    if 'torch' in sys.modules or 'clicooper_bus.ml' in sys.modules:\n"
            "        bad.append(name); break\n"
            "print(bad)\n")
    # one interpreter per module: an earlier import must not hide a later one's torch import
    for name in torch_free_modules():
        out = subprocess.run([sys.executable, "-c", code, name], capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "[]", f"{name} imported torch or ml/"


def test_the_contracts_catch_a_torch_import_in_a_wing(tmp_path):
    lint = Path(sys.executable).with_name("lint-imports")
    if not lint.exists():
        pytest.skip("lint-imports is not installed (pip install -e '.[dev]')")
    copy = tmp_path / "repo"
    shutil.copytree(ROOT, copy / "clicooper_bus", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT.parent / "pyproject.toml", copy / "pyproject.toml")
    ok = subprocess.run([str(lint)], cwd=copy, capture_output=True, text=True, timeout=120,
                        env={"PYTHONPATH": str(copy), "PATH": "/usr/bin:/bin"})
    assert ok.returncode == 0, ok.stdout + ok.stderr
    codec = copy / "clicooper_bus" / "net" / "codec.py"
    codec.write_text(codec.read_text() + "\n\ndef _leak():\n    import torch  # noqa\n")
    broken = subprocess.run([str(lint)], cwd=copy, capture_output=True, text=True, timeout=120,
                            env={"PYTHONPATH": str(copy), "PATH": "/usr/bin:/bin"})
    assert broken.returncode != 0
    assert "clicooper_bus.net.codec -> torch" in broken.stdout, broken.stdout
