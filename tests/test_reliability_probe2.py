"""Training and distillation as a user drives them, second pass: what a failed checkpoint write
(a full disk) says and leaves behind."""

from __future__ import annotations

from dataclasses import replace

import pytest
from references.full_disk import file_size_limit

from spikemar.checkpoint import build_model, save_checkpoint
from spikemar.data import CharTokenizer, TokenDataset
from spikemar.distill import DistillConfig, distill
from spikemar.training import TrainConfig, TrainingDivergedError, train

SSM = {"d_model": 16, "n_layers": 1, "d_state": 4, "head_dim": 8}


def test_a_checkpoint_write_that_fails_says_why_and_leaves_nothing(tmp_path):
    """A disk that fills up during a save is one OSError naming the file and the reason (not
    torch's zip writer's "unexpected pos"), and no temporary is left beside it."""
    tokenizer = CharTokenizer.from_text("abcdefgh")
    model = build_model("mar-dense", {"vocab_size": tokenizer.vocab_size, "d_model": 16,
                                      "n_layers": 1, "d_state": 4, "head_dim": 8})  # fmt: skip
    out = tmp_path / "model.pt"
    with file_size_limit(4096), pytest.raises(OSError, match=r"^checkpoint: cannot write ") as err:
        save_checkpoint(out, model, tokenizer)
    assert str(out) in str(err.value) and "too large" in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_resuming_a_distillation_as_a_train_run_says_so(corpus, tmp_path):
    """The other way round from a train run resumed by distill: one line saying which command
    wrote the run, not a list of every distillation setting that train lacks."""
    vocab = TokenDataset.from_text_file(corpus).tokenizer
    teacher = save_checkpoint(tmp_path / "dense.pt", build_model("mar-dense", {
        "vocab_size": vocab.vocab_size, **SSM}), vocab)  # fmt: skip
    out = tmp_path / "student.pt"
    distill(DistillConfig(data=str(corpus), out=str(out), teacher=str(teacher), steps=1,
                          batch_size=2, L=16, eval_interval=1, eval_iters=1),
            progress=False)  # fmt: skip
    config = TrainConfig(data=str(corpus), out=str(out), model="mar", model_config=SSM, steps=1,
                         batch_size=2, L=16, eval_interval=1, eval_iters=1)  # fmt: skip
    with pytest.raises(ValueError, match=r"resume: .*student.pt holds a run of spikemar distill "
                                         r"\(stage 2\)"):  # fmt: skip
        train(config, resume=True, progress=False)


def test_a_resume_with_other_teacher_weights_at_the_same_path_is_refused(corpus, tmp_path):
    """The teacher's path is part of the run's settings, but a teacher retrained in place
    would make the resumed run learn from another model (and report the old teacher's loss):
    refused, as data that changed is."""
    vocab = TokenDataset.from_text_file(corpus).tokenizer
    teacher = tmp_path / "dense.pt"
    save_checkpoint(teacher, build_model("mar-dense", {"vocab_size": vocab.vocab_size, **SSM}),
                    vocab)  # fmt: skip
    config = DistillConfig(data=str(corpus), out=str(tmp_path / "student.pt"),
                           teacher=str(teacher), steps=1, batch_size=2, L=16, eval_interval=1,
                           eval_iters=1)  # fmt: skip
    distill(config, progress=False)
    distill(replace(config, steps=2), resume=True, progress=False)  # the same teacher: resumes
    save_checkpoint(teacher, build_model("mar-dense", {"vocab_size": vocab.vocab_size, **SSM}),
                    vocab)  # fmt: skip
    with pytest.raises(ValueError, match=r"resume: the teacher's weights changed .*dense.pt"):
        distill(replace(config, steps=3), resume=True, progress=False)


def test_a_transformer_teacher_for_stage_2_names_the_flag_that_starts_from_random_weights(
    corpus, tmp_path, capsys
):
    from spikemar import cli

    vocab = TokenDataset.from_text_file(corpus).tokenizer
    teacher = save_checkpoint(tmp_path / "t.pt", build_model("transformer", {
        "vocab_size": vocab.vocab_size, "d_model": 16, "n_layers": 1, "n_heads": 2,
        "max_len": 16}), vocab)  # fmt: skip
    with pytest.raises(SystemExit) as exit_:
        cli.main(["distill", "--stage", "2", "--teacher", str(teacher), "--data", str(corpus),
                  "--out", str(tmp_path / "s.pt"), "--steps", "1", "--L", "8"])  # fmt: skip
    err = capsys.readouterr().err.splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and "--no-init-from-teacher" in err[0]


def test_a_dense_ssm_whose_weights_overflow_stops_as_diverged(corpus, tmp_path):
    """A huge --lr on the dense SSM: the updates overflow the decay's weights, and the next
    forward's check of ``a`` refused it as if the input were bad (exit 2); it is a divergence
    (TrainingDivergedError, exit 1), and nothing is saved."""
    out = tmp_path / "dense.pt"
    config = TrainConfig(data=str(corpus), out=str(out), model="mar-dense", model_config=SSM,
                         steps=6, batch_size=2, L=16, lr=1e30, warmup=0, eval_interval=3,
                         eval_iters=1)  # fmt: skip
    with pytest.raises(TrainingDivergedError, match=r"step \d: the weights diverged \(a \(log"):
        train(config, progress=False)
    assert not out.exists()


@pytest.mark.parametrize("command", ["train", "distill"])
def test_a_full_disk_during_a_run_is_a_failed_run_not_a_usage_error(command, corpus, tmp_path,
                                                                    capsys):  # fmt: skip
    """The checkpoint write fails (a full disk, here a file-size limit): one line naming the
    file and the reason, exit 1 as for a failed run, without a "(see --help)" that pointed at
    the arguments, and nothing left beside it."""
    from spikemar import cli

    vocab = TokenDataset.from_text_file(corpus).tokenizer  # the token cache, before the limit
    out = tmp_path / "run" / "model.pt"
    loop = ["--data", str(corpus), "--out", str(out), "--steps", "1", "--batch-size", "2",
            "--L", "16", "--eval-interval", "1", "--eval-iters", "1", "--no-progress"]  # fmt: skip
    if command == "train":
        argv = ["train", "--model", "transformer", "--d-model", "16", "--n-layers", "1",
                "--n-heads", "2", *loop]  # fmt: skip
    else:
        teacher = save_checkpoint(tmp_path / "t.pt", build_model("transformer", {
            "vocab_size": vocab.vocab_size, "d_model": 16, "n_layers": 1, "n_heads": 2,
            "max_len": 16}), vocab)  # fmt: skip
        argv = ["distill", "--stage", "1", "--teacher", str(teacher), "--d-state", "4",
                "--head-dim", "8", *loop]  # fmt: skip
    with file_size_limit(4096):
        code = cli.main(argv)
    lines = capsys.readouterr().err.splitlines()
    (err,) = [line for line in lines if not line.startswith("spikemar: compiling")]  # a note
    assert code == 1 and err.startswith(f"spikemar {command}: error: ")
    assert err.endswith(f"--out: cannot write {str(out)!r} (File too large)")
    assert "--help" not in err
    assert list(out.parent.iterdir()) == []
