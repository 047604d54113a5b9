"""spikemar.eval driven as its users drive it, with what the first tests did not try: lm_eval's
glob task names through ``spikemar eval``, a text with characters outside a character
tokenizer's alphabet, the metrics of tasks that are neither accuracy nor perplexity, and
``--model_args`` values lm_eval reads as numbers."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-evaluation-harness (the 'eval' extra) is missing")

from spikemar import cli
from spikemar.checkpoint import save_checkpoint
from spikemar.data import CharTokenizer
from spikemar.models import MARLM, MARConfig, SpikeConfig

CHARS = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(5)
    model = MARLM(MARConfig(vocab_size=len(CHARS), d_model=16, n_layers=1, d_state=8,
                            head_dim=8, spikes=SpikeConfig(T=2)))  # fmt: skip
    return save_checkpoint(tmp_path_factory.mktemp("c") / "tiny.pt", model, CharTokenizer(CHARS))


def test_eval_command_expands_a_glob_task_pattern(checkpoint, tmp_path, capsys):
    """``--tasks 'shakespeare_s*'`` was accepted as a known name and then handed to
    simple_evaluate unexpanded: 'KeyError: Spec ... is not a registered task', exit 1."""
    out = tmp_path / "eval"
    argv = ["eval", "--checkpoint", str(checkpoint), "--tasks",
            "shakespeare_s*,shakespeare_speaker", "--limit", "1", "--no-energy", "--out",
            str(out)]  # fmt: skip
    assert cli.main(argv) == 0, capsys.readouterr().err
    (row,) = json.loads((out / "eval.json").read_text())["rows"]
    assert list(row["tasks"]) == ["shakespeare_speaker"]
