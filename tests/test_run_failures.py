"""A full disk under each command that writes (a file-size limit stands in for it: EFBIG, as a
full disk's ENOSPC; ``references.full_disk``): one line naming the output option and the file
with the reason, exit 1 as for a failed run (train and distill's rule), never a usage error with
"(see ... --help)"; and nothing half-written left behind. A command that should succeed first
runs once without the limit."""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

import pytest
from references.full_disk import KERNELS, file_size_limit

from spikemar import cli
from spikemar._argtypes import is_machine_failure
from spikemar.checkpoint import build_model, save_checkpoint
from spikemar.data import prepare
from spikemar.tokenizer import CharTokenizer

SSM = {"d_model": 16, "n_layers": 1, "d_state": 4, "head_dim": 8}


@pytest.fixture
def home(corpus, monkeypatch):
    """The corpus (HOME, and so the token cache, in tmp_path), with the CPU kernels' usual
    cache: not a fresh one in which each test process builds them again."""
    monkeypatch.setenv("SPIKEMAR_CACHE_DIR", KERNELS)
    return corpus


def _checkpoint(corpus: Path, model: str) -> Path:
    tokenizer = CharTokenizer.from_text(corpus.read_text())
    config = {"vocab_size": tokenizer.vocab_size, **SSM}
    return save_checkpoint(corpus.parent / f"{model}.pt", build_model(model, config), tokenizer)


def _failed_run(argv: list[str], capsys, limit: int | None = None) -> str:
    """Run ``spikemar ARGV`` (under a file-size limit of ``limit`` bytes): exit 1 and one line,
    which is returned."""
    capsys.readouterr()
    with file_size_limit(limit) if limit else contextlib.nullcontext():
        code = cli.main(argv)
    err = capsys.readouterr().err.splitlines()
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith(f"spikemar {argv[0]}: error: ") and "--help" not in err[0], err
    return err[0]


def test_a_full_disk_under_the_token_cache_names_its_file_and_leaves_nothing(corpus, tmp_path):
    """It read '[Errno 27] File too large', naming no file."""
    cache = tmp_path / "cache"
    with file_size_limit(1024), pytest.raises(OSError) as err:
        prepare(corpus, cache)  # train.bin: ~4.3 kB of uint16 tokens
    message = str(err.value)
    assert message.startswith(f"token cache: cannot write '{cache}")
    assert message.endswith("train.bin' (File too large)") and is_machine_failure(err.value)
    assert [p for p in cache.rglob("*") if p.is_file()] == []
    folder = prepare(corpus, cache)  # the same cache, whole, once there is room
    assert sorted(p.name for p in folder.iterdir()) == ["meta.json", "train.bin", "val.bin"]


def test_a_token_cache_that_fails_part_way_removes_the_files_it_wrote(corpus, tmp_path):
    """train.bin and val.bin were left without the meta.json that makes them a cache."""
    folder = prepare(corpus, tmp_path / "first")
    cache = tmp_path / "cache"
    (cache / folder.name / "meta.json").mkdir(parents=True)  # meta.json cannot be written
    with pytest.raises(OSError, match=r"^token cache: cannot write '.*meta\.json' "):
        prepare(corpus, cache)
    assert [p.name for p in (cache / folder.name).iterdir()] == ["meta.json"]


def test_train_with_a_full_disk_under_the_token_cache_is_a_failed_run(home, capsys):
    err = _failed_run(["train", "--data", str(home), "--out", str(home.parent / "m.pt"),
                       "--steps", "1", "--no-progress"], capsys, 1024)  # fmt: skip
    assert "token cache: cannot write '" in err and "train.bin' (File too large)" in err


def test_convert_with_a_full_disk_names_out(home, tmp_path, capsys):
    source = _checkpoint(home, "mar-dense")
    argv = ["convert", "--from", str(source), "--data", str(home), "--calib-batches", "1",
            "--eval-batches", "1", "--batch-size", "2", "--L", "16"]  # fmt: skip
    out = tmp_path / "full" / "s.pt"
    err = _failed_run([*argv, "--out", str(out)], capsys, 8192)  # the token cache fits
    assert err.endswith(f"--out: cannot write {str(out)!r} (File too large)")
    assert list(out.parent.iterdir()) == []


# run in a process of its own: HDF5 that found the disk full under its own writes crashed the
# process (SIGSEGV) closing the file, under a real full disk too (a 64 kB tmpfs: the NIR export)
_EXPORT_UNDER_THE_LIMIT = """
import sys
sys.path.insert(0, sys.argv[1])
from references.full_disk import file_size_limit
from spikemar import cli
with file_size_limit(4096):
    flags = zip(("--lava", "--nir"), sys.argv[2:])
    print([cli.main(["export", flag, path]) for flag, path in flags])
"""


def test_export_with_a_full_disk_names_the_file_and_does_not_crash(tmp_path):
    """The netx and NIR files are made in memory and written as bytes: it crashed (SIGSEGV),
    leaving the temporary file, after the error line (NIR) or before it (netx)."""
    import subprocess
    import sys

    lava, nir = tmp_path / "d.h5", tmp_path / "d.nir"
    tests = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": str(tests.parent)}
    ran = subprocess.run([sys.executable, "-c", _EXPORT_UNDER_THE_LIMIT, str(tests), str(lava),
                          str(nir)], env=env, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert ran.returncode == 0 and ran.stdout.splitlines()[-1] == "[1, 1]", ran.stderr
    assert ran.stderr.splitlines() == [
        f"spikemar export: error: {flag}: cannot write {str(out)!r} (File too large)"
        for flag, out in (("--lava", lava), ("--nir", nir))
    ]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("where", ["segment", "manifest"])
def test_a_language_model_export_on_a_full_disk_leaves_no_folder(where, home, tmp_path, capsys,
                                                                 monkeypatch):  # fmt: skip
    """A folder of segments without the manifest.json that makes them an export was left: the
    folder the run made goes. A segment's write names its file, and so does manifest.json's
    (it was '[Errno 28] No space left on device', then --lava's folder)."""
    argv = ["export", "--checkpoint", str(_checkpoint(home, "mar"))]
    out = tmp_path / "full"
    if where == "segment":  # segments of 39 to 52 kB: the largest fails, after others
        err = _failed_run([*argv, "--lava", str(out)], capsys, 45_000)
    else:
        monkeypatch.setattr(Path, "write_text", _full_disk_at(".manifest.json.", Path.write_text))
        err = _failed_run([*argv, "--lava", str(out)], capsys)
    named = f"{out}/" if where == "segment" else f"{out}/manifest.json'"
    why = "File too large" if where == "segment" else "No space left on device"
    assert f"--lava: cannot write '{named}" in err and err.endswith(f" ({why})")
    assert not out.exists()


def _full_disk_at(prefix, write_text):
    """``Path.write_text`` that finds the disk full writing a file whose name starts with
    ``prefix`` (an atomic write's temporary), the others written as usual."""

    def write(self, *args, **kwargs):
        if self.name.startswith(prefix):
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_text(self, *args, **kwargs)

    return write


@pytest.mark.parametrize(("flag", "name"), [("--json", "r.json"), ("--png", "r.png")])
def test_energy_with_a_full_disk_names_the_report(flag, name, tmp_path, capsys):
    argv = ["energy", "--model", "demo", "--d", "16", "--layers", "1", "--random-tokens", "4"]
    assert cli.main(argv) == 0
    out = tmp_path / name
    err = _failed_run([*argv, flag, str(out)], capsys, 4096)
    assert err.endswith(f"{flag}: cannot write {str(out)!r} (File too large)")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("limit", "fails", "written"), [
    (512, "perplexity.json", []),
    (4096, "perplexity.png", ["perplexity.json", "perplexity.md"]),
])  # fmt: skip
def test_eval_with_a_full_disk_names_out_and_what_it_wrote(home, tmp_path, capsys, limit,
                                                           fails, written):  # fmt: skip
    argv = ["eval", "--checkpoint", str(_checkpoint(home, "mar-dense")), "--text", str(home),
            "--no-energy"]  # fmt: skip
    assert cli.main([*argv, "--out", str(tmp_path / "ok")]) == 0
    out = tmp_path / "full"
    err = _failed_run([*argv, "--out", str(out)], capsys, limit)
    told = f"--out: cannot write {str(out / fails)!r} (File too large)"
    if written:
        told += "; wrote only " + ", ".join(str(out / name) for name in written)
    assert err.endswith(told)
    assert sorted(p.name for p in out.iterdir()) == written


def test_eval_that_cannot_make_out_on_a_full_disk_is_a_failed_run(home, tmp_path, capsys,
                                                                 monkeypatch):  # fmt: skip
    """The folder is made after the scoring: its OSError lost the errno (exit 2)."""
    out = tmp_path / "full"
    make = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if self == out:
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return make(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    err = _failed_run(["eval", "--checkpoint", str(_checkpoint(home, "mar-dense")), "--text",
                       str(home), "--no-energy", "--out", str(out)], capsys)  # fmt: skip
    assert err.endswith(f"--out: cannot make the folder {str(out)!r} (No space left on device)")


@pytest.mark.parametrize("command", [["raster"], ["demo", "--max-new-tokens", "4"]])
def test_a_figure_on_a_full_disk_names_out(command, tmp_path, capsys):
    """It read '[Errno 27] File too large', naming no file."""
    out = tmp_path / "fig.png"
    err = _failed_run([*command, "--out", str(out)], capsys, 4096)
    assert err.endswith(f"--out: cannot write {str(out)!r} (File too large)")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("limit", "fails"), [
    (1024, r"measurements(\.partial)?\.json"),  # the first write: the teacher's table
    (None, r"plan\.json"),  # Plan.save named no file: '[Errno 28] No space left on device'
    (16384, r"init\.pt"),  # the planned student, by save_checkpoint ('checkpoint: ...')
])  # fmt: skip
def test_refine_with_a_full_disk_names_out(home, tmp_path, capsys, monkeypatch, limit, fails):
    """It read '[Errno 27] File too large' (the tables, plan.json) or 'checkpoint: cannot write'
    (the students), naming no option."""
    import re

    import torch

    from spikemar.data import TokenDataset
    from spikemar.models import MARLM, MARConfig

    if limit is None:  # plan.json is smaller than the table before it: a full disk there
        monkeypatch.setattr(Path, "write_text", _full_disk_at(".plan.json.", Path.write_text))
    tokenizer = CharTokenizer.from_text(home.read_text())
    torch.manual_seed(0)
    config = MARConfig(vocab_size=tokenizer.vocab_size, **SSM)
    teacher = save_checkpoint(tmp_path / "teacher.pt", MARLM(config.dense()), tokenizer)
    TokenDataset.from_text_file(home)  # the token cache, before the limit
    out = tmp_path / "out"
    capsys.readouterr()
    with file_size_limit(limit) if limit else contextlib.nullcontext():
        code = cli.main(["refine", "--teacher", str(teacher), "--data", str(home), "--out",
                         str(out), "--steps", "1", "--L", "16", "--batch-size", "2",
                         "--eval-iters", "1", "--calib-windows", "2", "--option",
                         "T=4,v_threshold=0.5", "--sparsify-topk", "0", "--warmup", "0",
                         "--no-progress", "--budget-energy", "1.05"])  # fmt: skip
    *said, err = capsys.readouterr().err.splitlines()  # after refine's progress lines
    assert code == 1 and all(line.startswith("refine: ") for line in said), said
    assert err.startswith("spikemar refine: error: ") and "--help" not in err
    why = "File too large" if limit else "No space left on device"
    assert re.search(rf"--out: cannot write '{re.escape(str(out))}/{fails}' \({why}\)$", err), err
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
