"""Training, checkpoints and resume: an interrupted run continues bit for bit."""

import itertools
import shutil

import pytest
import torch

from spikemar.checkpoint import build_model, load_checkpoint, save_checkpoint
from spikemar.cli import main
from spikemar.data import TokenDataset
from spikemar.training import (
    Objective,
    TrainConfig,
    TrainingDivergedError,
    lr_factor,
    run_training,
    train,
)

SMALL = {"d_model": 16, "n_layers": 2, "d_state": 4, "head_dim": 8}


def config(corpus, out, **kw) -> TrainConfig:
    base = {"model": "mar", "model_config": dict(SMALL), "data": str(corpus), "out": str(out),
            "steps": 6, "batch_size": 2, "L": 16, "eval_interval": 3, "eval_iters": 1,
            "warmup": 2}  # fmt: skip
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("kind", ["mar", "mar-dense", "transformer"])
def test_training_lowers_the_loss_and_writes_a_loadable_checkpoint(corpus, tmp_path, kind):
    model_config = {"d_model": 16, "n_layers": 1, "n_heads": 2} if kind == "transformer" else SMALL
    cfg = config(corpus, tmp_path / "m.pt", model=kind, model_config=model_config, steps=40,
                 eval_interval=20, eval_iters=4, lr=3e-3)  # fmt: skip
    result = train(cfg, progress=False)
    first, last = result["history"][0], result["history"][-1]
    assert last["train"] < first["train"] + 1e-6 and last["train"] < 3.0
    model, tokenizer, payload = load_checkpoint(tmp_path / "m.pt")
    assert payload["kind"] == kind and payload["train"]["step"] == 40
    text = tokenizer.decode(model.generate(torch.tensor(tokenizer.encode("O ")), 10, top_k=3))
    assert text.startswith("O ") and len(text) == 12


@pytest.mark.parametrize("where, saved_step", [("after the batch", 2), ("after the update", 3)])
def test_resume_after_an_interrupt_mid_step_matches_the_uninterrupted_run(
    corpus, tmp_path, monkeypatch, where, saved_step, interrupt_in_step_3
):
    # validation (and its checkpoint) at steps 4 and 6 only: the one written at the interrupt
    # comes from the Ctrl-C handler
    train(config(corpus, tmp_path / "a.pt", eval_interval=4), progress=False)
    reference = load_checkpoint(tmp_path / "a.pt")[0].state_dict()

    with monkeypatch.context() as patch:
        interrupt_in_step_3(patch, where)
        with pytest.raises(KeyboardInterrupt):
            train(config(corpus, tmp_path / "b.pt", eval_interval=4), progress=False)
    assert torch.load(tmp_path / "b.pt", weights_only=True)["train"]["step"] == saved_step
    train(config(corpus, tmp_path / "b.pt", eval_interval=4), resume=True, progress=False)
    resumed = load_checkpoint(tmp_path / "b.pt")[0].state_dict()
    for name, value in reference.items():
        assert torch.equal(value, resumed[name]), name


def test_resume_refuses_other_settings(corpus, tmp_path, monkeypatch):
    train(config(corpus, tmp_path / "a.pt", steps=3), progress=False)
    with pytest.raises(ValueError, match=r"resume: .*lr: saved 0.001, now 0.002"):
        train(config(corpus, tmp_path / "a.pt", steps=3, lr=2e-3), resume=True, progress=False)
    with pytest.raises(ValueError, match="steps"):  # fewer steps: another schedule
        train(config(corpus, tmp_path / "a.pt", steps=2), resume=True, progress=False)
    train(config(corpus, tmp_path / "a.pt", steps=3, eval_iters=2), resume=True, progress=False)
    monkeypatch.chdir(corpus.parent)  # the same data named another way is the same setting
    train(config(corpus.name, tmp_path / "a.pt", steps=3), resume=True, progress=False)
    payload = torch.load(tmp_path / "a.pt", weights_only=True)  # a run saved before a setting
    del payload["train"]["config"]["grad_clip"]  # existed ran at that setting's default
    torch.save(payload, tmp_path / "a.pt")
    train(config(corpus, tmp_path / "a.pt", steps=3), resume=True, progress=False)
    with pytest.raises(ValueError, match="grad_clip"):
        train(config(corpus, tmp_path / "a.pt", steps=3, grad_clip=0.5), resume=True,
              progress=False)  # fmt: skip


def test_resume_may_switch_amp_and_continues_from_the_saved_state(corpus, tmp_path, capsys):
    """--amp may differ on --resume (as --device may): bfloat16 autocast keeps float32 weights
    and optimizer state and has no loss scaler, so nothing saved is lost; the run continues in
    the new precision, and the resumed line says so."""
    small = {"model": "transformer", "model_config": {"d_model": 16, "n_layers": 1, "n_heads": 2},
             "eval_interval": 2}  # fmt: skip
    train(config(corpus, tmp_path / "off.pt", steps=2, amp="off", **small), progress=False)
    shutil.copy(tmp_path / "off.pt", tmp_path / "bf16.pt")
    train(config(corpus, tmp_path / "off.pt", steps=4, amp="off", **small), resume=True,
          progress=False)  # fmt: skip
    capsys.readouterr()
    train(config(corpus, tmp_path / "bf16.pt", steps=4, amp="bf16", **small), resume=True,
          progress=False)  # fmt: skip
    printed = capsys.readouterr().out
    assert "at step 2 of 4 (best validation loss" in printed
    assert "; --amp bf16 from here on (the run so far: --amp off)" in printed
    off, bf16 = (torch.load(tmp_path / n, weights_only=True) for n in ("off.pt", "bf16.pt"))
    assert bf16["train"]["step"] == 4 and bf16["train"]["config"]["amp"] == "bf16"
    # Adam's moments carried on: their step counts are the run's, not a restart's
    assert {int(v["step"]) for v in bf16["train"]["optimizer"]["state"].values()} == {4}
    # the same two updates from the same state, computed in bfloat16: close, not equal
    gaps = [(bf16["model"][k] - v).abs().max().item() for k, v in off["model"].items()
            if v.is_floating_point()]  # fmt: skip
    # (an extension: steps 3 and 4 run at min_lr, 1e-4, and AdamW moves a weight by about lr)
    assert 0 < max(gaps) <= 2 * 2 * 1e-4


def test_resume_refuses_data_that_changed(corpus, tmp_path):
    # the same path with other text (the same characters: the vocabulary check passes) would
    # continue on other batches, silently no longer the run that was saved
    train(config(corpus, tmp_path / "a.pt", steps=3), progress=False)
    text = corpus.read_text()
    corpus.write_text(text[::-1])
    with pytest.raises(ValueError, match=r"resume: the training data changed since the run"):
        train(config(corpus, tmp_path / "a.pt", steps=6), resume=True, progress=False)
    payload = torch.load(tmp_path / "a.pt", weights_only=True)
    del payload["train"]["data_digest"]  # a run saved before the check: resumed as before
    torch.save(payload, tmp_path / "a.pt")
    train(config(corpus, tmp_path / "a.pt", steps=6), resume=True, progress=False)


def test_resume_extends_a_finished_run_on_its_own_schedule(corpus, tmp_path, capsys):
    out = tmp_path / "a.pt"
    train(config(corpus, out, steps=4, eval_interval=2), progress=False)
    capsys.readouterr()
    result = train(config(corpus, out, steps=7, eval_interval=2), resume=True, progress=False)
    printed = capsys.readouterr().out
    assert f"resumed {out} at step 4 of 7" in printed and "extended from 4 steps" in printed
    assert [h["step"] for h in result["history"]] == [2, 4, 6, 7]
    state = torch.load(out, weights_only=True)["train"]
    assert state["step"] == 7 and state["config"]["schedule_steps"] == 4
    # the cosine ended at step 4: the extension runs at min_lr
    assert state["scheduler"]["_last_lr"] == pytest.approx([1e-4, 1e-4])
    # and an interrupted extension resumes on the same schedule
    train(config(corpus, out, steps=9, eval_interval=2), resume=True, progress=False)
    assert torch.load(out, weights_only=True)["train"]["config"]["schedule_steps"] == 4
    cfg = TrainConfig(steps=9, schedule_steps=4, warmup=1, lr=1e-3, min_lr=1e-4)
    assert [lr_factor(s, cfg) for s in (4, 8)] == pytest.approx([0.1, 0.1])


def test_an_existing_checkpoint_is_replaced_only_with_overwrite(corpus, tmp_path):
    out = tmp_path / "a.pt"
    train(config(corpus, out, steps=2, eval_interval=2), progress=False)
    before = out.read_bytes()
    with pytest.raises(FileExistsError, match=r"out: .*--resume.*--overwrite"):
        train(config(corpus, out, steps=2, eval_interval=2, seed=5), progress=False)
    assert out.read_bytes() == before
    train(config(corpus, out, steps=2, eval_interval=2, seed=5, overwrite=True), progress=False)
    assert torch.load(out, weights_only=True)["train"]["config"]["seed"] == 5


class NaNAfter(Objective):
    """Cross-entropy that turns NaN from step ``bad_from`` on."""

    def __init__(self, model, bad_from: int) -> None:
        super().__init__(model)
        self.bad_from, self.step = bad_from, 0

    def begin_step(self, step: int) -> None:
        self.step = step

    def forward(self, x, y):
        loss, terms = super().forward(x, y)
        if self.step >= self.bad_from:
            loss = loss * float("nan")
        return loss, terms


def _objective_and_data(corpus, bad_from: int):
    data = TokenDataset.from_text_file(corpus)
    model = build_model("mar", {"vocab_size": data.vocab_size, **SMALL})
    return NaNAfter(model, bad_from), data


def test_divergence_stops_the_run_and_keeps_the_last_good_checkpoint(corpus, tmp_path):
    objective, data = _objective_and_data(corpus, bad_from=3)
    cfg = config(corpus, tmp_path / "d.pt", steps=6, eval_interval=1)
    with pytest.raises(
        TrainingDivergedError, match=r"step 4: the loss is nan.* at step 3, is kept"
    ):
        run_training(cfg, objective, data, progress=False)
    model, _, payload = load_checkpoint(tmp_path / "d.pt")
    assert payload["train"]["step"] == 3
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_on_nonfinite_skip_skips_and_counts_the_steps(corpus, tmp_path):
    objective, data = _objective_and_data(corpus, bad_from=4)
    before = {k: v.clone() for k, v in objective.model.state_dict().items()}
    cfg = config(corpus, tmp_path / "s.pt", steps=6, on_nonfinite="skip")
    result = run_training(cfg, objective, data, progress=False)
    assert result["skipped"] == 2
    payload = torch.load(tmp_path / "s.pt", weights_only=True)["train"]
    assert payload["step"] == 6 and payload["skipped"] == 2
    after = objective.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # steps 1-4 trained


def test_huge_lr_exits_nonzero_and_leaves_the_checkpoint_alone(corpus, tmp_path, capsys):
    out = tmp_path / "good.pt"
    args = ["train", "--data", str(corpus), "--out", str(out), "--steps", "4", "--eval-interval",
            "2", "--eval-iters", "1", "--d-model", "16", "--n-layers", "1", "--batch-size", "2",
            "--L", "8", "--no-progress", "--model", "transformer", "--warmup", "0"]  # fmt: skip
    assert main(args) == 0
    good = out.read_bytes()
    assert main([*args, "--overwrite", "--lr", "1e30"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "diverged" in err[0] and "Traceback" not in err[0]
    assert out.read_bytes() == good
    load_checkpoint(out)  # finite, loadable


def test_progress_is_plain_lines_when_stderr_is_not_a_terminal(corpus, tmp_path, capsys):
    train(config(corpus, tmp_path / "p.pt", steps=10, eval_interval=10), progress=True)
    captured = capsys.readouterr()
    assert "\r" not in captured.out + captured.err
    assert "train mar: step 5/10: loss" in captured.out
    assert captured.out.startswith("train mar: 0.01 M parameters; 10 steps; batch 2 × 16 tokens")


def test_lr_schedule_warms_up_then_decays_to_min_lr():
    cfg = TrainConfig(steps=100, warmup=10, lr=1e-3, min_lr=1e-4)
    factors = [lr_factor(s, cfg) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[-1] == pytest.approx(0.1, abs=2e-3)
    assert all(a >= b for a, b in itertools.pairwise(factors[9:]))


def test_checkpoints_are_plain_data_and_written_atomically(corpus, tmp_path):
    train(config(corpus, tmp_path / "m.pt", steps=3), progress=False)
    payload = torch.load(tmp_path / "m.pt", weights_only=True)  # no pickled classes
    assert payload["format"] == "spikemar-checkpoint-1"
    model, tokenizer, _ = load_checkpoint(tmp_path / "m.pt")
    save_checkpoint(tmp_path / "m2.pt", model, tokenizer)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".m")]  # no temp files


def test_bad_training_requests_are_named(corpus, tmp_path):
    with pytest.raises(ValueError, match="model"):
        TrainConfig(model="rnn")
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)
    with pytest.raises(FileNotFoundError, match="resume"):
        train(config(corpus, tmp_path / "none.pt"), resume=True, progress=False)
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")


def test_cli_train_then_generate(corpus, tmp_path, capsys):
    out = tmp_path / "cli.pt"
    assert main(["train", "--data", str(corpus), "--out", str(out), "--steps", "2",
                 "--eval-interval", "2", "--eval-iters", "1", "--d-model", "16", "--n-layers", "1",
                 "--batch-size", "2", "--L", "8", "--no-progress"]) == 0  # fmt: skip
    assert "best validation loss" in capsys.readouterr().out
    assert main(["generate", "--checkpoint", str(out), "--prompt", "Romeo", "--max-new-tokens",
                 "5", "--seed", "1"]) == 0  # fmt: skip
    assert capsys.readouterr().out.startswith("Romeo")
    with pytest.raises(SystemExit):
        main(["generate", "--checkpoint", str(out), "--prompt", "Zebra?"])  # 'Z' not in vocab
    with pytest.raises(SystemExit):
        main(["train", "--steps", "0"])


def test_energy_command_reads_a_trained_checkpoint_and_compares_with_its_dense_twin(
    corpus, tmp_path, capsys
):
    train(config(corpus, tmp_path / "s.pt", steps=2, eval_interval=2), progress=False)
    assert main(["energy", "--checkpoint", str(tmp_path / "s.pt"), "--text", "Romeo, Romeo",
                 "--compare-dense", "--json", str(tmp_path / "r.json")]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "TOTAL" in out and "layers.0.mixer.in_proj" in out
    import json

    report = json.loads((tmp_path / "r.json").read_text())
    assert report["totals"]["acs"] > 0
    assert main(["energy", "--checkpoint", str(tmp_path / "s.pt"), "--text", "Zed"]) == 2
    assert main(["energy", "--checkpoint", str(tmp_path / "missing.pt")]) == 2
