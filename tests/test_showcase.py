"""``spikemar demo``: the packaged student generates, draws its spikes and prices its energy."""

import os
import re

import pytest
import torch
from PIL import Image

from spikemar.checkpoint import load_checkpoint, release_checkpoint
from spikemar.cli import main
from spikemar.showcase import shipped_checkpoint
from spikemar.training import TrainConfig, train


def test_the_packaged_checkpoint_is_a_small_spiking_student_with_its_provenance():
    path = shipped_checkpoint()
    assert path.stat().st_size < 8e6  # a few MB: weights only
    model, tokenizer, payload = load_checkpoint(path)
    assert payload["kind"] == "mar" and "train" not in payload
    made = payload["provenance"]
    assert "spikemar distill --stage 2" in made["command"] and made["seed"] is not None
    assert tokenizer.vocab_size == 65  # Tiny Shakespeare's characters
    text = tokenizer.decode(model.generate(torch.tensor(tokenizer.encode("ROMEO:")), 40,
                                           generator=torch.Generator().manual_seed(0)))  # fmt: skip
    assert text.startswith("ROMEO:") and len(text) == 46


def test_the_packaged_teacher_is_the_dense_model_the_student_was_distilled_from():
    from spikemar.showcase import SHIPPED_TEACHER

    student_payload = load_checkpoint(shipped_checkpoint())[2]
    _, tokenizer, payload = load_checkpoint(shipped_checkpoint(SHIPPED_TEACHER))
    assert payload["kind"] == "mar-dense" and "train" not in payload
    assert shipped_checkpoint(SHIPPED_TEACHER).stat().st_size < 8e6
    assert "spikemar train --model mar-dense" in payload["provenance"]["command"]
    named = student_payload["provenance"]["teacher"]
    assert named["file"] == SHIPPED_TEACHER
    # measured on the student's validation batches, its own run measured on others: near
    assert abs(named["val_loss"] - payload["provenance"]["val_loss"]) < 0.02
    # a teacher worth distilling from: better than its student (validation loss, nats/char)
    assert named["val_loss"] < student_payload["provenance"]["val_loss"] < 1.05 * named["val_loss"]
    assert tokenizer == load_checkpoint(shipped_checkpoint())[1]


def test_demo_on_the_packaged_checkpoint(tmp_path, capsys):
    out = tmp_path / "demo.png"
    assert main(["demo", "--max-new-tokens", "30", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "made by:" in printed and "ROMEO:" in printed and "spike points" in printed
    assert "teacher:    " in printed and "mar_shakespeare_teacher.pt" in printed
    assert "trained from scratch" in printed and "dense teacher" in printed
    compute_only = printed.split("compute only (45nm-fp32): ")[1].split("x less")[0]
    assert float(compute_only.split(", ")[-1]) > 3  # the packaged student: 5.9x at 45nm-fp32
    assert "with memory traffic (45nm-fp32+mem): " in printed  # the honest second figure
    # the headline is per token; the operation counts beside it are of the whole pass
    assert re.search(r"\(over its 37 characters: [\d,]+ ACs \+ [\d,]+ MACs against", printed)
    assert Image.open(out).size[0] > 1000


def test_demo_on_a_trained_checkpoint_and_bad_requests(corpus, tmp_path, capsys):
    small = {"d_model": 16, "n_layers": 2, "d_state": 4, "head_dim": 8}
    for kind in ("mar", "mar-dense"):
        train(TrainConfig(model=kind, model_config=small, data=str(corpus),
                          out=str(tmp_path / f"{kind}.pt"), steps=2, batch_size=2, L=16,
                          eval_interval=2, eval_iters=1), progress=False)  # fmt: skip
    assert main(["demo", "--checkpoint", str(tmp_path / "mar.pt"), "--prompt", "Romeo",
                 "--max-new-tokens", "8", "--out", str(tmp_path / "d.png")]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert (tmp_path / "d.png").is_file() and "made by" not in printed
    # no teacher named: the comparison is with the dense twin, called that
    assert "teacher:    none given" in printed and "its dense twin" in printed
    assert "dense teacher" not in printed
    assert main(["demo", "--checkpoint", str(tmp_path / "mar.pt"), "--teacher",
                 str(tmp_path / "mar-dense.pt"), "--prompt", "Romeo", "--max-new-tokens", "8",
                 "--out", str(tmp_path / "d.png")]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert f"teacher:    {tmp_path / 'mar-dense.pt'}" in printed and "dense teacher" in printed
    assert main(["demo", "--checkpoint", str(tmp_path / "mar.pt"), "--teacher",
                 str(tmp_path / "mar.pt"), "--prompt", "Romeo"]) == 2  # fmt: skip
    assert "--teacher: " in capsys.readouterr().err
    assert main(["demo", "--checkpoint", str(tmp_path / "mar-dense.pt")]) == 2
    assert "dense model" in capsys.readouterr().err
    assert main(["demo", "--checkpoint", str(tmp_path / "mar.pt"), "--prompt", "Zebra"]) == 2
    assert main(["demo", "--checkpoint", str(tmp_path / "missing.pt")]) == 2
    # a profile that prices memory: its ratio once, never called "compute only"
    png = str(tmp_path / "m.png")
    argv = ["demo", "--checkpoint", str(tmp_path / "mar.pt"), "--hardware", "45nm-fp32+mem",
            "--prompt", "Romeo", "--max-new-tokens", "4", "--out", png]  # fmt: skip
    assert main(argv) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "compute only" not in last and last.count("45nm-fp32+mem") == 1, last
    assert main(["demo", "--hardware", "abacus"]) == 2
    assert "error: --hardware: unknown profile 'abacus'" in capsys.readouterr().err
    assert main(["demo", "--teacher", str(tmp_path / "missing.pt"), "--out",
                 str(tmp_path / "new" / "d.png")]) == 2  # fmt: skip
    assert not (tmp_path / "new").exists()  # a failed check leaves no folder behind
    assert f"error: --teacher: no file at {tmp_path / 'missing.pt'}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["demo", "--max-new-tokens", "0"])


@pytest.mark.parametrize("out", ["demo.txt", "demo", "."], ids=["suffix", "no-suffix", "folder"])
def test_demo_refuses_an_out_it_cannot_draw_to_before_generating(out, tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / out), "--max-new-tokens", "5"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing generated, nothing printed, before the one line
    assert captured.err.startswith("spikemar demo: error: --out: ")
    assert len(captured.err.strip().splitlines()) == 1 and os.listdir(tmp_path) == []


def test_demo_on_a_bpe_student_labels_each_token_and_names_the_unit(tmp_path, capsys):
    # a converted student speaks BPE: a token is several characters, or part of one
    import tokenizers

    from spikemar.checkpoint import save_checkpoint
    from spikemar.models import MARLM, MARConfig, SpikeConfig
    from spikemar.tokenizer import HFTokenizer

    byte_level = tokenizers.pre_tokenizers.ByteLevel
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer, bpe.decoder = (
        byte_level(add_prefix_space=False),
        tokenizers.decoders.ByteLevel(),
    )
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, initial_alphabet=byte_level.alphabet(),
                                             show_progress=False)  # fmt: skip
    bpe.train_from_iterator(["O Romeo, Romeo! wherefore art thou Romeo?\n" * 20], trainer)
    torch.manual_seed(0)
    model = MARLM(MARConfig(vocab_size=300, d_model=16, n_layers=2, d_state=4, head_dim=8,
                            ffn=None, spikes=SpikeConfig(T=2)))  # fmt: skip
    result = {"dense_loss": 5.61234, "student_loss": 5.7, "rates": {"a": 0.2}}
    made = {"command": "spikemar convert ...", "data": "romeo.txt", "seed": 0, "result": result}
    save_checkpoint(tmp_path / "bpe.pt", model.eval(), HFTokenizer(bpe), provenance=made)
    argv = ["demo", "--checkpoint", str(tmp_path / "bpe.pt"), "--prompt", "O Romeo, Romeo",
            "--max-new-tokens", "6", "--out", str(tmp_path / "d.png")]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "result:   dense_loss 5.612, student_loss 5.7\n" in printed  # convert's dict, readable
    n = len(HFTokenizer(bpe).encode("O Romeo, Romeo")) + 6
    assert f"(over its {n} tokens: " in printed and (tmp_path / "d.png").is_file()


def test_release_checkpoint_drops_the_training_state_and_keeps_the_provenance(corpus, tmp_path):
    small = {"d_model": 16, "n_layers": 2, "d_state": 4, "head_dim": 8}
    train(TrainConfig(model="mar", model_config=small, data=str(corpus),
                      out=str(tmp_path / "run.pt"), steps=2, batch_size=2, L=16,
                      eval_interval=2, eval_iters=1), progress=False)  # fmt: skip
    made = {"command": "spikemar train ...", "data": "romeo.txt", "seed": 1337, "result": "-"}
    release_checkpoint(tmp_path / "run.pt", tmp_path / "release.pt", made)
    model, _, payload = load_checkpoint(tmp_path / "release.pt")
    trained = load_checkpoint(tmp_path / "run.pt")[0]
    assert "train" not in payload and payload["provenance"] == made
    assert (tmp_path / "release.pt").stat().st_size < (tmp_path / "run.pt").stat().st_size / 2
    for name, value in trained.state_dict().items():
        assert torch.equal(model.state_dict()[name], value)
    with pytest.raises(ValueError, match="provenance"):
        release_checkpoint(tmp_path / "run.pt", tmp_path / "bad.pt", {"command": "x"})


def test_dense_twin_keeps_every_weight_but_the_thresholds():
    from spikemar.checkpoint import dense_twin

    student = load_checkpoint(shipped_checkpoint())[0]
    twin = dense_twin(student)
    assert twin.config.spikes is None and not twin.training
    for name, value in twin.state_dict().items():
        assert torch.equal(value, student.state_dict()[name]), name
    with pytest.raises(ValueError, match="dense MARLM"):
        dense_twin(twin)
