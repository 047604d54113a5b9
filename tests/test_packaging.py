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


def test_import_spikemar_is_light_and_names_its_sub_packages_on_first_use():
    import subprocess
    import sys

    code = (
        "import sys, spikemar\n"
        "assert 'torch' not in sys.modules and 'spikemar.energy' not in sys.modules\n"
        "assert spikemar.energy.profile is sys.modules['spikemar.energy'].profile\n"
        "assert 'models' in dir(spikemar) and spikemar.__all__ == ['__version__']\n"
        "try:\n    spikemar.enrgy\nexcept AttributeError as err:\n    print(err)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "module 'spikemar' has no attribute 'enrgy'"


def test_every_sub_package_the_top_docstring_names_exists_with_its_public_names():
    spikemar = importlib.import_module("spikemar")
    names = "neurons ssm models energy counting viz distill training data tokenizer".split()
    names += "checkpoint convert hardware eval refine".split()
    assert set(names) <= set(dir(spikemar))
    for name in names:
        assert f"``{name}``" in spikemar.__doc__, name
        module = getattr(spikemar, name)
        missing = [n for n in module.__all__ if not hasattr(module, n)]
        assert not missing, f"spikemar.{name}.__all__ names what it lacks: {missing}"
