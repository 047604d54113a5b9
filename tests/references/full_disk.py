"""A full disk in a test: a file-size limit (``RLIMIT_FSIZE``) makes every write past it fail
with EFBIG ("File too large"), as writes to a full disk fail with ENOSPC; both are
``spikemar._argtypes.is_machine_failure``. It is the process's own limit, so the test's other
files (the corpus, a checkpoint) are made before it and read under it."""

from __future__ import annotations

import contextlib
import resource
import signal
from collections.abc import Iterator


@contextlib.contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """Writes past ``limit`` bytes fail with EFBIG (SIGXFSZ, which would end the process, is
    ignored), until the block ends."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
