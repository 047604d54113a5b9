"""Refinement (issue 16) from outside: bad arguments at the public boundary, each one error
naming the argument, before any work."""

from __future__ import annotations

import importlib
import json

import pytest
import torch

from spikemar import energy
from spikemar.models import MARLM, MARConfig
from spikemar.refine import Measurements, Option, measure, pareto_plot, plan, random_schedule

SMALL = dict(vocab_size=11, d_model=16, n_layers=1, d_state=4, head_dim=8)
T4 = {"T": 4, "v_threshold": 0.5}


def _teacher() -> MARLM:
    torch.manual_seed(0)
    return MARLM(MARConfig(**SMALL, spikes=None)).eval()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        # range() arg 3 must not be zero / float division by zero
        ({"batch_size": 0}, r"^batch_size: expected an int >= 1, got 0$"),
        ({"batch_size": -1}, r"^batch_size: expected an int >= 1, got -1$"),
        # 'tokens: expected non-empty token ids' from inside the energy counter
        ({"energy_windows": 0}, r"^energy_windows: expected an int >= 1, got 0$"),
        # 'dictionary update sequence element #0 has length 1' after the point was measured
        ({"options": ("spike",)}, r"^options\[0\]: expected a spike-point setting as a dict"),
        # SpikeConfig's 'T: expected an int >= 1' named no option
        ({"options": ({"T": "abc"},)}, r"^options\[0\]: T: expected an int >= 1"),
        ({"options": ({"V": 1.0},)}, r"^options\[0\]: unknown spike fields \['V'\]"),
        # a dict was read as its keys: "points[...]: expected 'dense', 'spike' or a dict, got 'T'"
        ({"options": T4}, r"^options: expected a sequence of spike-point settings"),
        ({"options": ({"mixer": "ssm"},)}, r"^options\[0\]: \{'mixer': 'ssm'\} replaces a layer"),
        (
            {"sparsify": ({"sparsify": "topk", "amount": 3},), "hardware": "45nm-fp32+zs"},
            r"^sparsify\[0\]: 'topk' keeps a fraction in \(0, 1\], got 3$",
        ),
    ],
)
def test_measure_names_a_bad_argument_before_any_work(kwargs, message, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("measured before the arguments were checked")

    monkeypatch.setattr(energy, "profile", no_work)
    teacher, windows = _teacher(), torch.randint(0, 11, (2, 9))
    with pytest.raises(ValueError, match=message):
        measure(teacher, windows, **{"options": (T4,), "sparsify": (), **kwargs})


def test_measure_refuses_empty_windows_by_name():
    # it was named 'tokens' (the energy counter's argument)
    with pytest.raises(ValueError, match=r"^windows: expected at least one window, got \(0, 9\)"):
        measure(_teacher(), torch.zeros(0, 9, dtype=torch.long), options=(T4,), sparsify=())


def test_measure_under_a_profile_object_saves_its_table(tmp_path):
    """``hardware`` may be a HardwareProfile (check_hardware takes one): the table records its
    name (it kept the object, and saving the table failed: not JSON serializable)."""
    teacher, windows = _teacher(), torch.randint(0, 11, (2, 9))
    profile = energy.get_profile("45nm-fp16")
    m = measure(teacher, windows, options=(T4,), sparsify=(), energy_windows=1, hardware=profile)
    assert m.hardware == "45nm-fp16"
    loaded = Measurements.load(m.save(tmp_path / "m.json"))
    assert loaded.to_json() == m.to_json()


def test_plan_and_random_schedule_name_bad_budgets():
    options = [Option("a", "dense", 0.0, 1.0, 0.0), Option("a", T4, 0.1, 1.0, 5.0)]
    m = Measurements({"a": options}, 10.0, 1.0, "45nm-fp32")
    for kwargs, message in [
        ({"energy_ratio": "5"}, r"^energy_ratio: expected a number >= 1, got '5'$"),  # TypeError
        ({"energy_ratio": float("nan")}, r"^energy_ratio: expected a number >= 1, got nan$"),
        ({"max_kl": "0.1"}, r"^max_kl: expected a number >= 0, got '0.1'$"),
        ({"max_kl": -1.0}, r"^max_kl: expected a number >= 0, got -1.0$"),
    ]:
        with pytest.raises(ValueError, match=message):
            plan(m, **kwargs)
    with pytest.raises(ValueError, match=r"^tries: expected an int >= 1, got 0$"):
        random_schedule(m, 1.5, tries=0)  # returned None
    with pytest.raises(ValueError, match=r"^energy_ratio: expected a number >= 1, got '2'$"):
        random_schedule(m, "2")


def test_refine_option_is_checked_by_argparse(tmp_path, capsys):
    """A bad --option is argparse's one line naming --option, before the teacher is loaded (it
    failed inside the first measurement, naming only the spike field)."""
    from spikemar.cli import main

    for option, message in [
        ("T=abc", "argument --option: 'T=abc': T: expected an int >= 1"),
        ("T=4,tau=0", "argument --option: 'T=4,tau=0': tau: expected a float > 0"),
        ("mixer=ssm", "argument --option: 'mixer=ssm': {'mixer': 'ssm'} replaces a layer's"),
    ]:
        argv = ["refine", "--teacher", str(tmp_path / "none.pt"), "--budget-kl", "1", "--out",
                str(tmp_path / "o"), "--option", option]  # fmt: skip
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        err = capsys.readouterr().err.strip()
        assert exit_.value.code == 2 and "\n" not in err and message in err, err
    assert not (tmp_path / "o").exists()


def test_refine_out_below_a_file_is_refused_before_any_work(tmp_path, capsys):
    """--out under a file: one line naming --out before the teacher is measured (the first
    module's table failed to save: "path: cannot write '.../measurements.partial.json'")."""
    from test_refine import _refine_argv, _tiny_corpus

    from spikemar.checkpoint import save_checkpoint
    from spikemar.cli import main

    tokenizer = _tiny_corpus(tmp_path)
    config = MARConfig(**{**SMALL, "vocab_size": tokenizer.vocab_size})
    save_checkpoint(tmp_path / "teacher.pt", MARLM(config.dense()), tokenizer)
    capsys.readouterr()
    out = tmp_path / "t.txt" / "run"
    assert main(_refine_argv(tmp_path, tmp_path / "teacher.pt", out, "--budget-kl", "1")) == 2
    err = capsys.readouterr().err.strip()
    want = f"spikemar refine: error: out: cannot make the folder {out}: {tmp_path / 't.txt'}"
    assert err == f"{want} is a file", err


def test_refine_resume_refuses_another_sparsify_or_stage1_and_names_a_corrupt_stage_file(
    tmp_path, capsys
):
    """--resume with another --sparsify-topk (under a zero-skipping profile) or without the
    --stage1 the table was measured with reused the table silently; a stage file that does not
    read (measurements.json, calibration.json) was json's bare 'Expecting value' naming no
    file."""
    from test_refine import _hybrid_and_stage1, _refine_argv, _tiny_corpus

    from spikemar.checkpoint import save_checkpoint
    from spikemar.cli import main
    from spikemar.refine.cli import _teacher_id

    tokenizer = _tiny_corpus(tmp_path)
    teacher, stage1 = _hybrid_and_stage1(tokenizer.vocab_size)
    save_checkpoint(tmp_path / "teacher.pt", teacher, tokenizer)
    save_checkpoint(tmp_path / "stage1.pt", stage1, tokenizer)
    windows = torch.randint(0, tokenizer.vocab_size, (2, 9))
    topk = ({"sparsify": "topk", "amount": 0.25},)
    out = tmp_path / "out"
    m = measure(teacher, windows, options=(T4,), sparsify=topk, energy_windows=1,
                hardware="45nm-fp32+zs", stage1=stage1)  # fmt: skip
    m.info["teacher"] = _teacher_id(str(tmp_path / "teacher.pt"))
    out.mkdir()
    m.save(out / "measurements.json")
    argv = _refine_argv(tmp_path, tmp_path / "teacher.pt", out, "--budget-kl", "100",
                        "--hardware", "45nm-fp32+zs", "--resume")  # fmt: skip
    argv[argv.index("--sparsify-topk") + 1] = "0.5"
    for extra, message in [
        ((), "resume: {out} was measured with --sparsify-topk 0.25, not 0.5;"),
        (
            ("--sparsify-topk", "0.25"),
            "resume: {out} was measured with the stage-1 replacements {{'1': 'ssm'}}, not none;",
        ),
    ]:
        capsys.readouterr()
        assert main([*argv, *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert message.format(out=out) in err, err
    argv += ["--sparsify-topk", "0.25", "--stage1", str(tmp_path / "stage1.pt")]
    (out / "init.pt").write_bytes(b"")  # a finished stage beside an unreadable one
    (out / "calibration.json").write_text("{")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"resume: {out / 'calibration.json'} is not readable JSON" in err, err
    (out / "measurements.json").write_text("{")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"{out / 'measurements.json'}: not a refine measurements table" in err, err
    (out / "measurements.json").write_text('{"format": "spikemar-refine-measurements-1"}')
    with pytest.raises(ValueError, match=r"measurements: a table without 'modules'"):
        Measurements.load(out / "measurements.json")


def test_refine_plan_rebuilt_from_plan_json_meets_its_reported_numbers(tmp_path, saved_figures):
    """The planned student rebuilt from plan.json alone (a MARConfig with those points, the
    teacher's weights) and measured from scratch: its KL on the measurement windows is the
    reported initial KL, its counted energy ratio on the validation windows the reported
    initial ratio, which is where the figure draws "before stage 2, measured" (it drew the plan's
    predicted ratio there), and that ratio meets the budget here."""
    from dataclasses import replace

    from test_refine import SMALL as TEST_SMALL
    from test_refine import _refine_argv, _tiny_corpus

    from spikemar.checkpoint import save_checkpoint
    from spikemar.cli import main
    from spikemar.data import TokenDataset
    from spikemar.models import SpikeConfig
    from spikemar.refine import kl_and_loss

    tokenizer = _tiny_corpus(tmp_path)
    torch.manual_seed(3)
    config = MARConfig(**{**TEST_SMALL, "n_layers": 1, "vocab_size": tokenizer.vocab_size})
    teacher = MARLM(config.dense()).eval()
    save_checkpoint(tmp_path / "teacher.pt", teacher, tokenizer)
    out = tmp_path / "out"
    argv = _refine_argv(tmp_path, tmp_path / "teacher.pt", out, "--budget-energy", "2",
                        "--calibrate", "off")  # fmt: skip
    assert main(argv) == 0
    result = json.loads((out / "result.json").read_text())
    points = json.loads((out / "plan.json").read_text())["points"]
    spiking = replace(config.dense(), spikes=SpikeConfig(), points={"*": "dense", **points})
    student = MARLM(spiking).eval()
    student.load_state_dict(teacher.state_dict(), strict=False)
    data = TokenDataset.from_text_file(tmp_path / "t.txt")
    windows = data.windows("train", 16, 2)
    assert kl_and_loss(teacher, student, windows)[0] == pytest.approx(result["initial_kl"])
    val = data.windows("val", 16, 2)[:, :-1]
    ratio = (energy.profile(teacher, val).total_energy_pj
             / energy.profile(student, val).total_energy_pj)  # fmt: skip
    assert result["initial_energy_ratio"] == pytest.approx(ratio, rel=1e-9)
    assert ratio >= 2 and result["plan"]["energy_ratio"] >= 2
    (fig,) = saved_figures
    drawn = {c.get_label(): tuple(c.get_offsets()[0]) for c in fig.axes[0].collections}
    assert drawn["plan, before stage 2, measured"] == pytest.approx((ratio, result["initial_kl"]))
    after = (result["energy_ratio"], result["trained_kl"])
    assert drawn["plan, after stage 2, measured"] == pytest.approx(after)


def test_refine_resume_continues_a_stopped_measurement(tmp_path, capsys, monkeypatch):
    """A measurement stopped part-way (Ctrl-C, SIGTERM, a lost machine) left nothing, and
    --resume measured every module again (the longest stage before training on a pretrained
    teacher); now the modules measured so far are kept in measurements.partial.json and --resume
    measures only the rest, to the same table an uninterrupted run makes."""
    from test_refine import _refine_argv, _tiny_corpus

    from spikemar.checkpoint import load_checkpoint, save_checkpoint
    from spikemar.cli import main
    from spikemar.data import TokenDataset

    tokenizer = _tiny_corpus(tmp_path)
    torch.manual_seed(0)
    config = MARConfig(**{**SMALL, "vocab_size": tokenizer.vocab_size})
    save_checkpoint(tmp_path / "teacher.pt", MARLM(config.dense()), tokenizer)
    # the module (spikemar.refine.measure is also the function's name in the package)
    measure_module = importlib.import_module("spikemar.refine.measure")
    real, built, stop = measure_module.build_student, [], [3]

    def stop_at_the_third(*args, **kwargs):
        built.append(args[1])
        if len(built) in stop:
            stop.clear()
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(measure_module, "build_student", stop_at_the_third)
    out = tmp_path / "out"
    argv = _refine_argv(tmp_path, tmp_path / "teacher.pt", out, "--budget-energy", "1.2",
                        "--calibrate", "off")  # fmt: skip
    assert main(argv) == 130
    partial = Measurements.load(out / "measurements.partial.json")
    assert len(partial.modules) == 2 and not (out / "measurements.json").exists()
    capsys.readouterr()
    assert main(argv) == 2  # a stopped run is a run: --resume or --overwrite
    assert "pass --resume" in capsys.readouterr().err
    built.clear()
    assert main([*argv, "--resume"]) == 0
    assert "measurement continued from" in capsys.readouterr().err
    names = [s.name for s in MARLM(config.dense()).spike_points(include_dense=True)]
    assert [list(points) for points in built[:-1]] == [[n] for n in names[2:]]  # then the plan
    assert not (out / "measurements.partial.json").exists()
    table = Measurements.load(out / "measurements.json")
    teacher = load_checkpoint(tmp_path / "teacher.pt")[0]
    windows = TokenDataset.from_text_file(tmp_path / "t.txt").windows("train", 16, 2)
    whole = measure(teacher, windows, options=(T4,), sparsify=())
    assert table.to_json()["modules"] == whole.to_json()["modules"]
    assert table.teacher_energy_pj == whole.teacher_energy_pj


def test_saving_to_a_folder_and_a_plot_of_one_plan_are_named(tmp_path):
    """Plan.save / Measurements.save at a folder said "[Errno 21] Is a directory: '.x.123.tmp'"
    (atomic_write's temporary name); pareto_plot given one Plan for its list said "'Plan' object
    is not iterable"."""
    options = [Option("a", "dense", 0.0, 1.0, 0.0), Option("a", T4, 0.1, 1.0, 5.0)]
    m = Measurements({"a": options}, 10.0, 1.0, "45nm-fp32")
    p = plan(m, energy_ratio=1.5)
    (tmp_path / "d").mkdir()
    for save in (p.save, m.save):
        with pytest.raises(IsADirectoryError, match=r"^path: '.*d' is a folder; expected a file"):
            save(tmp_path / "d")
    assert list((tmp_path / "d").iterdir()) == []
    with pytest.raises(TypeError, match=r"^plans: expected a list of Plan, got Plan$"):
        pareto_plot(m, p, tmp_path / "p.png")
    assert not (tmp_path / "p.png").exists()


def test_a_teacher_with_sparsified_ffns_is_refused_by_name():
    """A 'dense' MARLM whose FFNs are sparsified (ffn_sparsity): every student, even the all-dense
    one, dropped the sparsifier, so the table's 'dense' options (KL 0) were not the teacher
    (the all-dense student's KL was 1e-5 here)."""
    from spikemar.refine import build_student

    torch.manual_seed(0)
    teacher = MARLM(MARConfig(**SMALL, spikes=None, ffn_sparsity=("topk", 0.25))).eval()
    windows = torch.randint(0, 11, (2, 9))
    for call in (lambda: measure(teacher, windows, options=(T4,), sparsify=()),
                 lambda: build_student(teacher, {})):  # fmt: skip
        with pytest.raises(ValueError, match=r"^teacher: its FFNs are sparsified \(ffn_sparsity"):
            call()


def test_plan_names_a_table_without_dense_or_without_options():
    """A table made by hand: a module without a zero-KL 'dense' option under a KL budget below
    its options, or a module with no options, was an IndexError from inside the planner."""
    costly = Measurements({"a": [Option("a", T4, 0.5, 1.0, 5.0)]}, 10.0, 1.0, "45nm-fp32")
    with pytest.raises(ValueError, match=r"^max_kl: 0.1 is out of reach; .* at least 0.5$"):
        plan(costly, max_kl=0.1)
    assert plan(costly, max_kl=0.5).points == {"a": T4}
    empty = Measurements({"a": []}, 10.0, 1.0, "45nm-fp32")
    for call in (lambda: plan(empty, max_kl=0.1), lambda: plan(empty, energy_ratio=1.1),
                 lambda: random_schedule(empty, 1.0)):  # fmt: skip
        with pytest.raises(ValueError, match=r"^measurements: modules \['a'\] have no options"):
            call()
    with pytest.raises(TypeError, match=r"^measurements: expected Measurements, got dict$"):
        random_schedule({}, 1.0)


def test_calibrate_names_a_bad_rate_type_and_max_rows():
    """firing_rate='0.1' was "'<' not supported between 'int' and 'str'"; max_rows=0 an
    IndexError from amax() inside the search."""
    from spikemar.models import SpikeConfig
    from spikemar.refine import calibrate, firing_rates

    torch.manual_seed(0)
    config = MARConfig(**SMALL, spikes=SpikeConfig(T=4))
    student, teacher = MARLM(config).eval(), MARLM(config.dense()).eval()
    batches = [torch.randint(0, 11, (2, 8))]
    with pytest.raises(ValueError, match=r"^firing_rate: expected a fraction in \(0, 1\) or a"):
        calibrate(student, teacher, batches, firing_rate="0.1")
    for call in (lambda: calibrate(student, teacher, batches, firing_rate=0.1, max_rows=0),
                 lambda: firing_rates(student, teacher, batches, max_rows=0)):  # fmt: skip
        with pytest.raises(ValueError, match=r"^max_rows: expected an int >= 1, got 0$"):
            call()


def test_refine_resume_refuses_another_calibrate_mode(tmp_path, capsys):
    """--resume --calibrate on after a run made with off reused the uncalibrated init.pt and
    reported mode 'off' beside the new flag."""
    from test_refine import _refine_argv, _tiny_corpus

    from spikemar.checkpoint import save_checkpoint
    from spikemar.cli import main

    tokenizer = _tiny_corpus(tmp_path)
    torch.manual_seed(0)
    config = MARConfig(**{**SMALL, "vocab_size": tokenizer.vocab_size})
    save_checkpoint(tmp_path / "teacher.pt", MARLM(config.dense()), tokenizer)
    out = tmp_path / "out"
    argv = _refine_argv(tmp_path, tmp_path / "teacher.pt", out, "--budget-energy", "1.2")
    assert main([*argv, "--calibrate", "off"]) == 0
    capsys.readouterr()
    assert main([*argv, "--calibrate", "on", "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"resume: {out} was calibrated with --calibrate off, not on;" in err, err


def test_refine_overwrite_leaves_no_stage_file_of_the_old_run(tmp_path, capsys):
    """--overwrite replaced each stage file only when it reached it: a run that stopped after
    measuring (a budget out of reach) left the old run's plan, students, result.json and
    pareto.png beside the new table (result.json described another teacher's run), and a
    --resume of it reused the old init.pt until stage 2 refused the old student's teacher."""
    from test_refine import _refine_argv, _tiny_corpus

    from spikemar.checkpoint import save_checkpoint
    from spikemar.cli import main

    tokenizer = _tiny_corpus(tmp_path)
    config = MARConfig(**{**SMALL, "vocab_size": tokenizer.vocab_size})
    for seed in (0, 1):
        torch.manual_seed(seed)
        save_checkpoint(tmp_path / f"t{seed}.pt", MARLM(config.dense()), tokenizer)
    out = tmp_path / "out"
    assert main(_refine_argv(tmp_path, tmp_path / "t0.pt", out, "--budget-kl", "1e-12")) == 0
    capsys.readouterr()
    argv = _refine_argv(tmp_path, tmp_path / "t1.pt", out, "--overwrite", "--budget-energy",
                        "1000")  # fmt: skip
    assert main(argv) == 2
    assert "out of reach" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["measurements.json"]


def test_kl_and_loss_names_its_arguments():
    """batch_size=0 was range()'s 'arg 3 must not be zero', a 1-d window an unpacking error."""
    from spikemar.refine import kl_and_loss, schedule_kl

    teacher, windows = _teacher(), torch.randint(0, 11, (2, 9))
    with pytest.raises(ValueError, match=r"^batch_size: expected an int >= 1, got 0$"):
        kl_and_loss(teacher, teacher, windows, batch_size=0)
    with pytest.raises(ValueError, match=r"^windows: expected token ids \[n, L \+ 1\]"):
        schedule_kl(teacher, {}, windows[0])
    assert kl_and_loss(teacher, teacher, windows, batch_size=1)[0] == pytest.approx(0, abs=1e-12)


def test_refine_names_a_missing_data_file_as_data(tmp_path, capsys):
    """--data that is not there was 'path: no text file or folder at ...' (the loader's name)."""
    from test_refine import _refine_argv, _tiny_corpus

    from spikemar.checkpoint import save_checkpoint
    from spikemar.cli import main

    tokenizer = _tiny_corpus(tmp_path)
    config = MARConfig(**{**SMALL, "vocab_size": tokenizer.vocab_size})
    save_checkpoint(tmp_path / "teacher.pt", MARLM(config.dense()), tokenizer)
    argv = _refine_argv(tmp_path, tmp_path / "teacher.pt", tmp_path / "o", "--budget-kl", "1")
    argv[argv.index("--data") + 1] = str(tmp_path / "none.txt")
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"spikemar refine: error: data: no text file or folder at {tmp_path / 'none.txt'}"
    assert not (tmp_path / "o").exists()


def test_refine_budget_out_of_reach_names_the_option_and_the_kept_table(tmp_path, capsys):
    """An energy budget the options cannot reach: one line naming --budget-energy (it said
    'energy_ratio', the library's name) and that the measured table is kept, from which
    --resume with a reachable budget plans without measuring again."""
    from test_refine import _refine_argv, _tiny_corpus

    from spikemar.checkpoint import save_checkpoint
    from spikemar.cli import main

    tokenizer = _tiny_corpus(tmp_path)
    torch.manual_seed(0)
    config = MARConfig(**{**SMALL, "vocab_size": tokenizer.vocab_size})
    save_checkpoint(tmp_path / "teacher.pt", MARLM(config.dense()), tokenizer)
    out = tmp_path / "out"
    argv = _refine_argv(tmp_path, tmp_path / "teacher.pt", out, "--budget-energy")
    capsys.readouterr()
    assert main([*argv, "1000"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("spikemar refine: error: budget-energy: 1000.0 is out of reach; "), err
    assert err.endswith(f"({out / 'measurements.json'} is kept: --resume with another budget "
                        "plans from it)"), err  # fmt: skip
    assert main([*argv, "1.2", "--resume"]) == 0
    assert "measurements read from" in capsys.readouterr().err
