"""Training and distillation as a user drives them, from outside: where the teacher's weights
are cast and moved, the model a checkpoint loads onto its device, the distill command's errors
(one line, the flag named) and exit codes, and the KL of a teacher that rules tokens out."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from references.hf_checkpoints import write_mamba2_checkpoint

from spikemar import cli
from spikemar._io import Terminated
from spikemar.checkpoint import build_model, load_checkpoint, save_checkpoint
from spikemar.data import TokenDataset
from spikemar.distill import DistillConfig, Teacher, distill
from spikemar.distill import trainer as distill_trainer
from spikemar.distill.losses import kl_divergence
from spikemar.models import MARLM
from spikemar.training import TrainConfig, train

SSM = {"d_model": 16, "n_layers": 2, "d_state": 4, "head_dim": 8}


def _dense_checkpoint(corpus, path):
    vocab = TokenDataset.from_text_file(corpus).tokenizer
    return save_checkpoint(path, build_model("mar-dense", {"vocab_size": vocab.vocab_size, **SSM}),
                           vocab)  # fmt: skip


def _moves_to_a_device(monkeypatch, keep) -> list[set[torch.dtype]]:
    """Spy on ``nn.Module.to``: for each call that moves a module ``keep`` selects off the CPU
    (to the meta device, standing for a GPU), the dtypes its parameters had at that moment."""
    seen: list[set[torch.dtype]] = []
    real = torch.nn.Module.to

    def to(self, *args, **kwargs):
        named = [kwargs.get("device"), *(a for a in args if isinstance(a, str | torch.device))]
        if any(d is not None and torch.device(d).type != "cpu" for d in named) and keep(self):
            seen.append({p.dtype for p in self.parameters()})
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", to)
    return seen


def test_a_teacher_is_cast_before_it_moves_to_its_device(corpus, tmp_path, monkeypatch):
    """A 16-bit teacher never sits on its device at float32 size: it is cast on the CPU, then
    moved (here to the meta device, which stands for a GPU); a checkpoint's teacher does move."""
    path = _dense_checkpoint(corpus, tmp_path / "dense.pt")
    seen = _moves_to_a_device(monkeypatch, lambda m: isinstance(m, MARLM))
    teacher = Teacher.load(str(path), "meta", dtype="bfloat16")
    assert seen and all(dtypes == {torch.bfloat16} for dtypes in seen)
    assert {(p.device.type, p.dtype) for p in teacher.model.parameters()} == {
        ("meta", torch.bfloat16)
    }
    assert {p.dtype for p in Teacher.load(str(path)).model.parameters()} == {torch.float32}


def test_distill_moves_a_bfloat16_teacher_only_after_casting_it(corpus, tmp_path, monkeypatch):
    """distill(teacher_dtype='bfloat16'): the student is built from the teacher's float32
    weights on the CPU, then the teacher is cast, then moved to the run's device."""
    write_mamba2_checkpoint(tmp_path / "m2")
    seen = _moves_to_a_device(
        monkeypatch, lambda m: isinstance(m, MARLM) and m.config.spikes is None
    )
    # the run's device is the meta device: the teacher's move is seen, then the run stops
    monkeypatch.setattr(distill_trainer, "distributed_setup", lambda device: (0, 1, "meta"))
    config = DistillConfig(data=str(corpus), out=str(tmp_path / "s.pt"),
                           teacher=str(tmp_path / "m2"), steps=1, batch_size=2, L=16,
                           eval_interval=1, eval_iters=1, teacher_dtype="bfloat16")  # fmt: skip
    with pytest.raises((RuntimeError, NotImplementedError, ValueError)):
        distill(config, progress=False)
    assert seen and all(dtypes == {torch.bfloat16} for dtypes in seen)


def test_load_checkpoint_puts_the_model_on_map_location(corpus, tmp_path):
    path = _dense_checkpoint(corpus, tmp_path / "dense.pt")
    model, _, payload = load_checkpoint(path, map_location="meta")
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert payload["model"]["embed.weight"].device.type == "cpu"  # the file read once, on the CPU


def _distill_argv(corpus, tmp_path, teacher, *flags: str) -> list[str]:
    return ["distill", "--stage", "2", "--teacher", str(teacher), "--data", str(corpus), "--out",
            str(tmp_path / "s.pt"), "--steps", "1", "--batch-size", "2", "--L", "16",
            "--eval-interval", "1", "--eval-iters", "1", "--no-progress", *flags]  # fmt: skip


def test_a_student_of_another_width_is_one_line_naming_the_flag(corpus, tmp_path, capsys):
    teacher = _dense_checkpoint(corpus, tmp_path / "dense.pt")
    with pytest.raises(SystemExit) as exit_:
        cli.main(_distill_argv(corpus, tmp_path, teacher, "--d-model", "8"))
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert "--d-model: " in err and "first embed.weight: the teacher's [" in err
    assert not (tmp_path / "s.pt").exists()


@pytest.mark.parametrize("signal_error, code", [(KeyboardInterrupt, 130), (Terminated, 143)])
def test_distill_exits_130_on_ctrl_c_and_143_on_sigterm(corpus, tmp_path, monkeypatch,
                                                        signal_error, code):  # fmt: skip
    def interrupted(config, **kwargs):
        raise signal_error

    monkeypatch.setattr(distill_trainer, "distill", interrupted)
    teacher = _dense_checkpoint(corpus, tmp_path / "dense.pt")
    assert cli.main(_distill_argv(corpus, tmp_path, teacher)) == code


def test_resuming_a_train_run_as_a_distillation_says_so(corpus, tmp_path, capsys):
    teacher = _dense_checkpoint(corpus, tmp_path / "dense.pt")
    out = tmp_path / "trained.pt"
    train(TrainConfig(data=str(corpus), out=str(out), model="mar-dense", model_config=SSM,
                      steps=1, batch_size=2, L=16, eval_interval=1, eval_iters=1),
          progress=False)  # fmt: skip
    config = DistillConfig(data=str(corpus), out=str(out), teacher=str(teacher), steps=1,
                           batch_size=2, L=16, eval_interval=1, eval_iters=1)  # fmt: skip
    with pytest.raises(ValueError, match=r"resume: .*trained.pt holds a run of spikemar train"):
        distill(config, resume=True, progress=False)


def test_a_resume_before_the_first_validation_does_not_print_inf(
    corpus, tmp_path, capsys, monkeypatch, interrupt_in_step_3
):
    config = TrainConfig(data=str(corpus), out=str(tmp_path / "m.pt"), model="mar-dense",
                         model_config=SSM, steps=4, batch_size=2, L=16, eval_interval=4,
                         eval_iters=1)  # fmt: skip
    with monkeypatch.context() as patch:
        interrupt_in_step_3(patch, "after the batch")
        with pytest.raises(KeyboardInterrupt):
            train(config, progress=False)
    capsys.readouterr()
    train(config, resume=True, progress=False)
    said = capsys.readouterr().out
    assert "resumed" in said and "(not validated yet)" in said and "loss inf" not in said


def test_kl_of_a_teacher_that_rules_a_token_out_is_finite():
    """A -inf teacher logit (a masked vocabulary entry) adds 0·log 0 = 0, as F.kl_div says;
    no NaN in the value or the student's gradient."""
    teacher = torch.tensor([[0.3, 1.0, -math.inf, 0.0]])
    student = torch.tensor([[0.5, 0.2, 0.1, -0.4]], requires_grad=True)
    kl = kl_divergence(teacher, student)
    reference = F.kl_div(F.log_softmax(student, -1), F.softmax(teacher, -1), reduction="sum")
    torch.testing.assert_close(kl.sum(), reference)
    kl.sum().backward()
    assert torch.isfinite(student.grad).all()


def test_a_spike_threshold_that_diverges_stops_the_run_as_diverged(corpus, tmp_path, capsys):
    """lr 1e30 on a spiking model: V = exp(a) overflows to inf (``a`` finite), and the next
    forward refuses it; that is a diverged run (exit 1, the last good checkpoint kept), not a
    bad argument (exit 2)."""
    code = cli.main(["train", "--model", "mar", "--data", str(corpus), "--out",
                     str(tmp_path / "m.pt"), "--steps", "6", "--batch-size", "2", "--L", "16",
                     "--eval-interval", "6", "--eval-iters", "1", "--d-model", "16",
                     "--n-layers", "1", "--lr", "1e30", "--warmup", "0",
                     "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err  # (a fresh HOME's kernel build says so first)
    errors = [line for line in err.splitlines() if "error" in line]
    assert code == 1 and len(errors) == 1 and "Traceback" not in err, err
    assert "v_threshold became" in err and "training diverged and stopped" in err
    assert "--on-nonfinite skip" not in err  # skipping cannot undo the update that did it
    assert not (tmp_path / "m.pt").exists()


def test_a_window_longer_than_the_validation_split_is_refused_before_training(
    corpus, tmp_path, monkeypatch
):
    import spikemar.training

    steps = []
    monkeypatch.setattr(spikemar.training, "forward_backward", lambda *a: steps.append(a))
    config = TrainConfig(data=str(corpus), out=str(tmp_path / "m.pt"), model="mar-dense",
                         model_config=SSM, steps=4, batch_size=2, L=300)  # fmt: skip
    with pytest.raises(ValueError, match=r"L: 300 \+ 1 tokens exceed the \d+ of the 'val' split"):
        train(config, progress=False)
    assert steps == []


def test_a_resume_after_an_interrupted_validation_runs_that_validation(
    corpus, tmp_path, monkeypatch
):
    """Ctrl-C inside the validation after step 3: the resumed run validates step 3 first, so
    its history, best loss and weights are the uninterrupted run's."""
    import spikemar.training

    def config(name: str) -> TrainConfig:
        return TrainConfig(data=str(corpus), out=str(tmp_path / name), model="mar-dense",
                           model_config=SSM, steps=6, batch_size=2, L=16, eval_interval=3,
                           eval_iters=1, warmup=1)  # fmt: skip

    whole = train(config("a.pt"), progress=False)
    real = spikemar.training._evaluate
    calls = []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real(*args)

    with monkeypatch.context() as patch:
        patch.setattr(spikemar.training, "_evaluate", interrupted)
        with pytest.raises(KeyboardInterrupt):
            train(config("b.pt"), progress=False)
    assert load_checkpoint(tmp_path / "b.pt")[2]["train"]["step"] == 3
    resumed = train(config("b.pt"), resume=True, progress=False)
    assert resumed["history"] == whole["history"] and resumed["best_val"] == whole["best_val"]
    a, b = (load_checkpoint(tmp_path / n)[0].state_dict() for n in ("a.pt", "b.pt"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_teacher_whose_logits_overflow_is_named_before_training(corpus, tmp_path):
    """Finite weights whose logits overflow to inf: every step's KL would be NaN, which the run
    would blame on the learning rate; the teacher is named before any step instead."""
    path = _dense_checkpoint(corpus, tmp_path / "hot.pt")
    model, tokenizer, _ = load_checkpoint(path)
    with torch.no_grad():
        model.head.weight.fill_(3e38)
    save_checkpoint(path, model, tokenizer)
    config = DistillConfig(data=str(corpus), out=str(tmp_path / "s.pt"), teacher=str(path),
                           steps=1, batch_size=2, L=16, eval_iters=1,
                           init_from_teacher=False)  # fmt: skip
    with pytest.raises(ValueError, match=r"teacher: .*hot.pt scores a validation loss of nan"):
        distill(config, progress=False)
    assert not (tmp_path / "s.pt").exists()
