"""spikemar.viz: rasters, firing rates (+1/−1 split), per-layer rates through SpikingJelly's
OutputMonitor, membrane traces and atomic figure writing."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from matplotlib.axes import Axes
from torch import nn

from spikemar import viz
from spikemar.neurons import ATMN, BinaryMultiStep, TernarySingleStep, delta_inject

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# 4 micro-steps × 3 neurons with known rates.
KNOWN = np.array(
    [
        [1, 0, -1],
        [1, -1, 0],
        [0, 0, 0],
        [1, 1, -1],
    ],
    dtype=np.float32,
)


def legend_texts(ax: Axes) -> list[str]:
    return [t.get_text() for t in ax.get_legend().get_texts()]


# -- firing rates -------------------------------------------------------------------------------


def test_firing_rates_known_pattern():
    rates = viz.firing_rates(KNOWN)
    np.testing.assert_array_equal(rates.rate_pos, [3 / 4, 1 / 4, 0])
    np.testing.assert_array_equal(rates.rate_neg, [0, 1 / 4, 2 / 4])
    np.testing.assert_array_equal(rates.rate_total, [3 / 4, 2 / 4, 2 / 4])
    assert rates.n_samples == 4
    assert rates.num_neurons == 3
    assert rates.mean_pos == pytest.approx(1 / 3)
    assert rates.mean_neg == pytest.approx(1 / 4)
    assert rates.mean_total == pytest.approx(7 / 12)


def test_firing_rates_accepts_torch_and_flattens_neurons():
    spikes = torch.tensor(KNOWN).reshape(4, 3, 1).expand(4, 3, 2)  # [T, 3, 2] → 6 neurons
    rates = viz.firing_rates(spikes)
    assert rates.num_neurons == 6
    np.testing.assert_array_equal(rates.rate_pos[::2], [3 / 4, 1 / 4, 0])


def test_firing_rates_batch_dims_average_over_batch():
    # [T=4, B=2, C=3]: batch entry 0 is KNOWN, batch entry 1 is silent.
    spikes = np.stack([KNOWN, np.zeros_like(KNOWN)], axis=1)
    rates = viz.firing_rates(spikes, batch_dims=1)
    assert rates.n_samples == 8
    np.testing.assert_array_equal(rates.rate_pos, [3 / 8, 1 / 8, 0])
    np.testing.assert_array_equal(rates.rate_neg, [0, 1 / 8, 2 / 8])


def test_firing_rates_binary_spikes():
    rates = viz.firing_rates(np.abs(KNOWN))
    np.testing.assert_array_equal(rates.rate_neg, 0)
    np.testing.assert_array_equal(rates.rate_pos, [3 / 4, 2 / 4, 2 / 4])


@settings(max_examples=40, deadline=None)
@given(
    hnp.arrays(
        np.int8,
        hnp.array_shapes(min_dims=2, max_dims=4, max_side=5),
        elements=st.sampled_from([-1, 0, 1]),
    )
)
def test_firing_rates_invariants(spikes):
    rates = viz.firing_rates(spikes)
    flat = spikes.reshape(spikes.shape[0], -1).astype(np.float64)
    np.testing.assert_allclose(rates.rate_total, np.abs(flat).mean(axis=0))
    np.testing.assert_allclose(rates.rate_pos - rates.rate_neg, flat.mean(axis=0))
    np.testing.assert_allclose(rates.rate_pos + rates.rate_neg, rates.rate_total)
    assert np.all((rates.rate_pos >= 0) & (rates.rate_neg >= 0) & (rates.rate_total <= 1))
    # Counting over batch entries is the same as treating them as extra micro-steps.
    if spikes.ndim >= 3:
        by_channel = viz.firing_rates(spikes, batch_dims=1)
        merged = spikes.reshape(spikes.shape[0] * spikes.shape[1], *spikes.shape[2:])
        np.testing.assert_allclose(by_channel.rate_pos, viz.firing_rates(merged).rate_pos)


# -- raster -------------------------------------------------------------------------------------


def test_raster_draws_the_spikes_neurons_by_time():
    ax = viz.raster(KNOWN, title="known")
    assert isinstance(ax, Axes)
    image = np.asarray(ax.images[0].get_array())
    np.testing.assert_array_equal(image, KNOWN.T)  # neurons on y, time on x
    assert ax.get_xlabel() == "micro-step t"
    assert ax.get_title() == "known"
    assert legend_texts(ax) == ["+1 spike", "−1 spike"]


def test_raster_colours_differ_for_the_two_signs():
    ax = viz.raster(KNOWN)
    image = ax.images[0]
    rgba = image.to_rgba(np.asarray(image.get_array()))
    pos = rgba[0, 0]  # neuron 0, t = 0: +1
    neg = rgba[2, 0]  # neuron 2, t = 0: −1
    zero = rgba[0, 2]  # neuron 0, t = 2: silent
    assert not np.allclose(pos, neg)
    assert np.allclose(zero[:3], 1.0)  # silence stays white
    assert np.allclose(pos[:3], np.array([0xD5, 0x5E, 0x00]) / 255)
    assert np.allclose(neg[:3], np.array([0x00, 0x72, 0xB2]) / 255)


def test_raster_binary_and_flattening():
    spikes = torch.zeros(3, 2, 4)
    spikes[0, 1, 2] = 1.0
    ax = viz.raster(spikes, time_label="step")
    image = np.asarray(ax.images[0].get_array())
    assert image.shape == (8, 3)
    assert image[1 * 4 + 2, 0] == 1
    assert legend_texts(ax) == ["+1 spike"]
    assert ax.get_xlabel() == "step"
    assert legend_texts(viz.raster(spikes, ternary=True)) == ["+1 spike", "−1 spike"]


def test_raster_draws_on_a_given_axes_with_boundaries():
    fig = viz.new_figure()
    ax = fig.add_subplot()
    assert viz.raster(np.zeros((8, 2)), ax, boundary_every=4, legend=False) is ax
    assert ax.get_legend() is None
    assert len(ax.lines) == 1  # one boundary, at x = 3.5
    assert ax.lines[0].get_xdata()[0] == pytest.approx(3.5)


@pytest.mark.parametrize(
    ("spikes", "fragments"),
    [
        (np.zeros(5), ["spikes", "(5,)", "[T, N, ...]"]),
        (np.full((2, 3), 0.5), ["spikes", "{-1, 0, 1}", "0.5"]),
        (np.array([[2.0, 0.0]]), ["spikes", "{-1, 0, 1}", "2.0"]),
        (np.array([[np.nan, 0.0]]), ["spikes", "{-1, 0, 1}"]),
        (np.zeros((0, 3)), ["spikes", "(0, 3)"]),
    ],
)
def test_raster_rejects_bad_spikes(spikes, fragments):
    with pytest.raises(ValueError) as info:
        viz.raster(spikes)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_bad_argument_types_are_named():
    with pytest.raises(TypeError, match="spikes"):
        viz.firing_rates("not spikes")
    with pytest.raises(TypeError, match="ax"):
        viz.raster(KNOWN, ax="axes")
    with pytest.raises(ValueError, match="boundary_every"):
        viz.raster(KNOWN, boundary_every=0)
    with pytest.raises(ValueError, match="batch_dims"):
        viz.firing_rates(KNOWN, batch_dims=-1)
    with pytest.raises(ValueError, match=r"batch_dims=2.*\(4, 3\)"):
        viz.firing_rates(KNOWN, batch_dims=2)


def test_complex_ragged_and_rates_inputs_are_named_as_given():
    """A complex tensor lost its imaginary part with a warning and was drawn; a ragged list was
    called 'not a tensor or array' though lists are taken; spikes given as plot_firing_rates'
    ``rates`` were named 'spikes'."""
    with pytest.raises(TypeError, match=r"spikes: expected real values, got a torch.complex64"):
        viz.raster(torch.tensor([[1 + 1j, 0j]]))
    with pytest.raises(TypeError, match="spikes: expected real values, got complex"):
        viz.firing_rates(np.array([[1 + 0j, 0j]]))
    with pytest.raises(TypeError, match="rectangular nested list"):
        viz.raster([[1, 0], [1]])
    with pytest.raises(ValueError, match=r"rates: expected spikes \[T, N, \.\.\.\]"):
        viz.plot_firing_rates(np.array([0.1, 0.2]))
    viz.plot_firing_rates([[1, 0], [-1, 1]])  # spikes as a list still work


def test_plot_firing_rates_bars_are_the_rates():
    ax = viz.plot_firing_rates(KNOWN)
    heights = [p.get_height() for p in ax.patches]
    np.testing.assert_allclose(heights[:3], [3 / 4, 1 / 4, 0])  # +1 up
    np.testing.assert_allclose(heights[3:], [0, -1 / 4, -2 / 4])  # −1 down
    assert legend_texts(ax) == ["+1 rate (up)", "−1 rate (down)"]
    ax = viz.plot_firing_rates(viz.firing_rates(KNOWN), horizontal=True)
    widths = [p.get_width() for p in ax.patches]
    np.testing.assert_allclose(widths[3:], [0, -1 / 4, -2 / 4])


# -- per-layer rates through SpikingJelly's OutputMonitor -------------------------------------


def two_layer_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(5, 6),
        ATMN(2.0, 0.5, step_mode="m"),
        nn.Linear(6, 4),
        BinaryMultiStep(1.5, 0.3, step_mode="m"),
    )


def test_layer_firing_rates_match_a_manual_forward():
    net = two_layer_net()
    x_seq = torch.randn(4, 7, 5) * 2
    rates = viz.layer_firing_rates(net, x_seq)
    assert list(rates) == ["1", "3"]  # every ATMN, subclasses included, in module order

    for module in net:
        if isinstance(module, ATMN):
            module.reset()
    with torch.no_grad():
        s1 = net[1](net[0](x_seq))
        s2 = net[3](net[2](s1))
    for name, spikes in (("1", s1), ("3", s2)):
        expected = viz.firing_rates(spikes, batch_dims=1)
        np.testing.assert_allclose(rates[name].rate_pos, expected.rate_pos)
        np.testing.assert_allclose(rates[name].rate_neg, expected.rate_neg)
        assert rates[name].num_neurons == spikes.shape[-1]
        assert rates[name].n_samples == 4 * 7
    assert rates["1"].mean_neg > 0  # ternary layer fires both signs
    assert rates["3"].mean_neg == 0  # binary layer never fires −1


def test_layer_firing_rates_reset_makes_calls_repeatable():
    net = two_layer_net()
    x_seq = torch.randn(3, 2, 5) * 2
    first = viz.layer_firing_rates(net, x_seq)
    second = viz.layer_firing_rates(net, x_seq)
    for name in first:
        np.testing.assert_array_equal(first[name].rate_pos, second[name].rate_pos)


class StepLoop(nn.Module):
    """A net that drives a single-step neuron itself, one micro-step per call."""

    def __init__(self) -> None:
        super().__init__()
        self.neuron = TernarySingleStep(0.5, step_mode="s")

    def forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.neuron(x) for x in x_seq])


def test_layer_firing_rates_single_step_calls_are_micro_steps():
    x_seq = torch.tensor([[[1.0, -1.0]], [[0.0, -1.0]], [[1.0, 0.0]]])  # [T=3, B=1, C=2]
    rates = viz.layer_firing_rates(StepLoop(), x_seq)
    np.testing.assert_allclose(rates["neuron"].rate_pos, [2 / 3, 0])
    np.testing.assert_allclose(rates["neuron"].rate_neg, [0, 2 / 3])


def test_layer_firing_rates_errors():
    with pytest.raises(ValueError, match="net: has no spiking modules"):
        viz.layer_firing_rates(nn.Linear(3, 3), torch.zeros(2, 3))
    with pytest.raises(TypeError, match="net"):
        viz.layer_firing_rates("net", torch.zeros(2, 3))


def test_plot_layer_firing_rates_before_and_after():
    net = two_layer_net()
    before = viz.layer_firing_rates(net, torch.randn(4, 7, 5))
    after = viz.layer_firing_rates(net, 3 * torch.randn(4, 7, 5))
    ax = viz.plot_layer_firing_rates([before, after], labels=["before", "after"])
    heights = [p.get_height() for p in ax.patches]
    assert heights[0] == pytest.approx(before["1"].mean_pos)
    assert heights[2] == pytest.approx(-before["1"].mean_neg)
    assert "+1 rate, up (after)" in legend_texts(ax)
    with pytest.raises(ValueError, match="labels"):
        viz.plot_layer_firing_rates([before, after])
    with pytest.raises(ValueError, match="different layers"):
        viz.plot_layer_firing_rates([before, {"x": before["1"]}], labels=["a", "b"])
    with pytest.raises(ValueError, match="layer_rates"):
        viz.plot_layer_firing_rates({})


# -- membrane traces ----------------------------------------------------------------------------


def ramp_neuron():
    neuron = ATMN(2.0, 0.5, step_mode="m", store_v_seq=True)
    x_seq = delta_inject(torch.tensor([1.3, 0.3, -0.9]), 3)
    return neuron, x_seq


def test_membrane_trace_from_a_neuron_and_its_spikes():
    neuron, x_seq = ramp_neuron()
    spikes = neuron(x_seq)
    ax = viz.membrane_trace(neuron, spikes, neurons=[0, 2])
    path = ax.lines[0]  # neuron 0: h_0, u_0, h_1, u_1, …
    # I = 1.3, V = 0.5, τ = 2: h_0 = 1.3 fires, u_0 = 0.8; h_1 = 0.4, u_1 = 0.4; h_2 = u_2 = 0.2.
    np.testing.assert_allclose(path.get_ydata(), [1.3, 0.8, 0.4, 0.4, 0.2, 0.2], atol=1e-6)
    np.testing.assert_array_equal(path.get_xdata(), [0, 0, 1, 1, 2, 2])
    labels = legend_texts(ax)
    for expected in ("neuron 0", "neuron 2", "pre-spike h_t", "post-reset u_t", "+1 spike"):
        assert expected in labels
    assert "±V (V = 0.5)" in labels
    dashed = [line.get_ydata()[0] for line in ax.lines if line.get_linestyle() == "--"]
    assert sorted(dashed) == pytest.approx([-0.5, 0.5])


def test_membrane_trace_runs_the_neuron_on_x_seq_and_leaves_it_as_it_was():
    neuron = ATMN(2.0, 0.5, step_mode="s")
    _, x_seq = ramp_neuron()
    ax = viz.membrane_trace(neuron, x_seq=x_seq, neurons=[2], neuron_names=["I = −0.9"])
    # −0.9 fires −1 at t = 0 (u_0 = −0.4), then decays: −0.2, −0.1.
    np.testing.assert_allclose(ax.lines[0].get_ydata(), [-0.9, -0.4, -0.2, -0.2, -0.1, -0.1])
    assert neuron.step_mode == "s" and neuron.store_v_seq is False
    assert "I = −0.9" in legend_texts(ax)


def test_membrane_trace_from_arrays_with_per_channel_threshold_normalises():
    u = np.array([[0.2, -0.1], [0.1, -0.05]])
    s = np.array([[1, 0], [0, 0]])
    ax = viz.membrane_trace(u, s, v_threshold=np.array([1.0, 2.0]), neurons=[0, 1])
    assert ax.get_ylabel() == "membrane / V"
    paths = {line.get_label(): line.get_ydata() for line in ax.lines}
    np.testing.assert_allclose(paths["neuron 0"], [1.2, 0.2, 0.1, 0.1])
    np.testing.assert_allclose(paths["neuron 1"], [-0.05, -0.05, -0.025, -0.025])


@pytest.mark.parametrize(
    ("call", "error", "fragment"),
    [
        (lambda n, s, x: viz.membrane_trace(n), ValueError, "spikes"),
        (lambda n, s, x: viz.membrane_trace(n, s, x_seq=x), ValueError, "not both"),
        (lambda n, s, x: viz.membrane_trace(n, s, neurons=[3]), ValueError, "neurons: index 3"),
        (lambda n, s, x: viz.membrane_trace(n, s, neurons=list(range(7))), ValueError, "neurons"),
        (lambda n, s, x: viz.membrane_trace(n, s, v_threshold=1.0), ValueError, "v_threshold"),
        (lambda n, s, x: viz.membrane_trace(n.v_seq, s), ValueError, "v_threshold"),
        (lambda n, s, x: viz.membrane_trace(n.v_seq, s[:2], v_threshold=0.5), ValueError, "shape"),
        (lambda n, s, x: viz.membrane_trace(nn.Linear(2, 2), s), TypeError, "neuron_or_arrays"),
        (
            lambda n, s, x: viz.membrane_trace(n, s, neurons=[0], neuron_names=["a", "b"]),
            ValueError,
            "neuron_names",
        ),
    ],
)
def test_membrane_trace_errors_name_the_argument(call, error, fragment):
    neuron, x_seq = ramp_neuron()
    spikes = neuron(x_seq)
    with pytest.raises(error, match=fragment):
        call(neuron, spikes, x_seq)


def test_membrane_trace_needs_a_stored_v_seq():
    neuron = ATMN(2.0, 0.5, step_mode="m")  # store_v_seq=False
    _, x_seq = ramp_neuron()
    spikes = neuron(x_seq)
    with pytest.raises(ValueError, match="store_v_seq"):
        viz.membrane_trace(neuron, spikes)


# -- saving -------------------------------------------------------------------------------------


def test_save_figure_writes_a_png_atomically(tmp_path):
    ax = viz.raster(KNOWN)
    target = tmp_path / "new" / "folder" / "raster.png"
    returned = viz.save_figure(ax.figure, target, dpi=40)
    assert returned == target
    assert target.read_bytes()[:8] == PNG_MAGIC
    assert os.listdir(target.parent) == ["raster.png"]  # no temporary file left behind
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask

    # Overwrites an existing file in place.
    first = target.read_bytes()
    viz.save_figure(viz.raster(np.zeros((2, 2)), legend=False).figure, target, dpi=40)
    assert target.read_bytes() != first
    assert os.listdir(target.parent) == ["raster.png"]


def test_save_figure_failure_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "raster.png"
    target.write_bytes(b"old")
    fig = viz.raster(KNOWN).figure

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(fig, "savefig", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        viz.save_figure(fig, target)
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["raster.png"]


def test_save_figure_rejects_bad_arguments(tmp_path):
    fig = viz.new_figure()
    with pytest.raises(ValueError, match="path: expected a file name with a suffix"):
        viz.save_figure(fig, tmp_path / "raster")
    with pytest.raises(ValueError, match=r"path: unsupported image suffix '\.xyz'"):
        viz.save_figure(fig, tmp_path / "raster.xyz")
    with pytest.raises(TypeError, match="fig"):
        viz.save_figure(viz.raster(KNOWN), tmp_path / "raster.png")
    with pytest.raises(TypeError, match=r"path: expected a file path .* got NoneType"):
        viz.save_figure(fig, None)
    assert os.listdir(tmp_path) == []


def test_check_figure_path_fails_before_any_figure_is_drawn(tmp_path):
    # what save_figure would refuse, refused up front under the caller's name for it
    with pytest.raises(ValueError, match=r"--out: unsupported image suffix '\.txt'"):
        viz.check_figure_path(tmp_path / "raster.txt", name="--out")
    with pytest.raises(ValueError, match="--out: expected a file name with a suffix"):
        viz.check_figure_path(tmp_path / "raster", name="--out")
    with pytest.raises(IsADirectoryError, match=r"--out: .* is a folder"):
        viz.check_figure_path(tmp_path, name="--out")
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match=r"--out: .* is a file, not a folder"):
        viz.check_figure_path(tmp_path / "file" / "raster.png", name="--out")
    assert viz.check_figure_path(tmp_path / "new" / "r.PNG") == tmp_path / "new" / "r.PNG"
    assert sorted(os.listdir(tmp_path)) == ["file", "new"]  # the parent made, no file written
    assert os.listdir(tmp_path / "new") == []


def test_layer_firing_rates_names_a_bad_instance_or_reset_and_plot_a_bad_rate():
    """A string or a number as ``instance`` failed inside SpikingJelly's monitor with
    isinstance()'s own message; ``reset='no'`` reset the net; a dict of numbers failed in the
    drawing with an AttributeError."""
    net = nn.Sequential(nn.Linear(4, 4), ATMN(1.0, 0.5, num_channels=4))
    x = torch.randn(2, 4)
    for bad in ("ATMN", 3, (ATMN, "x"), ()):
        with pytest.raises(TypeError, match="instance: expected a module type"):
            viz.layer_firing_rates(net, x, instance=bad)
    with pytest.raises(TypeError, match="reset: expected a bool, got 'no'"):
        viz.layer_firing_rates(net, x, reset="no")
    assert list(viz.layer_firing_rates(net, x, instance=(ATMN,))) == ["1"]
    with pytest.raises(ValueError, match="layer_rates: expected a non-empty dict"):
        viz.plot_layer_firing_rates({"a": 3})
