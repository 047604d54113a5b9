"""How much a call raises the process's peak resident memory, for tests of loading memory."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest

# Linux resets the peak (VmHWM) on writing 5 to /proc/self/clear_refs
needs_peak_reset = pytest.mark.skipif(
    not os.access("/proc/self/clear_refs", os.W_OK),
    reason="needs Linux's /proc/self/clear_refs to reset the peak resident memory",
)


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(key))
    return int(line.split()[1]) * 1024


def peak_growth(call: Callable[[], Any]) -> tuple[int, Any]:
    """(bytes the peak resident memory rises above the resident memory while ``call()`` runs,
    its result)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status("VmRSS:")
    result = call()
    return _status("VmHWM:") - before, result
