"""Ctrl-C and SIGTERM while ``spikemar COMMAND`` is still starting: the command's module (torch,
transformers) takes seconds to import, and an interrupt there must end as one during the run
does (exit 130 or 143, no traceback)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from spikemar import cli
from spikemar._io import Terminated


def _commands_where_train_raises(exc: type[BaseException]):
    def add(subparsers):
        raise exc  # as an interrupt arriving while `spikemar train` imports spikemar.training

    add.command, add.summary = "train", "interrupted"
    return tuple(add if c.command == "train" else c for c in cli._COMMANDS)


@pytest.mark.parametrize(("exc", "code"), [(KeyboardInterrupt, 130), (Terminated, 143)])
def test_an_interrupt_while_the_command_is_imported_exits_quietly(monkeypatch, capsys, exc, code):
    monkeypatch.delenv("SPIKEMAR_DEBUG", raising=False)
    monkeypatch.setattr(cli, "_COMMANDS", _commands_where_train_raises(exc))
    try:
        assert cli.main(["train", "--steps", "1"]) == code
    except KeyboardInterrupt:  # (uncaught, it would stop the whole test session)
        pytest.fail("the interrupt escaped main() as a traceback")
    assert capsys.readouterr().err == ""
    with pytest.raises(exc):  # --debug: the traceback, as for an interrupt during the run
        cli.main(["--debug", "train"])


_INTERRUPT_AT_TORCH = """
import os, signal, sys

# Python raises KeyboardInterrupt on SIGINT only where SIGINT was not ignored when it started;
# a test session run in the background (`cmd &`) ignores it, and its children inherit that
signal.signal(signal.SIGINT, signal.default_int_handler)

class SignalAtTorch:  # a real signal, delivered while the command's module imports torch
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            os.kill(os.getpid(), signal.{sig})
        return None

sys.meta_path.insert(0, SignalAtTorch())
from spikemar.cli import main  # as the console script does: torch must not load here

sys.exit(main(["{command}", "--help"]))
"""


@pytest.mark.parametrize(("sig", "code"), [("SIGINT", 130), ("SIGTERM", 143)])
@pytest.mark.parametrize("command", ["train", "distill"])
def test_a_real_signal_while_the_command_starts_exits_quietly(sig, code, command):
    script = _INTERRUPT_AT_TORCH.format(sig=sig, command=command)
    env = {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent"}  # no SPIKEMAR_DEBUG
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                         timeout=60)  # fmt: skip
    assert (run.returncode, run.stderr) == (code, "")
