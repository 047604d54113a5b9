"""The distillation trainer: both stages, weight transfer, resume bit for bit, DDP == 1 process,
a Hugging Face teacher, and bad configurations named."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROMEO
from references.hf_checkpoints import write_mamba2_checkpoint

from spikemar.checkpoint import build_model, load_checkpoint
from spikemar.cli import main
from spikemar.convert import convert
from spikemar.data import TokenDataset
from spikemar.distill import DistillConfig, DistillObjective, Teacher, distill, transfer_weights
from spikemar.models import from_pretrained
from spikemar.training import TrainConfig, train

SSM = {"d_model": 16, "n_layers": 2, "d_state": 4, "head_dim": 8}


def loop(corpus, out, **kw) -> dict:
    base = {"data": str(corpus), "out": str(out), "steps": 6, "batch_size": 4, "L": 16,
            "eval_interval": 3, "eval_iters": 1, "warmup": 2}  # fmt: skip
    return {**base, **kw}


@pytest.fixture
def transformer_ckpt(corpus, tmp_path):
    out = tmp_path / "transformer.pt"
    shape = {"d_model": 16, "n_layers": 2, "n_heads": 2}
    cfg = TrainConfig(**loop(corpus, out, steps=4, model="transformer", model_config=shape))
    train(cfg, progress=False)
    return out


@pytest.fixture
def dense_ckpt(corpus, tmp_path):
    out = tmp_path / "dense.pt"
    train(TrainConfig(**loop(corpus, out, steps=4, model="mar-dense", model_config=SSM)),
          progress=False)  # fmt: skip
    return out


def test_stage1_transfers_weights_and_alignment_trains_each_layer_on_the_teachers_stream(
    corpus, transformer_ckpt
):
    teacher = Teacher.load(str(transformer_ckpt))
    student = build_model("mar-dense", {"vocab_size": teacher.vocab_size, **SSM})
    report = transfer_weights(teacher.model, student)
    assert "embed.weight" in report["copied"] and "layers.1.ffn.down.weight" in report["copied"]
    assert "head.weight" in report["copied"] and "layers.0.norm1.weight" in report["copied"]
    assert all("mixer" in k for k in report["kept"])
    assert torch.equal(student.layers[1].ffn.up.weight, teacher.model.blocks[1].ffn.up.weight)

    cfg = DistillConfig(**loop(corpus, "unused.pt", stage=1, teacher=str(transformer_ckpt)))
    objective = DistillObjective(student, teacher, cfg)
    objective.begin_step(0)
    assert objective.aligning  # the first quarter of the steps
    x, y = TokenDataset.from_text_file(str(corpus)).batch("train", 4, 16)
    _, states = teacher.stream(x)
    assert len(states) == 3  # entering layers 0 and 1, leaving layer 1
    loss, _ = objective(x, y)
    expected = sum((student.layers[j](states[j]) - states[j + 1]).norm(dim=-1).mean()
                   for j in range(2)) / 2  # fmt: skip
    torch.testing.assert_close(loss, expected)
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-2)
    for _ in range(15):
        optimizer.zero_grad()
        objective(x, y)[0].backward()
        optimizer.step()
    assert objective(x, y)[0] < 0.8 * loss
    objective.begin_step(cfg.align_steps)
    assert not objective.aligning and set(objective(x, y)[1]) == {"fkl", "rkl", "feat"}


def test_stage2_student_starts_as_the_teacher_and_matches_it_with_fine_spikes(corpus, dense_ckpt):
    teacher = Teacher.load(str(dense_ckpt))
    fine = {"spikes": {"T": 64, "v_threshold": 0.1}}
    cfg = DistillConfig(**loop(corpus, "unused.pt", stage=2, teacher=str(dense_ckpt),
                               student_config=fine))  # fmt: skip
    from spikemar.distill.trainer import build_student

    student = build_student(teacher, cfg, teacher.vocab_size)
    assert student.config.spikes.T == 64 and student.config.d_state == SSM["d_state"]
    for name, value in teacher.model.state_dict().items():
        assert torch.equal(student.state_dict()[name], value), name
    x, y = TokenDataset.from_text_file(str(corpus)).batch("val", 4, 16)
    with torch.no_grad():
        terms = DistillObjective(student, teacher, cfg)(x, y)[1]
    # a count code of resolution V = 0.1 and range 6.5 (summed over the 16 positions)
    assert terms["fkl"] < 5e-3 and terms["rkl"] < 5e-3
    coarse = DistillConfig(**{**vars(cfg), "student_config": {"spikes": {"T": 1}}})
    with torch.no_grad():
        rough = DistillObjective(build_student(teacher, coarse, 65), teacher, coarse)(x, y)[1]
    assert rough["fkl"] > 10 * terms["fkl"]


@pytest.mark.parametrize("where", ["after the batch", "after the update"])
@pytest.mark.parametrize("stage", [1, 2])
def test_resume_after_an_interrupt_mid_step_matches_the_uninterrupted_run(
    corpus, tmp_path, monkeypatch, transformer_ckpt, dense_ckpt, stage, where, interrupt_in_step_3
):
    # stage 1 crosses from alignment into distillation; stage 2 trains a feature projection
    # (a student narrower than the teacher, from random weights) that must be restored too
    if stage == 1:
        extra = {"stage": 1, "teacher": str(transformer_ckpt), "align_steps": 2,
                 "student_config": {"d_state": 4, "head_dim": 8}}  # fmt: skip
    else:
        extra = {"stage": 2, "teacher": str(dense_ckpt), "init_from_teacher": False,
                 "student_config": {"d_model": 8, "head_dim": 4}}  # fmt: skip
    extra["eval_interval"] = 4  # the checkpoint at the interrupt comes from the Ctrl-C handler
    distill(DistillConfig(**loop(corpus, tmp_path / "a.pt", **extra)), progress=False)
    reference = load_checkpoint(tmp_path / "a.pt")[2]

    with monkeypatch.context() as patch:  # the teacher's evaluation draws one batch first
        interrupt_in_step_3(patch, where, draws_before=1)
        with pytest.raises(KeyboardInterrupt):
            distill(DistillConfig(**loop(corpus, tmp_path / "b.pt", **extra)), progress=False)
    saved = torch.load(tmp_path / "b.pt", weights_only=True)["train"]["step"]
    assert saved == (2 if where == "after the batch" else 3)
    distill(DistillConfig(**loop(corpus, tmp_path / "b.pt", **extra)), resume=True,
            progress=False)  # fmt: skip
    resumed = load_checkpoint(tmp_path / "b.pt")[2]
    for name, value in reference["model"].items():
        assert torch.equal(value, resumed["model"][name]), name
    assert reference["train"]["history"] == resumed["train"]["history"]
    if stage == 2:
        projection = reference["train"]["objective"]["projection"]
        assert projection and all(torch.equal(v, resumed["train"]["objective"]["projection"][k])
                                  for k, v in projection.items())  # fmt: skip


@pytest.mark.parametrize("stage", [1, 2])
def test_ddp_with_two_cpu_processes_equals_one_process_on_the_same_global_batch(
    corpus, tmp_path, transformer_ckpt, dense_ckpt, stage
):
    # stage 1: alignment (unused parameters) then distillation; stage 2: a narrower spiking
    # student from random weights, so a learned feature projection is trained as well
    if stage == 1:
        teacher, extra = transformer_ckpt, ["--align-steps", "2", "--head-dim", "8",
                                            "--d-state", "4"]  # fmt: skip
    else:
        teacher, extra = dense_ckpt, ["--no-init-from-teacher", "--d-model", "8",
                                      "--head-dim", "4"]  # fmt: skip
    args = ["distill", "--stage", str(stage), "--teacher", str(teacher), "--data", str(corpus),
            "--steps", "4", "--batch-size", "4", "--L", "16", "--eval-interval", "2",
            "--eval-iters", "1", "--warmup", "2", "--no-progress", *extra]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HOME": os.environ["HOME"]}
    one = subprocess.run([sys.executable, "-m", "spikemar", *args, "--out", str(tmp_path / "1.pt")],
                         env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "spikemar", *args, "--out", str(tmp_path / "2.pt")],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr
    a, b = (load_checkpoint(tmp_path / f"{n}.pt")[2] for n in (1, 2))
    for h1, h2 in zip(a["train"]["history"], b["train"]["history"], strict=True):
        assert h1["val"] == pytest.approx(h2["val"], rel=1e-5)
    for name, value in a["model"].items():
        torch.testing.assert_close(b["model"][name], value, rtol=1e-4, atol=1e-5)
    assert stage == 1 or a["train"]["objective"]["projection"]
    for name, value in a["train"]["objective"].get("projection", {}).items():
        torch.testing.assert_close(b["train"]["objective"]["projection"][name], value,
                                   rtol=1e-4, atol=1e-5)  # fmt: skip


def test_a_hugging_face_teacher_from_a_local_directory(corpus, tmp_path):
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=TokenDataset.from_text_file(str(corpus)).vocab_size, hidden_size=16,
        intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    teacher = Teacher.load(str(tmp_path / "llama"))
    assert teacher.hf and (teacher.vocab_size, teacher.n_layers, teacher.width) == (
        config.vocab_size, 2, 16)  # fmt: skip
    x = torch.randint(0, config.vocab_size, (2, 8))
    seen = []
    hooks = [layer.register_forward_pre_hook(lambda m, args, kwargs: seen.append(args[0] if args
                                             else kwargs["hidden_states"]), with_kwargs=True)
             for layer in teacher.layers]  # fmt: skip
    logits, states = teacher.stream(x)
    for hook in hooks:
        hook.remove()
    assert logits.shape == (2, 8, config.vocab_size) and len(states) == 3
    for j in range(2):
        torch.testing.assert_close(states[j], seen[j])  # entering decoder layer j
    with torch.no_grad():  # leaving the last layer: the final norm and head give the logits
        model = teacher.model
        torch.testing.assert_close(model.lm_head(model.model.norm(states[2])), logits)
    result = distill(DistillConfig(**loop(corpus, tmp_path / "s.pt", stage=1,
                                          teacher=str(tmp_path / "llama"), steps=4,
                                          student_config={"d_state": 4, "head_dim": 8})),
                     progress=False)  # fmt: skip
    history = result["history"]  # the alignment phase covers both layers, then distillation
    assert len(history) == 2 and history[-1]["val"] < history[0]["val"] + 0.5
    assert load_checkpoint(tmp_path / "s.pt")[2]["kind"] == "mar-dense"
    config.vocab_size = 70
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "wide")
    with pytest.raises(ValueError, match="vocabulary"):
        distill(DistillConfig(**loop(corpus, tmp_path / "w.pt", stage=1,
                                     teacher=str(tmp_path / "wide"))), progress=False)  # fmt: skip


def test_bfloat16_autocast_runs_a_spiking_student(corpus, tmp_path, dense_ckpt):
    cfg = loop(corpus, tmp_path / "bf.pt", stage=2, amp="bf16", teacher=str(dense_ckpt), steps=3)
    result = distill(DistillConfig(**cfg), progress=False)
    assert torch.isfinite(torch.tensor(result["best_val"]))


def test_bad_distillation_requests_are_named(corpus, tmp_path, transformer_ckpt, dense_ckpt):
    with pytest.raises(ValueError, match="stage"):
        DistillConfig(stage=3, teacher="t.pt")
    with pytest.raises(ValueError, match="teacher"):
        DistillConfig(stage=2)
    with pytest.raises(ValueError, match="every loss term"):
        DistillConfig(teacher="t.pt", alpha=0, beta=0, feature=None)
    with pytest.raises(ValueError, match="align_steps"):
        DistillConfig(stage=2, teacher="t.pt", align_steps=3)
    with pytest.raises(ValueError, match="overwrite its teacher"):
        DistillConfig(stage=2, teacher="runs/student.pt")
    with pytest.raises(ValueError, match="every loss term"):
        DistillConfig(teacher="t.pt", alpha=0, beta=0, gamma=0)
    with pytest.raises(FileNotFoundError, match="teacher"):
        distill(DistillConfig(**loop(corpus, tmp_path / "s.pt", teacher=str(tmp_path / "no.pt"))))
    other = tmp_path / "other.txt"  # a different character set: a different vocabulary
    other.write_text("abcdefghij klmnop\n" * 100)
    with pytest.raises(ValueError, match="vocabular"):
        distill(DistillConfig(**loop(other, tmp_path / "s.pt", teacher=str(dense_ckpt))))
    with pytest.raises(ValueError, match="mar-dense"):  # stage 2 starts from a dense SSM
        distill(DistillConfig(**loop(corpus, tmp_path / "s.pt", teacher=str(transformer_ckpt))))
    with pytest.raises(ValueError, match="max_len"):
        distill(DistillConfig(**loop(corpus, tmp_path / "s.pt", stage=1, L=32,
                                     teacher=str(transformer_ckpt))))  # fmt: skip
    with pytest.raises(ValueError, match="layers"):
        distill(DistillConfig(**loop(corpus, tmp_path / "s.pt", stage=1,
                                     teacher=str(transformer_ckpt),
                                     student_config={"n_layers": 3})))  # fmt: skip
    with pytest.raises(FileNotFoundError, match="resume"):
        distill(DistillConfig(**loop(corpus, tmp_path / "none.pt", teacher=str(dense_ckpt))),
                resume=True)  # fmt: skip
    distill(DistillConfig(**loop(corpus, tmp_path / "r.pt", teacher=str(dense_ckpt), steps=2)),
            progress=False)  # fmt: skip
    with pytest.raises(ValueError, match=r"resume: .*beta"):  # another loss: another run
        distill(DistillConfig(**loop(corpus, tmp_path / "r.pt", teacher=str(dense_ckpt),
                                     steps=2, beta=0.0)), resume=True)  # fmt: skip
    with pytest.raises(SystemExit):
        main(["distill", "--stage", "4", "--teacher", str(dense_ckpt)])
    with pytest.raises(SystemExit):
        main(["distill", "--stage", "1", "--teacher", str(transformer_ckpt), "--T", "4"])
    with pytest.raises(SystemExit):
        main(["distill", "--stage", "2", "--teacher", str(tmp_path / "missing.pt")])


def test_pipeline_example_runs_and_resumes(tmp_path, monkeypatch, capsys):
    import importlib.util
    from pathlib import Path

    monkeypatch.setenv("HOME", str(tmp_path))
    corpus = tmp_path / "play.txt"
    corpus.write_text(ROMEO * 4)
    path = Path(__file__).parents[1] / "examples" / "distill_pipeline.py"
    spec = importlib.util.spec_from_file_location("distill_pipeline", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    argv = ["--quick", "--data", str(corpus), "--out", str(tmp_path / "p"), "--no-progress",
            "--rows", "binary", "sbds"]  # fmt: skip
    assert example.main(argv) == 0
    table = (tmp_path / "p" / "results.md").read_text()
    assert "full SBDS" in table and "binary spikes" in table and "ATMN + forward KL" not in table
    results = json.loads((tmp_path / "p" / "results.json").read_text())
    assert results["sbds/seed1"]["energy_ratio"] > 1 and results["sbds/seed1"]["step"] == 20
    capsys.readouterr()
    assert example.main(argv) == 0  # everything finished: every stage is skipped
    assert capsys.readouterr().out.count("done, skipped") == 4


def test_mamba2_teacher_states_are_the_layers_inputs(tmp_path):
    """transformers' Mamba-2 puts layer 0's *output* at hidden_states[0]; the teacher's state j
    is the stream entering layer j (the embedding for j = 0)."""
    hf = write_mamba2_checkpoint(tmp_path / "m2")
    teacher = Teacher.load(str(tmp_path / "m2"))
    assert not teacher.hf and teacher.tokenizer is not None  # read into spikemar's own model
    x = torch.randint(0, 300, (2, 10))
    logits, states = teacher.stream(x)
    with torch.no_grad():
        out = hf(x, output_hidden_states=True)
        embedded = hf.backbone.embeddings(x)
    hs = out.hidden_states
    assert len(states) == 3 and len(hs) == 3
    torch.testing.assert_close(logits, out.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(states[0], embedded)
    assert not torch.allclose(hs[0], embedded)  # the trap: index 0 is not the embedding
    for j in (1, 2):  # entering layer 1 = leaving layer 0, ...; leaving the last layer
        torch.testing.assert_close(states[j], hs[j - 1], rtol=1e-4, atol=1e-4)


def test_stage2_from_a_converted_pretrained_student(corpus, tmp_path, capsys):
    write_mamba2_checkpoint(tmp_path / "m2")
    student = tmp_path / "student.pt"
    convert(tmp_path / "m2", student, spikes={"T": 4}, data=corpus, calib_batches=1,
            eval_batches=1, batch_size=2, L=16)  # fmt: skip
    code = main(["distill", "--stage", "2", "--teacher", str(tmp_path / "m2"), "--student",
                 str(student), "--data", str(corpus), "--out", str(tmp_path / "s2.pt"),
                 "--steps", "2", "--batch-size", "2", "--L", "16", "--eval-interval", "2",
                 "--eval-iters", "1", "--no-progress"])  # fmt: skip
    printed = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and "nats/token" in printed[-1]
    model, tok, payload = load_checkpoint(tmp_path / "s2.pt")
    assert tok == load_checkpoint(student)[1] and tok.vocab_size == 300
    assert model.config.spikes is not None and payload["kind"] == "mar"
    with pytest.raises(ValueError, match="student_config"):
        DistillConfig(**loop(corpus, tmp_path / "x.pt", stage=2, teacher=str(tmp_path / "m2"),
                             student=str(student), student_config={"d_state": 4}))  # fmt: skip
    with pytest.raises(ValueError, match="stage 2"):
        DistillConfig(**loop(corpus, tmp_path / "x.pt", stage=1, teacher=str(tmp_path / "m2"),
                             student=str(student)))  # fmt: skip


def test_student_flags_beside_a_converted_student_are_named(corpus, tmp_path, capsys):
    """The library's student_config is the command's --T/--tau/... flags: the error names
    them (it said 'student_config: ...', no flag of the command)."""
    with pytest.raises(SystemExit) as exit_:
        main(["distill", "--stage", "2", "--teacher", str(tmp_path / "m2"), "--student",
              str(tmp_path / "student.pt"), "--T", "2", "--tau", "2", "--data", str(corpus),
              "--out", str(tmp_path / "s.pt")])  # fmt: skip
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "error: --T/--tau: " in err and "already fixes the student" in err
    assert "student_config" not in err.partition("fixes")[0]


def test_a_teacher_without_a_tokenizer_takes_one_from_elsewhere(corpus, tmp_path, capsys):
    """As state-spaces/mamba2-130m, whose directory ships no tokenizer: --tokenizer names one
    (convert and distill alike); without it the error says so in one line."""
    from references.hf_checkpoints import bpe_tokenizer

    write_mamba2_checkpoint(tmp_path / "m2", tokenizer=False)
    tok = bpe_tokenizer(300)
    tok.save(tmp_path / "tok")
    student = tmp_path / "student.pt"
    convert(tmp_path / "m2", student, spikes={"T": 4}, data=corpus, tokenizer=tmp_path / "tok",
            calib_batches=1, eval_batches=1, batch_size=2, L=16)  # fmt: skip
    argv = ["distill", "--stage", "2", "--teacher", str(tmp_path / "m2"), "--student",
            str(student), "--data", str(corpus), "--out", str(tmp_path / "s2.pt"), "--steps", "2",
            "--batch-size", "2", "--L", "16", "--eval-interval", "2", "--eval-iters", "1",
            "--no-progress"]  # fmt: skip
    capsys.readouterr()  # transformers' warnings while the checkpoint is made
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and "\n" not in err
    assert "--teacher: " in err and "has no tokenizer" in err and "pass --tokenizer" in err
    assert main([*argv, "--tokenizer", str(tmp_path / "tok")]) == 0
    assert load_checkpoint(tmp_path / "s2.pt")[1] == tok


def test_the_objective_reads_the_students_spike_points(tmp_path):
    # per-point settings: SBDS divides by the largest T among the points; a student built on a
    # teacher is the teacher plus what its spike points own, found through spike_points()
    from spikemar.convert import spike_point_state_names, spiking_student
    from spikemar.models import MARLM, MARConfig, SpikeConfig

    dense = MARLM(MARConfig(vocab_size=20, **SSM, spikes=None)).eval()
    points = {"layers.0.mixer.spike_in": {"T": 2}, "layers.1.ffn.spike_hidden": {"T": 3}}
    student = spiking_student(dense, SpikeConfig(T=4), points=points)
    config = DistillConfig(teacher=str(tmp_path / "t.pt"), out=str(tmp_path / "s.pt"))
    objective = DistillObjective(student, Teacher(dense, "in memory"), config)
    assert objective.T == 3
    owned = spike_point_state_names(student)
    assert owned and owned == set(student.state_dict()) - set(dense.state_dict())
    assert sorted({name.rsplit(".", 2)[0] for name in owned}) == sorted(points)
    assert spike_point_state_names(dense) == set()


def _example(name: str):
    """An example script of the repository, imported as a module (its main() not run)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_prints_every_loss_on_the_same_held_out_windows():
    """examples/mar_from_pretrained.py's last line: teacher, converted and distilled student on
    the windows convert measured (it put convert's number beside distill's random batches, and
    the best validation's beside the last step's weights)."""
    from spikemar.convert import _loss

    example = _example("mar_from_pretrained")
    torch.manual_seed(0)
    model = build_model("mar-dense", {"vocab_size": 20, **SSM}).eval()
    windows = torch.randint(0, 20, (5, 9))
    with torch.no_grad():
        logits = model(windows[:, :-1])
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten())
    assert example.held_out_loss(model, windows, batch_size=2) == pytest.approx(float(expected))
    assert example.held_out_loss(model, windows) == pytest.approx(_loss(model, windows, 3))


def test_example_teacher_trains_on_a_folder(tmp_path, monkeypatch):
    """--data may be a folder or a .jsonl, as everywhere else (the teacher's text was read with
    read_text: 'no text file at' for a folder)."""
    monkeypatch.setenv("HOME", str(tmp_path))  # the token cache under ~/.cache
    example = _example("mar_from_pretrained")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text(ROMEO)
    (corpus / "b.jsonl").write_text(json.dumps({"text": ROMEO}) + "\n")
    example.train_teacher(tmp_path / "teacher", corpus, steps=1, seed=0, batch_size=2)
    model = from_pretrained(tmp_path / "teacher")
    assert model.tokenizer.decode(model.tokenizer.encode(ROMEO)) == ROMEO


def test_gradient_checkpointing_and_a_bfloat16_teacher(corpus, tmp_path, capsys):
    """--gradient-checkpointing makes the same updates (the layers recomputed in the backward,
    bit for bit); --teacher-dtype bfloat16 holds the teacher in bfloat16 (its residual stream
    in float32, as transformers') and trains against its float32-cast outputs: the loss moves
    by bfloat16 rounding, not more."""
    write_mamba2_checkpoint(tmp_path / "m2")
    student = tmp_path / "student.pt"
    convert(tmp_path / "m2", student, spikes={"T": 4}, data=corpus, calib_batches=1,
            eval_batches=1, batch_size=2, L=16)  # fmt: skip

    def run(name: str, *flags: str):
        code = main(["distill", "--stage", "2", "--teacher", str(tmp_path / "m2"), "--student",
                     str(student), "--data", str(corpus), "--out", str(tmp_path / name),
                     "--steps", "2", "--batch-size", "2", "--L", "16", "--eval-interval", "2",
                     "--eval-iters", "1", "--no-progress", *flags])  # fmt: skip
        capsys.readouterr()
        assert code == 0
        model, _, payload = load_checkpoint(tmp_path / name)
        return model.state_dict(), payload

    plain, _ = run("plain.pt")
    recomputed, saved = run("ckpt.pt", "--gradient-checkpointing")
    assert saved["train"]["config"]["gradient_checkpointing"] is True
    assert all(torch.equal(plain[k], recomputed[k]) for k in plain)
    half, saved = run("bf16.pt", "--teacher-dtype", "bfloat16")
    assert saved["train"]["config"]["teacher_dtype"] == "bfloat16"
    moved = max((plain[k] - half[k]).abs().max().item() for k in plain)
    assert 0 < moved < 1e-2
    with pytest.raises(ValueError, match="teacher_dtype: expected one of"):
        DistillConfig(**loop(corpus, tmp_path / "x.pt", stage=2, teacher=str(tmp_path / "m2"),
                             teacher_dtype="int8"))  # fmt: skip


def test_a_spiking_teacher_is_refused_in_one_line(corpus, tmp_path, capsys):
    """--teacher and --student swapped: the spiking student is no teacher (it ran, distilling
    from the quantised model)."""
    write_mamba2_checkpoint(tmp_path / "m2")
    student = tmp_path / "student.pt"
    convert(tmp_path / "m2", student, spikes={"T": 4}, data=corpus, calib_batches=1,
            eval_batches=1, batch_size=2, L=16)  # fmt: skip
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["distill", "--stage", "2", "--teacher", str(student), "--student",
              str(tmp_path / "m2"), "--data", str(corpus), "--out", str(tmp_path / "s.pt"),
              "--steps", "1"])  # fmt: skip
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "--teacher: " in err and "is a spiking model" in err and "swapped" in err
    assert not (tmp_path / "s.pt").exists()


def test_a_bfloat16_teacher_leaves_the_students_start_in_float32(corpus, tmp_path, capsys):
    """--teacher-dtype casts the frozen teacher only: a student built from the teacher's
    weights starts from their float32 values (a step at lr ~0 leaves them as they are)."""
    from spikemar.models import from_pretrained

    write_mamba2_checkpoint(tmp_path / "m2")
    code = main(["distill", "--stage", "2", "--teacher", str(tmp_path / "m2"), "--data",
                 str(corpus), "--out", str(tmp_path / "s.pt"), "--steps", "1", "--lr", "1e-30",
                 "--batch-size", "2", "--L", "16", "--eval-interval", "1", "--eval-iters", "1",
                 "--warmup", "0", "--no-progress", "--teacher-dtype", "bfloat16"])  # fmt: skip
    capsys.readouterr()
    assert code == 0
    student = load_checkpoint(tmp_path / "s.pt")[0].state_dict()
    teacher = from_pretrained(tmp_path / "m2").state_dict()
    assert all(torch.equal(student[k], v) for k, v in teacher.items())


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--teacher-steps", "0"], "--teacher-steps: expected an int >= 1, got 0"),
        (["--distill-steps", "-2"], "--distill-steps: expected an int >= 1, got -2"),
        (["--T", "0"], "--T: expected an int >= 1, got 0"),
        (["--firing-rate", "1.5"], "--firing-rate: expected a fraction in (0, 1), got 1.5"),
        (["--data", "nowhere.txt"], "--data: no text file or folder at nowhere.txt"),
    ],
)
def test_example_refuses_bad_arguments_before_the_teacher_trains(tmp_path, capsys, flags,
                                                                 message):  # fmt: skip
    example = _example("mar_from_pretrained")
    with pytest.raises(SystemExit) as exit_:
        example.main(["--out", str(tmp_path / "out"), *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and message in err[-1]
    assert not (tmp_path / "out").exists()  # nothing trained, nothing written


def test_stage1_refuses_a_teacher_without_attention(corpus, tmp_path, capsys):
    """Stage 1 replaces attention with SSM mixers: a dense SSM teacher has none, every tensor
    of it transferred, and the run 'distilled' a copy of the teacher into itself."""
    from spikemar.checkpoint import save_checkpoint

    vocab = TokenDataset.from_text_file(corpus).tokenizer
    teacher = save_checkpoint(tmp_path / "dense.pt", build_model("mar-dense", {
        "vocab_size": vocab.vocab_size, **SSM}), vocab)  # fmt: skip
    out = tmp_path / "s.pt"
    with pytest.raises(SystemExit) as exit_:
        main(["distill", "--stage", "1", "--teacher", str(teacher), "--data", str(corpus),
              "--out", str(out), "--steps", "1", "--d-state", "4", "--head-dim", "8"])  # fmt: skip
    (err,) = capsys.readouterr().err.splitlines()
    assert exit_.value.code == 2 and err.startswith("spikemar distill: error: --teacher: stage 1 ")
    assert "without attention layers" in err and "--stage 2" in err and not out.exists()


def test_stage1_of_a_hybrid_keeps_its_architecture_with_ssms_for_attention(corpus, tmp_path):
    """A dense MAR hybrid's stage-1 student is the teacher's own configuration with its
    attention layers made SSMs (it was the default configuration, so the SSM layers' and
    FFNs' tensors did not transfer where the teacher's shapes differed, and spikemar refine
    --stage1 refused the result); every tensor outside the attention layers' mixers is
    copied."""
    from spikemar.distill.trainer import build_student
    from spikemar.refine import replaceable_layers

    vocab = TokenDataset.from_text_file(corpus).tokenizer
    hybrid = build_model("mar-dense", {"vocab_size": vocab.vocab_size, **SSM, "n_layers": 3,
                                       "layers": ["ssm", "attn", "ssm"], "n_attn_heads": 2,
                                       "ffn_hidden": 24})  # fmt: skip
    teacher = Teacher(hybrid, "hybrid.pt", vocab)
    config = DistillConfig(**loop(corpus, tmp_path / "s.pt", stage=1, teacher="hybrid.pt"))
    student = build_student(teacher, config, vocab.vocab_size)
    assert student.config.layer_kinds() == ["ssm", "ssm", "ssm"]
    assert replaceable_layers(hybrid, student) == {1: "ssm"}
    theirs = hybrid.state_dict()
    for name, tensor in student.state_dict().items():
        if not name.startswith("layers.1.mixer."):
            assert torch.equal(tensor, theirs[name]), name
