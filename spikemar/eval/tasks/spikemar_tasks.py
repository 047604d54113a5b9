"""Dataset loaders of spikemar's local lm_eval tasks (``custom_dataset: !function ...``).

lm_eval resolves ``data_files`` against the working directory; these functions find the JSONL
beside this file instead, so the tasks run from anywhere (``HF_DATASETS_OFFLINE=1`` is enough:
the ``json`` builder ships with ``datasets``). lm_eval passes the task's ``metadata`` and
``dataset_kwargs`` as keyword arguments; none are needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def _load(task: str) -> Any:
    import datasets

    return datasets.load_dataset("json", data_files={"test": str(HERE / f"{task}.jsonl")})


def nextline(**_: Any) -> Any:
    return _load("shakespeare_nextline")


def speaker(**_: Any) -> Any:
    return _load("shakespeare_speaker")


def rolling(**_: Any) -> Any:
    return _load("shakespeare_rolling")
