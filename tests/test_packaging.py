"""What a regular (non-editable) install carries: every data file the package reads at run time
(C and CUDA sources built on first use, the packaged checkpoints, the offline lm_eval tasks) is
declared in pyproject.toml's package-data, and the console scripts point at functions that exist.
An editable install reads the source tree and would hide a missing declaration."""

from __future__ import annotations

import fnmatch
import importlib
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def test_every_data_file_of_the_package_is_declared():
    patterns = PYPROJECT["tool"]["setuptools"]["package-data"]["spikemar"]
    package = REPO / "spikemar"
    data = [
        p.relative_to(package).as_posix()
        for p in package.rglob("*")
        if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts
    ]
    assert data, "the package has data files (C sources, checkpoints, tasks)"
    undeclared = [f for f in data if not any(fnmatch.fnmatch(f, pat) for pat in patterns)]
    assert not undeclared, f"add to [tool.setuptools.package-data]: {undeclared}"


def test_console_scripts_point_at_functions():
    for name, target in PYPROJECT["project"]["scripts"].items():
        module, _, function = target.partition(":")
        assert callable(getattr(importlib.import_module(module), function)), name
