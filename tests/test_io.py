"""spikemar._io's checks of an output location and its atomic write's errors: one message that
names the argument and the file (never the temporary beside it), nothing left behind."""

from __future__ import annotations

import errno
import os

import pytest

from spikemar._io import atomic_write, check_output_folder, check_output_path


def test_check_output_folder_makes_nothing_and_names_a_file_in_the_way(tmp_path):
    """spikemar eval checks --out before any scoring but makes it only when the results are
    written (a run that then failed left an empty folder behind); check_output_path, which
    makes the folder, shares its walk up to the nearest existing folder."""
    deep = tmp_path / "a" / "b"
    assert check_output_folder(deep, name="--out") == deep
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "taken").write_text("x")
    inside = tmp_path / "taken" / "sub"
    with pytest.raises(NotADirectoryError) as err:
        check_output_folder(inside, name="--out")
    assert str(err.value) == (f"--out: cannot write in {str(inside)!r}: "
                              f"{str(tmp_path / 'taken')!r} is a file, not a folder")  # fmt: skip
    with pytest.raises(NotADirectoryError) as err:
        check_output_path(inside / "r.json", name="--json")
    assert str(err.value) == (f"--json: cannot write {str(inside / 'r.json')!r}: "
                              f"{str(tmp_path / 'taken')!r} is a file, not a folder")  # fmt: skip
    assert check_output_path(deep / "r.json").parent.is_dir()  # this one makes the folder


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes in any folder")
def test_check_output_folder_names_the_folder_that_refuses_files(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        for check in (check_output_folder, lambda p, name: check_output_path(p / "f", name=name)):
            with pytest.raises(PermissionError, match=rf"^--out: the folder {str(locked)!r} is "
                                                      "not writable$"):  # fmt: skip
                check(locked / "new", name="--out")
    finally:
        locked.chmod(0o700)


def _fails(err: BaseException):
    def write(tmp):
        tmp.write_bytes(b"half")
        raise err

    return write


@pytest.mark.parametrize(
    "raised",
    [
        # h5py's message names the temporary file; the errno's text does not
        OSError(errno.ENOSPC, "Unable to synchronously create file (name = '.x.tmp')"),
        OSError(errno.EFBIG, "File too large"),
    ],
)
def test_a_named_atomic_write_that_fails_is_one_oserror_naming_the_target(tmp_path, raised):
    target = tmp_path / "net.h5"
    with pytest.raises(OSError) as err, atomic_write(target, name="path") as tmp:
        _fails(raised)(tmp)
    assert str(err.value) == f"path: cannot write {str(target)!r} ({os.strerror(raised.errno)})"
    assert err.value.errno == raised.errno and err.value.__cause__ is raised
    assert list(tmp_path.iterdir()) == []


def test_a_writer_that_wraps_the_oserror_is_named_too(tmp_path):
    """torch's zip writer raises RuntimeError('... unexpected pos ...') from the file's OSError
    (a full disk under save_checkpoint)."""
    target = tmp_path / "model.pt"
    with pytest.raises(OSError) as err, atomic_write(target, name="checkpoint") as tmp:
        try:
            _fails(OSError(errno.ENOSPC, "No space left on device"))(tmp)
        except OSError as cause:
            raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos") from cause
    assert str(err.value) == f"checkpoint: cannot write {str(target)!r} (No space left on device)"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "raised", [RuntimeError("a bug"), ValueError("x: bad"), KeyboardInterrupt()]
)
def test_a_named_atomic_write_passes_other_errors_and_removes_its_temporary(tmp_path, raised):
    """Only a write's failure is renamed: a writer's own error, and Ctrl-C, pass unchanged (and
    without a name an OSError does too)."""
    target = tmp_path / "x.json"
    target.write_text("old")
    with pytest.raises(type(raised)) as err, atomic_write(target, name="path") as tmp:
        _fails(raised)(tmp)
    assert err.value is raised
    disk = OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(OSError) as err, atomic_write(target) as tmp:
        _fails(disk)(tmp)
    assert err.value is disk
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"] and target.read_text() == "old"


def test_a_named_atomic_write_that_writes_nothing_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"^path: nothing was written for "):
        with atomic_write(tmp_path / "x.json", name="--json"):
            pass


@pytest.mark.parametrize(
    ("raised", "kind"),
    [
        (errno.ENOSPC, OSError),  # a full disk: the machine's
        (errno.EDQUOT, OSError),
        (errno.EIO, OSError),
        (errno.EACCES, PermissionError),  # a folder that refuses files: the user's to mend
        (errno.EROFS, PermissionError),
    ],
)
def test_check_output_path_keeps_the_errno_of_a_folder_it_cannot_make(tmp_path, monkeypatch,
                                                                       raised, kind):  # fmt: skip
    """A full disk under the folder's making was a PermissionError without errno: a usage
    error (exit 2) instead of a failed run."""
    from pathlib import Path

    from spikemar._argtypes import is_machine_failure

    def mkdir(self, *args, **kwargs):
        raise OSError(raised, os.strerror(raised), str(self))

    monkeypatch.setattr(Path, "mkdir", mkdir)
    folder = tmp_path / "new"
    with pytest.raises(OSError) as err:
        check_output_path(folder / "r.json", name="--json")
    assert str(err.value) == (f"--json: cannot create the folder {str(folder)!r} "
                              f"({os.strerror(raised)})")  # fmt: skip
    assert err.value.errno == raised and isinstance(err.value, kind)
    assert is_machine_failure(err.value) == (kind is not PermissionError)


def test_a_named_write_that_the_folder_refuses_stays_a_permission_error(tmp_path):
    """A mistake in the input (another folder mends it), not a failed run; the errno kept."""
    target = tmp_path / "r.json"
    for raised in (errno.EACCES, errno.EROFS):
        with pytest.raises(PermissionError) as err, atomic_write(target, name="--json") as tmp:
            _fails(OSError(raised, os.strerror(raised)))(tmp)
        assert str(err.value) == f"--json: cannot write {str(target)!r} ({os.strerror(raised)})"
        assert err.value.errno == raised
    assert list(tmp_path.iterdir()) == []


def test_cannot_write_names_the_file_whoever_wrote_it(tmp_path):
    """A command's name for a write that a writer named otherwise (a report's save_png: 'path:'),
    or through its temporary file (h5py's message): the errno's text, the errno and the kind."""
    from spikemar._io import cannot_write

    target = tmp_path / "r.png"
    for raised, kind in [(OSError(errno.ENOSPC, "name = '.r.png.1.ab.tmp'"), OSError),
                         (OSError(errno.EROFS, "Read-only file system"), PermissionError),
                         (OSError("no errno"), OSError)]:  # fmt: skip
        named = cannot_write(raised, target, "--png")
        why = os.strerror(raised.errno) if raised.errno else "no errno"
        assert str(named) == f"--png: cannot write {str(target)!r} ({why})"
        assert named.errno == raised.errno and type(named) is kind
