"""What of a MAR LM goes on chip (chip_report) and the ``spikemar export`` command."""

from __future__ import annotations

import sys

import h5py
import nir
import pytest
import torch

from spikemar import cli
from spikemar.checkpoint import save_checkpoint
from spikemar.data import CharTokenizer
from spikemar.hardware import UnsupportedModuleError, chip_report, export_lava
from spikemar.hardware.demo import demo_network
from spikemar.models import MARLM, MARConfig


def hybrid_mar() -> MARLM:
    config = MARConfig(
        vocab_size=20, d_model=16, n_layers=3, layers=["ssm", "lti", "attn"],
        spiking=[True, True, False], head_dim=8, d_state=4,
    )  # fmt: skip
    return MARLM(config)


def test_mar_report_places_every_parameter_once():
    model = hybrid_mar()
    report = chip_report(model)
    counts = report.counts()
    total = sum(p.numel() for p in model.parameters())
    assert counts["chip"]["params"] + counts["host"]["params"] == total
    where = {e.path: e.on_chip for e in report.entries}
    on_chip = {
        "layers.0.mixer.spike_in", "layers.0.mixer.in_proj", "layers.0.mixer.out_proj",
        "layers.0.ffn.gate", "layers.0.ffn.up", "layers.0.ffn.down", "layers.1.mixer",
        "layers.1.mixer.spike_in",
    }  # fmt: skip
    on_host = {
        "embed", "head", "norm", "layers.0.norm1", "layers.0.mixer.conv",
        "layers.0.mixer.(dt_bias, A_log, D)", "layers.2.mixer.qkv", "layers.2.ffn.down",
    }  # fmt: skip
    assert all(where[p] for p in on_chip)
    assert not any(where[p] for p in on_host)
    # neurons: the spike points of the two spiking layers and the LTI cell's channels
    hidden = model.layers[0].ffn.up.out_features
    assert counts["chip"]["neurons"] == (16 + 32 + 16 + hidden) + (16 + 16 + 16 + hidden)


def test_exporting_a_mar_lm_names_the_module_that_stays_on_the_host(tmp_path):
    with pytest.raises(UnsupportedModuleError, match="embed: a lookup of token ids"):
        export_lava(hybrid_mar(), tmp_path / "mar.h5", (16,))


def test_export_command_writes_both_files(tmp_path, capsys):
    code = cli.main(["export", "--lava", str(tmp_path / "n.h5"), "--nir", str(tmp_path / "n.nir")])
    out = capsys.readouterr().out
    assert code == 0 and "chip: 6 modules, 26,122 parameters (100.0%), 266 neurons" in out
    with h5py.File(tmp_path / "n.h5") as f:
        assert [f[f"layer/{i}/type"][0].decode() for i in range(4)] == ["input"] + ["dense"] * 3
    assert len(nir.read(str(tmp_path / "n.nir")).nodes) == 8
    expected = sum(p.numel() for p in demo_network().parameters())
    assert expected == 26_122


def test_export_command_reports_a_mar_checkpoint_and_names_what_cannot_go_to_nir(tmp_path, capsys):
    save_checkpoint(
        tmp_path / "m.pt", hybrid_mar(), CharTokenizer.from_text("abcdefghijklmnopqrst")
    )
    assert cli.main(["export", "--checkpoint", str(tmp_path / "m.pt")]) == 0
    assert "layers.0.mixer.conv" in capsys.readouterr().out
    code = cli.main(
        ["export", "--checkpoint", str(tmp_path / "m.pt"), "--nir", str(tmp_path / "x.nir")]
    )
    assert code == 2 and "embed: a lookup of token ids" in capsys.readouterr().err
    assert not (tmp_path / "x.nir").exists()
    code = cli.main(
        ["export", "--checkpoint", str(tmp_path / "m.pt"), "--lava", "d", "--check-steps", "3"]
    )
    assert code == 2 and "only for block networks" in capsys.readouterr().err
    # refusals come before the chip report, and nothing is written
    code = cli.main(["export", "--checkpoint", str(tmp_path / "m.pt"), "--nir", "x.nir"])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and err.count("\n") == 1
    code = cli.main(["export", "--checkpoint", str(tmp_path / "m.pt"), "--lava",
                     str(tmp_path / "m.h5")])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and "--lava: a language model exports a folder" in err
    assert not (tmp_path / "m.h5").exists()


def test_export_command_names_bad_arguments(tmp_path, capsys):
    assert cli.main(["export", "--check-steps", "5"]) == 2
    assert "--check-steps: give --lava PATH too" in capsys.readouterr().err
    assert cli.main(["export", "--checkpoint", str(tmp_path / "none.pt")]) == 2
    assert "--checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["export", "--check-steps", "0"])
    capsys.readouterr()
    # a block network's output paths are checked before the report and before any file
    for flag in ("--nir", "--lava"):
        assert cli.main(["export", flag, str(tmp_path)]) == 2
        out, err = capsys.readouterr()
        assert out == "" and err.startswith(f"spikemar export: error: {flag}: ") and "folder" in err


@pytest.mark.slow
def test_export_command_checks_the_file_in_lava(lava, tmp_path, capsys):
    torch.manual_seed(0)
    code = cli.main(["export", "--lava", str(tmp_path / "n.h5"), "--check-steps", "100"])
    out = capsys.readouterr().out
    assert code == 0 and "1000/1000 outputs equal (bit for bit)" in out


def test_quantize_puts_only_the_on_chip_projections_of_a_mar_lm_on_loihis_grid():
    from spikemar.hardware import quantize

    model = hybrid_mar()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    quantised = quantize(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # a copy
    scales = quantised.loihi_weight_scales
    assert set(scales) == {
        "layers.0.mixer.in_proj", "layers.0.mixer.out_proj", "layers.0.ffn.gate",
        "layers.0.ffn.up", "layers.0.ffn.down", "layers.1.ffn.gate", "layers.1.ffn.up",
        "layers.1.ffn.down",
    }  # fmt: skip
    q = dict(quantised.named_modules())
    for path, scale in scales.items():
        w = q[path].weight.detach() * scale
        assert torch.allclose(w, (w / 2).round() * 2, atol=1e-3)  # even integers / S
        assert float(w.abs().max()) == pytest.approx(254, abs=1e-3)
    assert torch.equal(
        q["layers.2.ffn.up"].weight, dict(model.named_modules())["layers.2.ffn.up"].weight
    )
    tokens = torch.randint(0, 20, (2, 12))
    with torch.no_grad():
        a, b = model(tokens), quantised(tokens)
    assert not torch.equal(a, b) and torch.allclose(a, b, atol=0.5)


def test_export_without_nir_installed_says_what_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "nir", None)  # `import nir` now fails as if not installed
    assert cli.main(["export", "--nir", str(tmp_path / "n.nir")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'nir' package is missing" in err and "pip install" in err
    assert not (tmp_path / "n.nir").exists()
