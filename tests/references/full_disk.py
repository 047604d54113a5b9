"""A full disk in a test: a file-size limit (``RLIMIT_FSIZE``) makes every write past it fail
with EFBIG ("File too large"), as writes to a full disk fail with ENOSPC; both are
``spikemar._argtypes.is_machine_failure``. It is the process's own limit, so the test's other
files (the corpus, a checkpoint) are made before it and read under it. HDF5 that finds the disk
full under its own writes crashes the process (SIGSEGV) closing the file, under this limit and
on a real full disk: spikemar makes its netx and NIR files in memory and writes the bytes, and a
test of an HDF5 write runs in a process of its own."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
from collections.abc import Iterator
from pathlib import Path

# the CPU kernels' cache as it was when the tests were collected, before a fixture moved HOME
# into tmp_path (``corpus``): built there once per machine, not once per test
KERNELS = os.environ.get("SPIKEMAR_CACHE_DIR") or str(Path.home() / ".cache" / "spikemar")


def _build_kernels() -> None:
    """Build and load the CPU kernels a command may need (once per process): one first needed
    under the limit fails to build (the compiler's output is cut short) and stays unusable for
    the rest of the test session, whose later tests then run the torch path instead."""
    from spikemar.models import fused_step
    from spikemar.neurons import cpu_backend
    from spikemar.ssm import fast, linear

    previous = os.environ.get("SPIKEMAR_CACHE_DIR")
    os.environ["SPIKEMAR_CACHE_DIR"] = KERNELS
    try:
        cpu_backend.usable()
        fast.usable()
        for library in (linear._LIBRARY, fused_step._LIBRARY):  # every KernelLibrary of spikemar
            library.usable()
    finally:
        if previous is None:
            del os.environ["SPIKEMAR_CACHE_DIR"]
        else:
            os.environ["SPIKEMAR_CACHE_DIR"] = previous


@contextlib.contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """Writes past ``limit`` bytes fail with EFBIG (SIGXFSZ, which would end the process, is
    ignored), until the block ends; the CPU kernels are built before."""
    _build_kernels()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
