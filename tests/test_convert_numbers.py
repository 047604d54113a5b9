"""spikemar.convert takes its counts, rate and seed as NumPy scalars too (a sweep's np.int64, a
rate from np.linspace), as the numbers they stand for (spikemar/_numbers.py): the student, its
rates and the provenance saved with it are those of the Python numbers."""

from __future__ import annotations

import numpy as np
import torch

from spikemar.checkpoint import build_model, load_checkpoint, save_checkpoint
from spikemar.convert import convert
from spikemar.tokenizer import CharTokenizer


def test_convert_takes_numpy_scalars_as_python_numbers(corpus, tmp_path):
    tokenizer = CharTokenizer.from_text(corpus.read_text())
    source = save_checkpoint(tmp_path / "dense.pt", build_model("mar-dense", {
        "vocab_size": tokenizer.vocab_size, "d_model": 16, "n_layers": 1, "d_state": 4,
        "head_dim": 8}), tokenizer)  # fmt: skip
    python = {"calib_batches": 1, "eval_batches": 1, "batch_size": 2, "L": 16,
              "firing_rate": 0.25, "seed": 3}  # fmt: skip
    numpy = {"calib_batches": np.int64(1), "eval_batches": np.int32(1),
             "batch_size": np.uint8(2), "L": np.int64(16), "firing_rate": np.float32(0.25),
             "seed": np.int64(3)}  # fmt: skip
    want = convert(source, data=corpus, **python)
    got = convert(source, tmp_path / "s.pt", data=corpus, **numpy)  # torch refused np.int64 seeds
    assert got.calibration_rates == want.calibration_rates
    assert got.student_loss == want.student_loss
    for a, b in zip(got.student.state_dict().values(), want.student.state_dict().values(),
                    strict=True):  # fmt: skip
        assert torch.equal(a, b)
    provenance = load_checkpoint(tmp_path / "s.pt")[2]["provenance"]  # weights_only=True
    assert type(provenance["seed"]) is int and provenance["seed"] == 3
    assert type(provenance["result"]["firing_rate_target"]) is float


def test_calibrate_thresholds_takes_numpy_scalars(corpus):
    from spikemar.convert import calibrate_thresholds, spiking_student
    from spikemar.models import SpikeConfig

    tokenizer = CharTokenizer.from_text(corpus.read_text())
    dense = build_model("mar-dense", {"vocab_size": tokenizer.vocab_size, "d_model": 16,
                                      "n_layers": 1, "d_state": 4, "head_dim": 8})  # fmt: skip
    tokens = [torch.randint(0, tokenizer.vocab_size, (2, 16))]
    python = {"max_rows": 8, "rounds": 2, "seed": 5}
    numpy = {"max_rows": np.int64(8), "rounds": np.int16(2), "seed": np.uint32(5)}
    rates = []
    for numbers in (python, numpy):
        student = spiking_student(dense, SpikeConfig(T=2))
        rates.append(calibrate_thresholds(student, dense, tokens, np.float64(0.25), **numbers))
    assert rates[0] == rates[1]
