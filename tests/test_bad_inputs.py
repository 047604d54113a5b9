"""Bad input at every public entry point and command of checkpoints, training, the hardware
exports and the pictures: one clear error, of the right type, that names the argument; from the
command line one line (no traceback) and a non-zero exit. Also: a kill -9 in the middle of a save
leaves nothing behind after the next run, and SIGTERM saves a run as Ctrl-C does."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from spikemar import cli
from spikemar.checkpoint import (
    NonFiniteWeightsError,
    build_model,
    dense_twin,
    load_checkpoint,
    release_checkpoint,
    save_checkpoint,
)
from spikemar.data import CharTokenizer
from spikemar.distill import DistillConfig, Teacher, distill
from spikemar.hardware import CUBALIF, export_lava, export_nir, import_nir, quantize, run_lava
from spikemar.hardware.demo import demo_network
from spikemar.training import TrainConfig, train
from spikemar.viz import save_figure

REPO = Path(__file__).resolve().parents[1]
TINY = {"vocab_size": 27, "d_model": 16, "n_layers": 1, "d_state": 4, "head_dim": 8}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Good and bad files, made once: a small checkpoint and its broken variants, an exported
    netx and NIR file and their broken variants."""
    root = tmp_path_factory.mktemp("files")
    tokenizer = CharTokenizer("\n !,;?DORSTabdefhilmnorstuwy")
    model = build_model("mar", TINY)
    good = save_checkpoint(root / "good.pt", model, tokenizer)
    dense = build_model("mar-dense", {**TINY, "vocab_size": tokenizer.vocab_size})
    save_checkpoint(root / "dense.pt", dense, tokenizer)
    (root / "alphabet.txt").write_text(tokenizer.chars * 40)  # the checkpoints' vocabulary
    payload = torch.load(good, weights_only=True)
    variants = {
        "newer.pt": {**payload, "format": "spikemar-checkpoint-99"},
        "no_format.pt": {k: v for k, v in payload.items() if k != "format"},
        "no_tokenizer.pt": {k: v for k, v in payload.items() if k != "tokenizer"},
        "nan.pt": {**payload, "model": {k: v * float("nan") for k, v in payload["model"].items()}},
    }
    for name, data in variants.items():
        torch.save(data, root / name)
    raw = good.read_bytes()
    (root / "truncated.pt").write_bytes(raw[: len(raw) // 2])
    (root / "junk.pt").write_bytes(b"not a checkpoint at all")
    # text torch's legacy (non-zip) reader takes for a pickle: a KeyError/IndexError inside it
    (root / "text.pt").write_bytes(b"hello world\n")
    (root / "junk2.pt").write_bytes(b"junk\n")
    torch.save(torch.nn.Linear(2, 2), root / "pickled.pt")  # a pickled module, not plain data
    net = demo_network((8, 6, 4))
    export_lava(net, root / "net.h5", (8,))
    export_nir(net, root / "net.nir", (8,))
    for name in ("net.h5", "net.nir"):
        data = (root / name).read_bytes()
        (root / f"truncated-{name}").write_bytes(data[: len(data) // 3])
    with h5py.File(root / "newer.h5", "w") as f:
        f.attrs["format"], f.attrs["version"] = "spikemar-netx", 99
        f.create_dataset("layer/0/shape", data=np.array([8]))
    (root / "newer.nir").write_bytes((root / "net.nir").read_bytes())
    with h5py.File(root / "newer.nir", "r+") as f:
        del f["node/metadata/spikemar_version"]
        f["node/metadata/spikemar_version"] = 99
    (root / "text.txt").write_text("just text\n")
    (root / "long.txt").write_text("just text\n" * 30)  # enough for a training window
    (root / "a_file").write_text("")
    (root / "dir.h5").mkdir()
    return root


# Each case: what is called (given the folder of files), the error type, a regex the message must
# match (it names the argument, and for files the path).
LIBRARY_CASES = {
    "load: missing": (
        lambda r: load_checkpoint(r / "none.pt"),
        FileNotFoundError,
        "checkpoint: no file",
    ),
    "load: a folder": (
        lambda r: load_checkpoint(r),
        IsADirectoryError,
        "checkpoint: .* is a folder",
    ),
    "load: not a path": (lambda r: load_checkpoint(3), TypeError, "path: expected a str"),
    "load: junk": (
        lambda r: load_checkpoint(r / "junk.pt"),
        ValueError,
        r"junk.pt is not a spikemar checkpoint",
    ),
    "load: a line of text": (
        lambda r: load_checkpoint(r / "text.pt"),
        ValueError,
        r"text.pt is not a spikemar checkpoint",
    ),
    "load: a word": (
        lambda r: load_checkpoint(r / "junk2.pt"),
        ValueError,
        r"junk2.pt is not a spikemar checkpoint",
    ),
    "load: truncated": (
        lambda r: load_checkpoint(r / "truncated.pt"),
        ValueError,
        r"truncated.pt is corrupt or truncated",
    ),
    "load: pickled objects": (
        lambda r: load_checkpoint(r / "pickled.pt"),
        ValueError,
        r"pickled.pt is not a spikemar checkpoint",
    ),
    "load: newer format": (
        lambda r: load_checkpoint(r / "newer.pt"),
        ValueError,
        r"newer.pt was written by a newer spikemar \(format 99; .*upgrade spikemar",
    ),
    "load: no format": (
        lambda r: load_checkpoint(r / "no_format.pt"),
        ValueError,
        "not a spikemar checkpoint",
    ),
    "load: no tokenizer": (
        lambda r: load_checkpoint(r / "no_tokenizer.pt"),
        ValueError,
        "no_tokenizer.pt does not rebuild",
    ),
    "load: NaN weights": (
        lambda r: load_checkpoint(r / "nan.pt"),
        NonFiniteWeightsError,
        "nan.pt holds NaN or inf weights.*allow_nonfinite",
    ),
    "save: NaN weights": (
        lambda r: save_checkpoint(r / "x.pt", _nan_model(), CharTokenizer("ab")),
        NonFiniteWeightsError,
        "model: .* NaN or inf",
    ),
    "save: not a tokenizer": (
        lambda r: save_checkpoint(r / "x.pt", build_model("mar", TINY), "abc"),
        TypeError,
        "tokenizer",
    ),
    "release: no provenance": (
        lambda r: release_checkpoint(r / "good.pt", r / "x.pt", {"seed": 1}),
        ValueError,
        "provenance: missing",
    ),
    "build: kind": (lambda r: build_model("rnn", TINY), ValueError, "kind: expected one of"),
    "dense twin of a dense model": (
        lambda r: dense_twin(build_model("mar-dense", TINY)),
        ValueError,
        "model: expected a spiking MARLM",
    ),
    "train: lr inf": (lambda r: TrainConfig(lr=float("inf")), ValueError, "lr"),
    "train: lr nan": (lambda r: TrainConfig(lr=float("nan")), ValueError, "lr"),
    "train: device typo": (
        lambda r: TrainConfig(device="cdua"),
        ValueError,
        "device: 'cdua' is not a device",
    ),
    "train: device cuda:7": (
        lambda r: TrainConfig(device="cuda:7"),
        ValueError,
        "device: 'cuda:7'",
    ),
    "train: on_nonfinite": (
        lambda r: TrainConfig(on_nonfinite="ignore"),
        ValueError,
        "on_nonfinite",
    ),
    "train: out empty": (lambda r: TrainConfig(out=""), ValueError, "out: expected a file path"),
    "train: warmup": (lambda r: TrainConfig(warmup=-1), ValueError, "warmup"),
    "train: out is a folder": (
        lambda r: train(TrainConfig(out=str(r))),
        IsADirectoryError,
        "out: .* is a folder",
    ),
    "train: out under a file": (
        lambda r: train(TrainConfig(out=str(r / "a_file" / "m.pt"))),
        NotADirectoryError,
        "out: cannot write .*a_file.* is a file",
    ),
    "train: out exists": (
        lambda r: train(TrainConfig(out=str(r / "good.pt"))),
        FileExistsError,
        "out: .*good.pt already exists.*--overwrite",
    ),
    "train: resume nothing": (
        lambda r: train(TrainConfig(out=str(r / "none.pt")), resume=True),
        FileNotFoundError,
        "resume: no checkpoint",
    ),
    "train: seed a string": (lambda r: TrainConfig(seed="a"), ValueError, "seed: expected an int"),
    "train: overwrite not a bool": (
        lambda r: TrainConfig(overwrite="no"),
        ValueError,
        "overwrite: expected True or False",
    ),
    "train: weight_decay inf": (
        lambda r: TrainConfig(weight_decay=float("inf")),
        ValueError,
        "weight_decay",
    ),
    "train: lr a string": (lambda r: TrainConfig(lr="1e-3"), ValueError, "lr: expected a number"),
    "train: model_config unknown": (
        lambda r: TrainConfig(model_config={"n_layer": 2}),
        ValueError,
        r"model_config: \['n_layer'\] are not settings of a mar model",
    ),
    "train: model_config spikes": (
        lambda r: TrainConfig(model_config={"spikes": {"Tau": 2}}),
        ValueError,
        r"model_config: spikes: \['Tau'\] are not spike settings",
    ),
    "train: config a dict": (
        lambda r: train({"steps": 1}),
        TypeError,
        "config: expected a TrainConfig, got dict",
    ),
    "distill: config of train": (
        lambda r: distill(TrainConfig()),
        TypeError,
        "config: expected a DistillConfig, got TrainConfig",
    ),
    "distill: alpha nan": (
        lambda r: DistillConfig(teacher="t.pt", alpha=float("nan")),
        ValueError,
        "alpha, beta, gamma, ce, temperature: expected finite",
    ),
    "distill: temperature inf": (
        lambda r: DistillConfig(teacher="t.pt", temperature=float("inf")),
        ValueError,
        "temperature: expected finite",
    ),
    "distill: beta a string": (
        lambda r: DistillConfig(teacher="t.pt", beta="0.7"),
        ValueError,
        "beta: expected a number",
    ),
    "distill: stage a float": (
        lambda r: DistillConfig(teacher="t.pt", stage=2.0),
        ValueError,
        "stage: expected 1",
    ),
    "distill: teacher not a path": (
        lambda r: DistillConfig(teacher=3),
        ValueError,
        "teacher: expected a checkpoint path",
    ),
    "distill: student_config unknown": (
        lambda r: DistillConfig(teacher="t.pt", student_config={"width": 8}),
        ValueError,
        r"student_config: \['width'\] are not settings",
    ),
    "distill: student_config vocab_size": (
        lambda r: DistillConfig(teacher="t.pt", student_config={"vocab_size": 40}),
        ValueError,
        "student_config: vocab_size 40: the student's vocabulary is the teacher's",
    ),
    "distill: spikes in stage 1": (
        lambda r: DistillConfig(teacher="t.pt", stage=1, student_config={"spikes": {"T": 2}}),
        ValueError,
        "student_config: spikes: stage 1's student is dense",
    ),
    "distill: init_from_teacher not a bool": (
        lambda r: DistillConfig(teacher="t.pt", init_from_teacher="no"),
        ValueError,
        "init_from_teacher: expected True or False",
    ),
    "distill: align_steps a float": (
        lambda r: DistillConfig(teacher="t.pt", stage=1, align_steps=1.5),
        ValueError,
        "align_steps: expected an int",
    ),
    "load: empty file": (
        lambda r: load_checkpoint(r / "a_file"),
        ValueError,
        "checkpoint: .*a_file is empty",
    ),
    "Teacher.load: junk": (
        lambda r: Teacher.load(str(r / "junk.pt")),
        ValueError,
        "teacher: .*junk.pt is not a spikemar checkpoint",
    ),
    "Teacher.load: a device this build has not": (
        lambda r: Teacher.load(
            str(r / "junk.pt"), "cuda:0" if not torch.cuda.is_available() else "cuda:99"
        ),
        ValueError,
        "device: 'cuda:(0|99)', but",
    ),
    "Teacher.load: dtype": (
        lambda r: Teacher.load(str(r / "good.pt"), dtype="int8"),
        ValueError,
        "dtype: expected one of",
    ),
    "export_lava: input_shape rank": (
        lambda r: export_lava(demo_network(), r / "n.h5", (64, 2)),
        ValueError,
        "input_shape: expected the per-sample shape",
    ),
    "export_lava: input_shape size": (
        lambda r: export_lava(demo_network(), r / "n.h5", (50,)),
        ValueError,
        r"input_shape: \(50,\) does not fit 0, a Linear with 64",
    ),
    "export_lava: no suffix": (
        lambda r: export_lava(demo_network(), r / "net", (64,)),
        ValueError,
        "path: expected a file name",
    ),
    "export_lava: a folder": (
        lambda r: export_lava(demo_network(), r / "dir.h5", (64,)),
        IsADirectoryError,
        "path: .*dir.h5.* is a folder",
    ),
    "export_nir: input_shape": (
        lambda r: export_nir(demo_network(), r / "n.nir", (3, 4, 4)),
        ValueError,
        r"input_shape: \(3, 4, 4\) does not fit",
    ),
    "export_nir: dt": (
        lambda r: export_nir(demo_network(), r / "n.nir", (64,), dt=float("nan")),
        ValueError,
        "dt: expected a finite",
    ),
    "export_nir: under a file": (
        lambda r: export_nir(demo_network(), r / "a_file" / "n.nir", (64,)),
        NotADirectoryError,
        "path: cannot write",
    ),
    "fixed point: inputs shape": (
        lambda r: quantize(demo_network())(torch.zeros(3, 2, 50)),
        ValueError,
        r"inputs: \(50,\) does not fit 0",
    ),
    "fixed point: fractions": (
        lambda r: quantize(demo_network())(torch.full((3, 2, 64), 0.5)),
        ValueError,
        "inputs: Loihi takes integer",
    ),
    "run_lava: missing": (
        lambda r: run_lava(r / "none.h5", torch.zeros(4, 8), 4),
        FileNotFoundError,
        "path: no exported network",
    ),
    "run_lava: not HDF5": (
        lambda r: run_lava(r / "text.txt", torch.zeros(4, 8), 4),
        ValueError,
        r"path: .*text.txt is not a readable HDF5 file",
    ),
    "run_lava: truncated": (
        lambda r: run_lava(r / "truncated-net.h5", torch.zeros(4, 8), 4),
        ValueError,
        r"truncated-net.h5 is not a readable HDF5",
    ),
    "run_lava: a NIR file": (
        lambda r: run_lava(r / "net.nir", torch.zeros(4, 8), 4),
        ValueError,
        r"net.nir is not a netx file written by spikemar",
    ),
    "run_lava: newer": (
        lambda r: run_lava(r / "newer.h5", torch.zeros(4, 8), 4),
        ValueError,
        r"newer.h5 was written by a newer spikemar \(format 99",
    ),
    "run_lava: input shape": (
        lambda r: run_lava(r / "net.h5", torch.zeros(4, 9), 4),
        ValueError,
        r"inputs: one step is \(9,\), the network's input layer .* takes \(8,\)",
    ),
    "run_lava: NaN input": (
        lambda r: run_lava(r / "net.h5", torch.full((4, 8), float("nan")), 4),
        ValueError,
        "inputs: expected finite",
    ),
    "run_lava: num_steps": (
        lambda r: run_lava(r / "net.h5", torch.zeros(4, 8), 0),
        ValueError,
        "num_steps",
    ),
    "import_nir: missing": (
        lambda r: import_nir(r / "none.nir"),
        FileNotFoundError,
        "path: no NIR file",
    ),
    "import_nir: truncated": (
        lambda r: import_nir(r / "truncated-net.nir"),
        ValueError,
        r"truncated-net.nir is not a readable HDF5",
    ),
    "import_nir: text": (
        lambda r: import_nir(r / "text.txt"),
        ValueError,
        r"text.txt is not a readable HDF5",
    ),
    "import_nir: a netx file": (
        lambda r: import_nir(r / "net.h5"),
        ValueError,
        r"net.h5 is not a NIR graph",
    ),
    "import_nir: newer": (
        lambda r: import_nir(r / "newer.nir"),
        ValueError,
        r"newer.nir was written by a newer spikemar \(format 99",
    ),
    "demo network: sizes": (lambda r: demo_network((8,)), ValueError, "sizes"),
    "CUBALIF: decay": (lambda r: CUBALIF(current_decay=1.5), ValueError, "current_decay"),
    "save_figure: suffix": (
        lambda r: save_figure(_figure(), r / "fig"),
        ValueError,
        "path: expected a file name with a suffix",
    ),
    "save_figure: under a file": (
        lambda r: save_figure(_figure(), r / "a_file" / "f.png"),
        NotADirectoryError,
        "path: cannot write",
    ),
    # convert's numbers, refused before the model is loaded (a bool is no count; a string
    # raised a bare TypeError, a float seed torch's own after all the calibration)
    "convert: calib_batches True": (
        lambda r: _convert(r, calib_batches=True),
        ValueError,
        r"calib_batches: expected an int >= 1, got True",
    ),
    "convert: L a float": (
        lambda r: _convert(r, L=16.0),
        ValueError,
        r"L: expected an int >= 1, got 16\.0",
    ),
    "convert: firing_rate a string": (
        lambda r: _convert(r, firing_rate="0.2"),
        ValueError,
        r"firing_rate: expected a fraction in \(0, 1\), got '0.2'",
    ),
    "convert: seed a float": (
        lambda r: _convert(r, seed=1.5),
        ValueError,
        r"seed: expected an int in \[-2\*\*63, 2\*\*64\), got 1.5",
    ),
    "convert: seed too large": (
        lambda r: _convert(r, seed=2**64),
        ValueError,
        r"seed: expected an int in .*, got 18446744073709551616",
    ),
}


def _convert(r: Path, **numbers):
    from spikemar.convert import convert

    return convert(r / "dense.pt", r / "student.pt", data=r / "alphabet.txt", **numbers)


def _nan_model():
    model = build_model("mar", TINY)
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    return model


def _figure():
    from spikemar.viz import new_figure

    return new_figure((2, 2))


@pytest.mark.parametrize("case", list(LIBRARY_CASES))
def test_library_entry_points_name_what_is_wrong(files, case, monkeypatch):
    monkeypatch.delenv("SPIKEMAR_LAVA_PYTHON", raising=False)
    call, error, pattern = LIBRARY_CASES[case]
    before = sorted(p.name for p in files.iterdir())
    with pytest.raises(error, match=pattern) as info:
        call(files)
    assert "weights_only=False" not in str(info.value)  # never the unsafe advice
    assert sorted(p.name for p in files.iterdir()) == before  # nothing (half-)written


# Each command case: arguments (with {r} the folder of files), exit code, a regex for the one
# line on stderr. Exit 2: a mistake in the input (argparse's own errors raise SystemExit(2)).
COMMAND_CASES = {
    "train --device typo": (
        ["train", "--device", "cdua"],
        2,
        "argument --device: 'cdua' is not a device",
    ),
    "train --device cuda": (
        ["train", "--device", "cuda"],
        2,
        "argument --device: 'cuda', but (this PyTorch is a CPU-only build|no CUDA GPU)",
    ),
    "train --lr inf": (["train", "--lr", "inf"], 2, "argument --lr: expected a finite number > 0"),
    "train --warmup -1": (
        ["train", "--warmup", "-1"],
        2,
        "argument --warmup: expected an int >= 0",
    ),
    "train --out folder": (["train", "--out", "{r}"], 2, "--out: .* is a folder"),
    "train --out exists": (
        ["train", "--out", "{r}/good.pt", "--data", "{r}/text.txt"],
        2,
        "--out: .*good.pt already exists; .*--resume.*--overwrite",
    ),
    "train --data binary": (
        ["train", "--out", "{r}/new.pt", "--data", "{r}/good.pt"],
        2,
        "--data: .*good.pt",
    ),
    "train --data missing": (
        ["train", "--out", "{r}/new.pt", "--data", "{r}/none.txt"],
        2,
        "--data: .*none.txt",
    ),
    "train --resume nothing": (
        ["train", "--out", "{r}/none.pt", "--resume"],
        2,
        "--resume: no checkpoint",
    ),
    "generate --temperature nan": (
        ["generate", "--checkpoint", "{r}/good.pt", "--temperature", "nan"],
        2,
        "argument --temperature",
    ),
    "generate --top-p 0": (
        ["generate", "--checkpoint", "{r}/good.pt", "--top-p", "0"],
        2,
        r"argument --top-p: expected a number in \(0, 1\], got '0'",
    ),
    "demo --top-p 2": (["demo", "--top-p", "2"], 2, "argument --top-p: expected a number in"),
    "generate corrupt": (
        ["generate", "--checkpoint", "{r}/truncated.pt"],
        2,
        "--checkpoint: .*truncated.pt is corrupt or truncated",
    ),
    "generate NaN weights": (
        ["generate", "--checkpoint", "{r}/nan.pt"],
        2,
        "--checkpoint: .*nan.pt holds NaN or inf weights",
    ),
    "generate newer": (
        ["generate", "--checkpoint", "{r}/newer.pt"],
        2,
        r"--checkpoint: .*newer spikemar \(format 99",
    ),
    "generate missing": (["generate", "--checkpoint", "{r}/none.pt"], 2, "--checkpoint: no file"),
    "generate --prompt unknown": (
        ["generate", "--checkpoint", "{r}/good.pt", "--prompt", "Zz"],
        2,
        "--prompt: characters",
    ),
    "raster --out under a file": (
        ["raster", "--out", "{r}/a_file/r.png"],
        2,
        "--out: cannot write",
    ),
    "raster --out folder": (["raster", "--out", "{r}"], 2, "--out: .* is a folder"),
    "raster ternary-single --T 4": (
        ["raster", "--neuron", "ternary-single", "--T", "4", "--out", "{r}/r.png"],
        2,
        "argument --T: ternary-single",
    ),
    "demo corrupt": (
        ["demo", "--checkpoint", "{r}/junk.pt", "--out", "{r}/d.png"],
        2,
        "junk.pt is not a spikemar checkpoint",
    ),
    "demo --temperature -1": (["demo", "--temperature", "-1"], 2, "argument --temperature"),
    "export --lava under a file": (
        ["export", "--lava", "{r}/a_file/n.h5"],
        2,
        "--lava: cannot write",
    ),
    "export --nir folder": (["export", "--nir", "{r}"], 2, "--nir: .* is a folder"),
    "eval --num-fewshot -1": (  # lm_eval recorded it as n-shot -1
        ["eval", "--tasks", "shakespeare_nextline", "--num-fewshot", "-1"],
        2,
        "argument --num-fewshot: expected an int >= 0, got '-1'",
    ),
    "convert --from missing": (
        ["convert", "--from", "{r}/nowhere", "--out", "{r}/s.pt"],
        2,
        "--from: no directory at .*nowhere",
    ),
    "convert --spike-points missing file": (
        ["convert", "--from", "{r}/good.pt", "--out", "{r}/s.pt", "--spike-points", "{r}/x.json"],
        2,
        "--spike-points: no file",
    ),
    "train --shard unknown": (["train", "--shard", "zero3"], 2, "argument --shard: invalid"),
    "train --resume corrupt": (
        ["train", "--out", "{r}/truncated.pt", "--resume", "--data", "{r}/long.txt", "--L", "8"],
        2,
        "--resume: .*truncated.pt is corrupt or truncated",
    ),
    "distill --out folder": (
        ["distill", "--stage", "2", "--teacher", "{r}/good.pt", "--out", "{r}"],
        2,
        "--out: .* is a folder",
    ),
    "distill --out under a file": (
        ["distill", "--stage", "2", "--teacher", "{r}/good.pt", "--out", "{r}/a_file/s.pt"],
        2,
        "--out: cannot write",
    ),
    "distill --teacher junk": (
        [
            "distill",
            "--stage",
            "2",
            "--teacher",
            "{r}/junk.pt",
            "--out",
            "{r}/s.pt",
            "--data",
            "{r}/text.txt",
        ],
        2,
        "--teacher: .*junk.pt is not a spikemar checkpoint",
    ),
    "distill --teacher empty": (
        [
            "distill",
            "--stage",
            "2",
            "--teacher",
            "{r}/a_file",
            "--out",
            "{r}/s.pt",
            "--data",
            "{r}/text.txt",
        ],
        2,
        "--teacher: .*a_file is empty",
    ),
    "distill --student junk": (
        [
            "distill",
            "--stage",
            "2",
            "--teacher",
            "{r}/dense.pt",
            "--student",
            "{r}/junk.pt",
            "--out",
            "{r}/s.pt",
            "--data",
            "{r}/alphabet.txt",
        ],
        2,
        "--student: .*junk.pt is not a spikemar checkpoint",
    ),
    "distill --align-steps beyond --steps": (
        [
            "distill",
            "--stage",
            "1",
            "--teacher",
            "{r}/good.pt",
            "--out",
            "{r}/s.pt",
            "--steps",
            "2",
            "--align-steps",
            "5",
        ],
        2,
        r"--align-steps: expected 0 \.\.\. steps \(2\), got 5",
    ),
    "distill --stage 1 --teacher without attention": (  # its student would be its copy
        [
            "distill",
            "--stage",
            "1",
            "--teacher",
            "{r}/dense.pt",
            "--out",
            "{r}/s.pt",
            "--data",
            "{r}/alphabet.txt",
        ],
        2,
        r"--teacher: stage 1 replaces a teacher's attention with SSM mixers; .*dense.pt is a "
        r"dense SSM LM without attention layers .*\(--stage 2\)",
    ),
    "export a language model --nir": (  # refused before --lava writes its folder
        ["export", "--checkpoint", "{r}/good.pt", "--lava", "{r}/lm_lava", "--nir", "{r}/lm.nir"],
        2,
        "--nir: embed: a lookup of token ids",
    ),
    "export --checkpoint corrupt": (
        ["export", "--checkpoint", "{r}/truncated.pt"],
        2,
        "--checkpoint: .*corrupt or truncated",
    ),
}


@pytest.mark.parametrize("case", list(COMMAND_CASES))
def test_commands_fail_in_one_line_naming_the_flag(files, case, capsys):
    argv, code, pattern = COMMAND_CASES[case]
    argv = [a.replace("{r}", str(files)) for a in argv]
    try:
        got = cli.main(argv)
    except SystemExit as exit_:
        got = exit_.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert got == code, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert re.search(pattern, lines[0]), lines[0]
    assert not (files / "lm_lava").exists()  # nothing written by a refused export


def test_debug_shows_the_traceback(files, monkeypatch):
    argv = ["generate", "--checkpoint", str(files / "truncated.pt")]
    with pytest.raises(SystemExit):
        cli.main(argv)
    with pytest.raises(ValueError, match="corrupt"):
        cli.main([*argv, "--debug"])
    with pytest.raises(ValueError, match="corrupt"):
        cli.main(["--debug", *argv])
    monkeypatch.setenv("SPIKEMAR_DEBUG", "1")
    with pytest.raises(ValueError, match="corrupt"):
        cli.main(argv)


def test_train_without_data_says_where_tiny_shakespeare_comes_from(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SPIKEMAR_DATA", str(tmp_path / "nowhere" / "input.txt"))
    with pytest.raises(SystemExit) as info:
        cli.main(["train", "--out", str(tmp_path / "m.pt")])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and len(err.splitlines()) == 1
    assert "--data" in err and "SPIKEMAR_DATA" in err and "karpathy/char-rnn" in err


def test_exported_files_have_the_usual_mode(tmp_path):
    mask = os.umask(0)
    os.umask(mask)
    net = demo_network((8, 4))
    export_lava(net, tmp_path / "n.h5", (8,))
    export_nir(net, tmp_path / "n.nir", (8,))
    save_checkpoint(tmp_path / "m.pt", build_model("mar", TINY), CharTokenizer("ab"))
    for path in (tmp_path / "n.h5", tmp_path / "n.nir", tmp_path / "m.pt"):
        assert path.stat().st_mode & 0o777 == 0o666 & ~mask, path


# -- interrupted saves ----------------------------------------------------------------------------

_KILLED_SAVE = """
import os, signal, sys
import torch
from spikemar.checkpoint import load_checkpoint, save_checkpoint

model, tokenizer, payload = load_checkpoint(sys.argv[1])
real_save = torch.save

def save_then_die(obj, f, *args, **kwargs):
    real_save(obj, f, *args, **kwargs)  # the temporary file is complete, not yet renamed
    os.kill(os.getpid(), signal.SIGKILL)

torch.save = save_then_die
save_checkpoint(sys.argv[1], model, tokenizer, payload["train"])
"""


def _spikemar(*args: str, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True,
                          timeout=600, **kwargs)  # fmt: skip


def _train_args(corpus: Path, out: Path, steps: int) -> list[str]:
    return ["-m", "spikemar", "train", "--data", str(corpus), "--out", str(out), "--steps",
            str(steps), "--eval-interval", "2", "--eval-iters", "1", "--d-model", "16",
            "--n-layers", "1", "--batch-size", "2", "--L", "8", "--no-progress"]  # fmt: skip


def test_a_save_killed_with_sigkill_leaves_nothing_after_the_next_run(corpus, tmp_path):
    out = tmp_path / "run" / "m.pt"
    assert _spikemar(*_train_args(corpus, out, 2)).returncode == 0
    good = out.read_bytes()
    killed = _spikemar("-c", _KILLED_SAVE, str(out))
    assert killed.returncode == -signal.SIGKILL
    left = [p.name for p in out.parent.iterdir() if p.name != "m.pt"]
    assert len(left) == 1 and left[0].startswith(".m.pt.") and left[0].endswith(".tmp")
    assert out.read_bytes() == good  # the rename never happened: the old checkpoint is whole
    resumed = _spikemar(*_train_args(corpus, out, 4), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "removed 1 temporary file(s) of an interrupted save" in resumed.stdout
    assert f"resumed {out} at step 2 of 4" in resumed.stdout
    assert [p.name for p in out.parent.iterdir()] == ["m.pt"]
    assert load_checkpoint(out)[2]["train"]["step"] == 4


def test_sigterm_saves_the_run_like_ctrl_c(corpus, tmp_path):
    out = tmp_path / "m.pt"
    args = [*_train_args(corpus, out, 100000), "--eval-interval", "5"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        for line in proc.stdout:  # the first validation line: the loop is running
            if line.startswith("step 5:"):
                break
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        proc.kill()
    assert proc.returncode == 143, stderr
    assert "SIGTERM: saved" in stdout and "Traceback" not in stderr
    assert load_checkpoint(out)[2]["train"]["step"] >= 5
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".m.pt")] == []


def test_distill_with_a_hub_teacher_offline_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    (tmp_path / "text.txt").write_text("to be or not to be\n" * 50)
    argv = ["distill", "--stage", "2", "--teacher", "state-spaces/mamba2-130m",
            "--data", str(tmp_path / "text.txt"), "--out", str(tmp_path / "s.pt")]  # fmt: skip
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and "\n" not in err, err
    assert "teacher: 'state-spaces/mamba2-130m' is not a local directory" in err
    assert not (tmp_path / "s.pt").exists()


@pytest.mark.parametrize(
    ("config", "match"),
    [
        # a Llama directory transformers cannot build (its code divides by the head count)
        ({"model_type": "llama", "hidden_size": 32, "num_attention_heads": 0, "vocab_size": 50},
         r"--teacher: transformers cannot build the model in .* \(ZeroDivisionError"),
        (None, "--teacher: .* is a folder without a config.json"),
    ],
)  # fmt: skip
def test_distill_names_a_teacher_directory_it_cannot_use(tmp_path, capsys, config, match):
    from spikemar import cli

    teacher = tmp_path / "teacher"
    teacher.mkdir()
    if config is not None:
        (teacher / "config.json").write_text(json.dumps(config))
    (tmp_path / "text.txt").write_text("to be or not to be\n" * 50)
    argv = ["distill", "--stage", "2", "--teacher", str(teacher), "--data",
            str(tmp_path / "text.txt"), "--out", str(tmp_path / "s.pt")]  # fmt: skip
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and "\n" not in err, err
    assert re.search(match, err), err
    assert not (tmp_path / "s.pt").exists()
