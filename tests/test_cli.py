"""The ``spikemar`` command line and the example scripts (run with tiny configurations)."""

from __future__ import annotations

import os
import re
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch

from spikemar import cli
from spikemar.neurons import ATMN

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REPO_ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO_ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


def is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG_MAGIC


# -- spikemar raster ----------------------------------------------------------------------------


@pytest.mark.parametrize("network", [False, True], ids=["layer", "network"])
@pytest.mark.parametrize("neuron", ["atmn", "binary", "ternary-single"])
def test_raster_writes_a_png(tmp_path, capsys, neuron, network):
    out = tmp_path / "figs" / "raster.png"
    T = [] if neuron == "ternary-single" else ["--T", "3"]  # one micro-step is all it has
    argv = ["raster", "--neuron", neuron, *T, "--out", str(out), "--dpi", "30"]
    assert cli.main([*argv, "--network"] if network else argv) == 0
    assert is_png(out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["raster.png"]
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == str(out)
    assert "firing rate +" in lines[1] and "spikes" in lines[1]
    if neuron == "binary":
        assert "(+" in lines[1] and "/ −0)" in lines[1]


def test_raster_summary_counts_the_spikes(capsys, tmp_path):
    cli.main(
        [
            "raster",
            "--T",
            "4",
            "--tau",
            "1.5",
            "--v-threshold",
            "0.5",
            "--out",
            str(tmp_path / "r.png"),
            "--dpi",
            "30",
        ]
    )
    summary = capsys.readouterr().out.splitlines()[1]
    # The built-in ramp: 49 static inputs from −3V to +3V, δ-injected.
    _, spikes = ATMN(1.5, 0.5).quantize(torch.linspace(-1.5, 1.5, 49), 4)
    pos, neg = int((spikes > 0).sum()), int((spikes < 0).sum())
    assert f"{pos + neg} spikes (+{pos} / −{neg}) of {49 * 4}" in summary
    assert re.search(rf"firing rate \+{pos / (49 * 4):.3f} / −{neg / (49 * 4):.3f}", summary)


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["raster", "--T", "0"], "argument --T: expected an int >= 1, got '0'"),
        (["raster", "--T", "two"], "argument --T"),
        (["raster", "--tau", "0"], "argument --tau: expected a number > 0, got '0'"),
        (["raster", "--tau", "-1"], "argument --tau"),
        (["raster", "--tau", "nan"], "argument --tau"),
        (["raster", "--v-threshold", "0"], "argument --v-threshold: expected a finite number > 0"),
        (["raster", "--v-threshold", "inf"], "argument --v-threshold"),
        (["raster", "--neuron", "lif"], "argument --neuron: invalid choice: 'lif'"),
        (["raster", "--neuron", "ternary-single", "--tau", "2"], "argument --tau: ternary-single"),
        ([], "COMMAND"),
        (["compile"], "invalid choice: 'compile'"),
    ],
)
def test_bad_arguments_exit_with_a_message_naming_them(argv, fragment, capsys, tmp_path):
    with pytest.raises(SystemExit) as info:
        cli.main(
            [*argv, "--out", str(tmp_path / "figs" / "x.png")] if argv[:1] == ["raster"] else argv
        )
    assert info.value.code == 2
    assert fragment in capsys.readouterr().err
    assert not (tmp_path / "figs").exists()  # not even the folder


def test_raster_refuses_an_out_it_cannot_draw_to_before_any_work(tmp_path, capsys):
    assert cli.main(["raster", "--out", str(tmp_path / "r.txt")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and os.listdir(tmp_path) == []
    assert "spikemar raster: error: --out: unsupported image suffix '.txt'" in captured.err
    assert cli.main(["raster", "--out", str(tmp_path / "raster")]) == 2
    assert "--out: expected a file name with a suffix" in capsys.readouterr().err


@pytest.mark.parametrize("before", [False, True], ids=["after", "before"])
def test_an_unknown_option_points_at_the_help_of_the_command_it_follows(before, capsys):
    argv = ["--bogus", "raster"] if before else ["raster", "--bogus"]
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and len(err.strip().splitlines()) == 1
    prog = "spikemar" if before else "spikemar raster"
    assert err.startswith(f"{prog}: error: unrecognized arguments: --bogus (see {prog} --help)")


def test_train_names_its_own_flags_in_a_model_config_error(corpus, tmp_path, capsys):
    out = ["--data", str(corpus), "--out", str(tmp_path / "t.pt"), "--steps", "1"]
    with pytest.raises(SystemExit) as info:  # expand·d_model = 8: no 16-wide SSM head fits
        cli.main(["train", "--model", "mar-dense", "--d-model", "4", *out])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "--head-dim" not in err  # train has no such flag
    assert "error: --d-model: the SSM's head size 16 does not divide" in err
    with pytest.raises(SystemExit):
        cli.main(["train", "--layers", "ssm,attn", "--n-layers", "2", "--n-heads", "3", *out])
    err = capsys.readouterr().err
    assert "error: --n-heads: 3 does not divide d_model = 128" in err and "attn-heads" not in err
    assert not (tmp_path / "t.pt").exists()


def test_generate_names_max_new_tokens_when_a_transformer_runs_out_of_positions(
    corpus, tmp_path, capsys
):
    out = tmp_path / "t.pt"
    argv = ["train", "--model", "transformer", "--d-model", "16", "--n-layers", "1", "--L", "16",
            "--data", str(corpus), "--out", str(out), "--steps", "1", "--no-progress"]  # fmt: skip
    assert cli.main(argv) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:  # 16 positions: 40 new tokens do not fit
        cli.main(["generate", "--checkpoint", str(out), "--max-new-tokens", "40"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.startswith("spikemar generate: error: --max-new-tokens: ")
    # left out, --max-new-tokens fills the 16 positions after the prompt (a newline) instead of
    # failing on its default of 200: 1 + 16 tokens, the last one not fed back
    assert cli.main(["generate", "--checkpoint", str(out), "--temperature", "0"]) == 0
    printed = capsys.readouterr().out
    assert len(printed) == 1 + 16 + 1  # the prompt, 16 characters, print's newline


def test_console_script_is_main():
    (script,) = [ep for ep in entry_points(group="console_scripts") if ep.name == "spikemar"]
    assert script.value == "spikemar.cli:main"


def test_parser_has_one_subcommand_per_function():
    parser = cli.build_parser()
    args = parser.parse_args(["raster"])
    assert args.func is cli._run_raster
    assert args.T is None and args.tau is None and args.v_threshold == 0.5  # chosen per neuron
    assert args.out == Path("spikemar_raster.png")


def test_raster_refuses_micro_steps_that_ternary_single_cannot_use(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(
            ["raster", "--neuron", "ternary-single", "--T", "4", "--out", str(tmp_path / "r.png")]
        )
    err = capsys.readouterr().err
    assert info.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "argument --T: ternary-single" in err and "only micro-step 0 can fire" in err
    assert not (tmp_path / "r.png").exists()
    assert cli.main(["raster", "--neuron", "ternary-single", "--T", "1", "--out",
                     str(tmp_path / "r.png"), "--dpi", "30"]) == 0  # fmt: skip


def test_raster_draws_the_models_default_tau(tmp_path, capsys):
    from spikemar.models import SpikeConfig

    cli.main(["raster", "--out", str(tmp_path / "r.png"), "--dpi", "30"])
    assert f"τ = {SpikeConfig().tau:g}," in capsys.readouterr().out
    assert cli.build_parser(["train"]).parse_args(["train"]).tau == SpikeConfig().tau


@pytest.mark.parametrize("command", ["train", "generate", "distill", "raster", "demo", "export"])
def test_help_shows_the_defaults(command, capsys):
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    expected = {
        "train": [
            "--steps STEPS optimizer steps (default: 2000)",
            "(default: runs/model.pt)",
            "(default: cpu)",
            "(default: 0.001)",
            "(default: 4)",
        ],
        "generate": [
            "(default: 200, or as many",
            "(default: 0.8)",
            "seed of the sampling (default: 0)",
        ],
        "distill": [
            "(default: runs/student.pt)",
            "(default: 2000)",
            "--temperature TEMPERATURE (default: 1.0)",  # an option without help text
            "cross-entropy (default: 0.0)",
        ],
        "raster": ["(default: atmn)", "(default: 0.5)", "default 4", "weights (default: 0)"],
        "demo": ["(default: 300)"],
        "export": [],
    }[command]
    for fragment in expected:
        assert fragment in text, fragment


# -- examples -----------------------------------------------------------------------------------


def test_example_atmn_ramp_quick(tmp_path, capsys, load_script):
    example = load_script("examples/atmn_ramp.py")
    assert example.main(["--out", str(tmp_path), "--quick"]) == 0
    for name in ("atmn_ramp_staircase", "atmn_ramp_rasters", "atmn_ramp_rates"):
        assert is_png(tmp_path / f"{name}.png"), name
    out = capsys.readouterr().out
    assert "atmn   tau=1    T=8: RMSE" in out


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason=f"Tiny Shakespeare not at {SHAKESPEARE}")
def test_example_shakespeare_quick(tmp_path, capsys, load_script):
    example = load_script("examples/shakespeare_raster.py")
    argv = ["--out", str(tmp_path), "--quick", "--steps", "5", "--data", str(SHAKESPEARE)]
    assert example.main(argv) == 0
    for name in ("shakespeare_rasters", "shakespeare_rates"):
        assert is_png(tmp_path / f"{name}.png"), name
    out = capsys.readouterr().out
    assert "trained 5 steps" in out and "spike point spike1" in out


def test_example_shakespeare_missing_data(tmp_path, capsys, load_script):
    example = load_script("examples/shakespeare_raster.py")
    missing = tmp_path / "nope" / "input.txt"
    with pytest.raises(SystemExit) as info:
        example.main(["--data", str(missing), "--out", str(tmp_path)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--data" in err and str(missing) in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--tau", "0"], "--tau: expected a number > 0"),
        (["--steps", "0"], "--steps: expected an int >= 1, got 0"),
        (["--out", "{file}"], "--out: cannot write"),
    ],
)
def test_example_shakespeare_bad_arguments_are_one_line_before_training(
    argv, fragment, tmp_path, capsys, load_script
):
    example = load_script("examples/shakespeare_raster.py")
    (tmp_path / "input.txt").write_text("ROMEO:\nO, she doth teach the torches to burn bright!\n")
    (tmp_path / "file").write_text("")
    argv = ["--out", str(tmp_path / "figs"), *[a.format(file=tmp_path / "file") for a in argv]]
    with pytest.raises(SystemExit) as info:
        example.main(["--data", str(tmp_path / "input.txt"), "--quick", *argv])
    err = capsys.readouterr().err
    assert info.value.code == 2 and fragment in err and "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == ["file", "input.txt"]


def test_example_atmn_ramp_refuses_an_out_that_is_a_file(tmp_path, capsys, load_script):
    example = load_script("examples/atmn_ramp.py")
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as info:
        example.main(["--out", str(tmp_path / "file"), "--quick"])
    assert info.value.code == 2 and "--out: cannot write" in capsys.readouterr().err


def test_example_shakespeare_reads_the_corpus_train_reads(
    tmp_path, monkeypatch, capsys, load_script
):
    # $SPIKEMAR_DATA moves Tiny Shakespeare for `spikemar train`, and for the example alike
    example = load_script("examples/shakespeare_raster.py")
    monkeypatch.setenv("SPIKEMAR_DATA", str(tmp_path / "elsewhere.txt"))
    with pytest.raises(SystemExit) as info:
        example.main(["--out", str(tmp_path / "figs"), "--quick"])
    assert info.value.code == 2
    assert f"not found at {tmp_path / 'elsewhere.txt'}" in capsys.readouterr().err


def test_library_names_become_flags_only_where_the_command_has_them():
    import argparse

    from spikemar.cli import _with_flags

    args = argparse.Namespace(out="x.pt", data=None, n_heads=4)
    assert _with_flags("out: a folder", args) == "--out: a folder"
    assert _with_flags("path: empty", args, path="data") == "--data: empty"
    assert _with_flags("n_attn_heads: 3", args, n_attn_heads="n_heads") == "--n-heads: 3"
    # train has no --checkpoint: the library's name stays (it said '--checkpoint: ...')
    assert _with_flags("checkpoint: x.pt is corrupt", args) == "checkpoint: x.pt is corrupt"
    assert _with_flags("not a name: x", args) == "not a name: x"


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_a_directory_without_config_is_named_as_checkpoint(command, tmp_path, monkeypatch, capsys):
    # 'empty: no config.json ...' named no flag (a plain folder name reads like an argument)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    try:  # eval returns its exit code, generate exits through argparse
        code = cli.main([command, "--checkpoint", "empty"])
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"spikemar {command}: error: --checkpoint: empty: no config.json" in err
