"""The on-chip segments of a MAR LM: spike point → projections as a Lava network whose integrator
voltage equals spikemar's fixed point bit for bit and reads out the model's W·decode."""

from __future__ import annotations

import json

import h5py
import pytest
import torch

from spikemar import cli
from spikemar.checkpoint import save_checkpoint
from spikemar.data import CharTokenizer
from spikemar.hardware import UnsupportedModuleError, run_lava
from spikemar.hardware.mar_export import (
    capture_activations,
    export_mar_lava,
    mar_segments,
    segment_reference,
)
from spikemar.models import MARLM, MARConfig
from spikemar.models.common import SpikeConfig


def small_mar(tau: float = 1.0) -> MARLM:
    torch.manual_seed(0)
    config = MARConfig(
        vocab_size=20, d_model=16, n_layers=2, layers=["ssm", "lti"], head_dim=8, d_state=4,
        spikes=SpikeConfig(T=4, tau=tau, v_threshold=0.3),
    )  # fmt: skip
    return MARLM(config)


def tokens() -> torch.Tensor:
    return torch.randint(0, 20, (2, 16), generator=torch.Generator().manual_seed(1))


def test_segments_are_the_spike_points_that_feed_projections():
    segments = mar_segments(small_mar())
    assert [(s.spike_point, s.projections) for s in segments] == [
        ("layers.0.mixer.spike_in", ["layers.0.mixer.in_proj"]),
        ("layers.0.mixer.spike_out", ["layers.0.mixer.out_proj"]),
        ("layers.0.ffn.spike_in", ["layers.0.ffn.gate", "layers.0.ffn.up"]),
        ("layers.0.ffn.spike_hidden", ["layers.0.ffn.down"]),
        ("layers.1.ffn.spike_in", ["layers.1.ffn.gate", "layers.1.ffn.up"]),
        ("layers.1.ffn.spike_hidden", ["layers.1.ffn.down"]),
    ]
    hidden = segments[2].modules["layers.0.ffn.gate"].out_features
    assert segments[2].rows == [(0, hidden), (hidden, 2 * hidden)]


def test_the_fixed_point_readout_is_the_models_projection(tmp_path):
    model = small_mar()
    manifest = export_mar_lava(model, tmp_path, tokens())
    segments = mar_segments(model)
    seen = capture_activations(model, tokens(), [s.spike_point for s in segments])
    for s, written in zip(segments, manifest["segments"], strict=True):
        s.k = written["k"]
        activations = seen[s.spike_point]
        ref = segment_reference(s, activations)
        assert int(ref["clamps"]) == 0  # calibrated on these very activations
        _, float_spikes = s.modules[s.spike_point].neuron.quantize(activations, s.T)
        # the payload's rounding moves only activations within 1/k of a threshold
        assert (ref["spikes"] == float_spikes).float().mean() > 0.99
        if float_spikes.abs().sum() > 100:  # else one flipped spike dominates the error
            error = (ref["readout"] - ref["float"]).norm() / ref["float"].norm()
            assert 0 < error < 0.05, (s.spike_point, float(error))
        assert ref["v"].dtype == torch.int64


def test_export_writes_files_and_manifest(tmp_path):
    manifest = export_mar_lava(small_mar(), tmp_path, tokens())
    on_disk = json.loads((tmp_path / "manifest.json").read_text())
    assert on_disk["segments"] == json.loads(json.dumps(manifest["segments"]))
    assert "embed" in on_disk["host"] and "layers.0.mixer.conv" in on_disk["host"]
    with h5py.File(tmp_path / "layers.0.ffn.spike_in.h5") as f:
        types = [f[f"layer/{i}/type"][0].decode() for i in range(len(f["layer"]))]
        neurons = [f[f"layer/{i}/neuron/type"][0].decode() for i in (1, 2)]
        assert types == ["input", "dense", "dense"] and neurons == ["ATMN", "CUBA"]
        assert f["layer/2/neuron/vThMant"][()] == 2**17 - 1  # the integrator never fires
        assert f["layer/2/neuron/iDecay"][()] == 4096 and f["layer/2/neuron/vDecay"][()] == 0


def test_a_spike_point_with_tau_other_than_one_is_named(tmp_path):
    with pytest.raises(UnsupportedModuleError, match=r"layers\.0\.mixer\.spike_in: τ = 2\.0"):
        export_mar_lava(small_mar(tau=2.0), tmp_path, tokens())


@pytest.mark.slow
def test_lava_reads_the_segment_bit_for_bit(lava, tmp_path):
    model = small_mar()
    manifest = export_mar_lava(model, tmp_path, tokens())
    segment = mar_segments(model)[2]  # the FFN's input spike point: gate and up stacked
    segment.k = manifest["segments"][2]["k"]
    seen = capture_activations(model, tokens(), [segment.spike_point])
    ref = segment_reference(segment, seen[segment.spike_point][:1])
    v = run_lava(tmp_path / "layers.0.ffn.spike_in.h5", ref["payloads"][:, 0], segment.T,
                 readout="voltage")  # fmt: skip
    assert ref["v"][0].abs().sum() > 0
    assert torch.equal(v.long(), ref["v"][0])


def test_export_command_writes_the_segments_of_a_mar_checkpoint(tmp_path, capsys):
    save_checkpoint(tmp_path / "m.pt", small_mar(), CharTokenizer.from_text("abcdefghijklmnopqrst"))
    code = cli.main(
        ["export", "--checkpoint", str(tmp_path / "m.pt"), "--lava", str(tmp_path / "d")]
    )
    out = capsys.readouterr().out
    assert code == 0 and "wrote 6 on-chip segments" in out
    assert (tmp_path / "d" / "manifest.json").is_file()
    code = cli.main(
        ["export", "--checkpoint", str(tmp_path / "m.pt"), "--nir", str(tmp_path / "n")]
    )
    assert code == 2 and "embed: a lookup of token ids" in capsys.readouterr().err
