"""FSDP2 (``shard='fsdp'``) with 2 CPU processes on gloo: the same updates as one process on the
same global batch, full-state checkpoints that load into an unsharded model, and resume (under
FSDP, and of an FSDP checkpoint by one process)."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from spikemar.checkpoint import load_checkpoint
from spikemar.distill import DistillConfig, distill
from spikemar.models import MARLM
from spikemar.training import LoopConfig, TrainConfig, train

SSM = {"d_model": 16, "n_layers": 2, "d_state": 4, "head_dim": 8}


@pytest.fixture
def teacher(corpus, tmp_path):
    out = tmp_path / "dense.pt"
    train(TrainConfig(data=str(corpus), out=str(out), steps=4, batch_size=4, L=16,
                      eval_interval=4, eval_iters=1, warmup=2, model="mar-dense",
                      model_config=SSM), progress=False)  # fmt: skip
    return out


def _settings(corpus, teacher, out, steps: int) -> dict:
    # a narrower spiking student from random weights: the objective's feature projection is
    # trained too (root group), the teacher stays whole on every rank
    return {"data": str(corpus), "out": str(out), "steps": steps, "batch_size": 4, "L": 16,
            "eval_interval": 1, "eval_iters": 1, "warmup": 2, "lr": 3e-3, "min_lr": 3e-3 / 10,
            "stage": 2, "teacher": str(teacher), "init_from_teacher": False,
            "student_config": {"d_model": 8, "head_dim": 4}}  # fmt: skip


def _torchrun_fsdp(corpus, teacher, out, steps: int, resume: bool = False, *extra: str) -> None:
    args = ["distill", "--stage", "2", "--teacher", str(teacher), "--data", str(corpus),
            "--steps", str(steps), "--batch-size", "4", "--L", "16", "--eval-interval", "1",
            "--eval-iters", "1", "--warmup", "2", "--lr", "3e-3", "--no-progress",
            "--no-init-from-teacher", "--d-model", "8", "--head-dim", "4", "--shard", "fsdp",
            "--out", str(out), *(["--resume"] if resume else []), *extra]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "spikemar", *args],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "over 2 ranks (FSDP2 shards)" in run.stdout


def _assert_same_run(a_path, b_path) -> None:
    a, b = (load_checkpoint(p)[2] for p in (a_path, b_path))
    assert [h["step"] for h in a["train"]["history"]] == [h["step"] for h in b["train"]["history"]]
    for h1, h2 in zip(a["train"]["history"], b["train"]["history"], strict=True):
        assert h1["train"] == pytest.approx(h2["train"], rel=1e-5)
        assert h1["val"] == pytest.approx(h2["val"], rel=1e-5)
    assert a["model"].keys() == b["model"].keys()
    for name, value in a["model"].items():
        torch.testing.assert_close(b["model"][name], value, rtol=1e-4, atol=1e-5)
    projection = a["train"]["objective"]["projection"]
    assert projection.keys() == b["train"]["objective"]["projection"].keys()
    for name, value in projection.items():
        torch.testing.assert_close(b["train"]["objective"]["projection"][name], value,
                                   rtol=1e-4, atol=1e-5)  # fmt: skip


def test_fsdp_with_two_cpu_processes_equals_one_process_and_resumes(corpus, tmp_path, teacher):
    # one process: 2 steps, then extended to 3 by a resume
    one = tmp_path / "one.pt"
    distill(DistillConfig(**_settings(corpus, teacher, one, 2)), progress=False)
    shutil.copy(one, tmp_path / "one_2.pt")
    distill(DistillConfig(**_settings(corpus, teacher, one, 3)), resume=True, progress=False)

    two = tmp_path / "two.pt"
    _torchrun_fsdp(corpus, teacher, two, 2)
    _assert_same_run(tmp_path / "one_2.pt", two)
    # the checkpoint is the full state: an unsharded model loads it and runs
    model, tokenizer, payload = load_checkpoint(two)
    assert isinstance(model, MARLM) and model.config.d_model == 8
    assert payload["train"]["config"]["shard"] == "fsdp"
    assert all(isinstance(k, str) for k in payload["train"]["optimizer"]["state"])
    assert model(torch.tensor([[0, 1, 2]])).shape == (1, 3, tokenizer.vocab_size)

    # one process resumes the FSDP run (optimizer state keyed by names) ...
    shutil.copy(two, tmp_path / "cross.pt")
    distill(DistillConfig(**_settings(corpus, teacher, tmp_path / "cross.pt", 3)), resume=True,
            progress=False)  # fmt: skip
    _assert_same_run(one, tmp_path / "cross.pt")
    # ... and so do two processes under FSDP, here with activation checkpointing (each
    # layer's forward again in the backward, inside FSDP's gather of that layer): the same run
    _torchrun_fsdp(corpus, teacher, two, 3, True, "--gradient-checkpointing")
    _assert_same_run(one, two)


def test_shard_is_checked():
    with pytest.raises(ValueError, match="shard: expected one of"):
        LoopConfig(shard="zero3")


def test_fsdp_outside_torchrun_says_it_trains_unsharded(corpus, tmp_path, teacher, capsys):
    """--shard fsdp in one process has nothing to shard: the run says so (it trained silently
    unsharded) and trains as without it."""
    settings = {**_settings(corpus, teacher, tmp_path / "one.pt", 1), "shard": "fsdp"}
    distill(DistillConfig(**settings), progress=False)
    out = capsys.readouterr().out
    assert "in one process, unsharded (--shard fsdp shards under torchrun)" in out
