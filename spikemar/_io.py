"""Writing files so that nothing half-written is ever seen and nothing is left behind.

:func:`atomic_write` is the one way spikemar writes a file that someone may read while it is
being written, or that an interrupted run must not corrupt (checkpoints, token caches, netx and
NIR exports, manifests, the compiled CPU kernel, figures): the content goes to a temporary file
in the target's folder, is flushed to disk, given the permissions a plain ``open()`` would give
it (``tempfile.mkstemp`` makes files 0600), and renamed over the target in one ``os.replace``.
A reader sees the old file or the new one, whole.

The temporary name is ``.<name>.<pid>.<random>.tmp``. An exception, Ctrl-C or SIGTERM (as an
exception: the training loop and the ``spikemar`` command turn it into one) removes it; a kill -9
cannot, so the next write to the same target, and the start of a training run, remove the
temporaries of that target whose process is gone (:func:`remove_stale_temporaries`). A live
process's temporary is never touched, so two runs on one folder do not delete each other's work.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "Terminated",
    "atomic_write",
    "cannot_write",
    "check_output_folder",
    "check_output_path",
    "file_mode",
    "remove_stale_temporaries",
    "sigterm_as_interrupt",
    "write_failures_named",
]


def file_mode(executable: bool = False) -> int:
    """The mode a plain ``open(path, 'w')`` (or, ``executable``, a compiler) gives a new file
    under the current umask."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if executable else 0o666) & ~mask


def _temporary_name(target: Path) -> Path:
    return target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temporaries(target: str | os.PathLike) -> list[Path]:
    """Remove the temporary files that interrupted writes of ``target`` left behind (their
    process is gone); return what was removed. A missing folder is nothing to clean."""
    target = Path(target)
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(\d+)\.[0-9a-f]+\.tmp$")
    removed = []
    try:
        entries = list(target.parent.iterdir())
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return removed
    for entry in entries:
        match = pattern.match(entry.name)
        if match and not _process_alive(int(match.group(1))):
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
                removed.append(entry)
    return removed


def check_output_folder(
    folder: str | os.PathLike, *, name: str = "path", file: str | os.PathLike | None = None
) -> Path:
    """Fail before any work if files cannot be written in ``folder``, creating nothing (a run
    that then failed would leave an empty folder behind): the nearest of ``folder`` and its
    parents that exists must be a folder one may write in; the rest is made when the output is
    written. ``name`` is the argument the message names (``--out``); ``file``, the file to be
    written there, which the message names instead of the folder."""
    folder = Path(folder)
    for ancestor in (folder, *folder.parents):
        if ancestor.exists():
            if not ancestor.is_dir():
                what = repr(str(file)) if file is not None else f"in {str(folder)!r}"
                raise NotADirectoryError(
                    f"{name}: cannot write {what}: {str(ancestor)!r} is a file, not a folder"
                )
            if not os.access(ancestor, os.W_OK | os.X_OK):
                raise PermissionError(f"{name}: the folder {str(ancestor)!r} is not writable")
            break
    return folder


def check_output_path(path: str | os.PathLike, *, name: str = "path") -> Path:
    """Fail before any work if ``path`` cannot be written as a file: it is a folder, a folder
    above it is a file, or the folder it would go in is not writable
    (:func:`check_output_folder`). Creates the parent folders. ``name`` is the argument the
    message names (``--out``)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{name}: {str(path)!r} is a folder; expected a file path")
    parent = check_output_folder(path.parent, name=name, file=path)
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _renamed(err, f"{name}: cannot create the folder {str(parent)!r}") from err
    return path


# a folder that refuses files: the user's to mend (another path, permissions), not the machine's
_REFUSED = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})


def reworded(err: OSError, message: str) -> OSError:
    """``OSError(message)`` with ``err``'s errno: a command's own wording of a failed write or
    folder that keeps a full disk ``spikemar._argtypes.is_machine_failure`` (a failed run)."""
    failed = OSError(message)
    failed.errno = err.errno
    return failed


def _renamed(err: OSError, message: str) -> OSError:
    """``err`` said as ``message (reason)``, keeping what tells a mistake in the input from a
    failed run: its errno (a full disk stays ``is_machine_failure``) and its kind, a
    PermissionError for a folder that refuses files (EROFS included, which Python leaves a
    plain OSError)."""
    why = os.strerror(err.errno) if err.errno else str(err)  # not a temporary file's name
    kind = PermissionError if err.errno in _REFUSED else type(err)
    try:
        renamed = kind(f"{message} ({why})")
    except TypeError:  # a library's OSError subclass with a constructor of its own
        renamed = OSError(f"{message} ({why})")
    renamed.errno = err.errno
    return renamed


def cannot_write(err: OSError, path: str | os.PathLike, name: str) -> OSError:
    """``err``, a failed write of ``path``, as ``OSError("NAME: cannot write 'PATH' (reason)")``
    with its errno (a full disk stays ``spikemar._argtypes.is_machine_failure``), a
    PermissionError where the folder refuses the file. For a command to raise ``from err`` where
    a writer named the file otherwise, or not at all."""
    return _renamed(err, f"{name}: cannot write {str(path)!r}")


@contextlib.contextmanager
def write_failures_named(path: str | os.PathLike, name: str | None) -> Iterator[None]:
    """Within the block, an OSError (also one that a writer raised as the cause of its own
    error: torch's zip writer's RuntimeError "unexpected pos") is one OSError
    ``"NAME: cannot write 'PATH' (reason)"``, with its errno (a full disk stays
    ``spikemar._argtypes.is_machine_failure``), a PermissionError where the folder refuses the
    file; without ``name``, errors pass unchanged. :func:`atomic_write` does this for its
    block; a command wraps in it a writer that takes no name (a report's ``save_png``)."""
    if name is None:
        yield
        return
    try:
        yield
    except (OSError, RuntimeError) as err:
        cause = err if isinstance(err, OSError) else err.__cause__ or err.__context__
        if not isinstance(cause, OSError):
            raise
        # the errno's text: some writers' messages name the temporary file (h5py's), not path
        raise cannot_write(cause, path, name) from err


@contextlib.contextmanager
def atomic_write(
    path: str | os.PathLike,
    *,
    fsync: bool = True,
    executable: bool = False,
    name: str | None = None,
) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without an exception, the
    file written there replaces ``path`` in one rename (old or new, never half). Parent folders
    are created; the file gets the usual permissions; on any exception (Ctrl-C included) the
    temporary is removed and ``path`` is left as it was. ``fsync``: flush the data to disk
    before the rename, so that a power cut also leaves old or new. ``executable``: the mode of
    a compiled library (0o777 under the umask). ``name``: the argument that gave ``path``; a
    write that fails (a full disk, a folder that refuses files) is then one
    ``OSError("NAME: cannot write 'PATH' (reason)")``, whatever the writer in the block said."""
    path = Path(path)
    with write_failures_named(path, name):
        path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = _temporary_name(path)
    try:
        with write_failures_named(path, name):
            yield tmp
        if not tmp.is_file():
            raise FileNotFoundError(f"path: nothing was written for {str(path)!r}")
        with write_failures_named(path, name):
            os.chmod(tmp, file_mode(executable))
            if fsync:
                fd = os.open(tmp, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised as an exception (as Ctrl-C is) so that a run saves and cleans up."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` (a ``KeyboardInterrupt``) instead
    of ending the process at once, so that ``finally`` blocks and Ctrl-C handlers run: an
    interrupted save removes its temporary file, a training run saves its state. Only in the
    main thread (Python delivers signals there); elsewhere the block runs unchanged."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
