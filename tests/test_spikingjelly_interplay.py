"""ATMN inside SpikingJelly networks: its reset, step-mode, monitor and functional utilities work
on spikemar neurons unchanged."""

import torch
from spikingjelly.activation_based import base, functional, layer, monitor
from spikingjelly.activation_based import neuron as sj_neuron
from torch import nn

from spikemar.neurons import ATMN, BinaryMultiStep


def make_net():
    return nn.Sequential(
        layer.Linear(6, 16),
        ATMN(tau=2.0, v_threshold=0.3),
        layer.Linear(16, 8),
        BinaryMultiStep(tau=2.0, v_threshold=0.3),
        layer.Linear(8, 4),
        sj_neuron.LIFNode(),  # a SpikingJelly neuron beside ours
    )


def test_atmn_is_a_memory_module():
    assert isinstance(ATMN(), base.MemoryModule)
    assert dict(ATMN().named_memories()).keys() == {"v"}


def test_reset_net_restores_every_membrane():
    net = make_net()
    x = torch.randn(3, 6) * 3
    first = [net(x) for _ in range(4)]
    assert isinstance(net[1].v, torch.Tensor)
    functional.reset_net(net)
    assert net[1].v == 0.0 and net[3].v == 0.0
    again = [net(x) for _ in range(4)]
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)


def test_set_step_mode_switches_atmn_and_keeps_results():
    net = make_net()
    x_seq = torch.randn(5, 3, 6) * 3
    out_s = torch.stack([net(x_seq[t]) for t in range(5)])
    functional.reset_net(net)
    functional.set_step_mode(net, "m")
    assert net[1].step_mode == "m" and net[3].step_mode == "m"
    out_m = net(x_seq)
    assert torch.equal(out_s, out_m)


def test_output_and_attribute_monitors_record_atmn():
    net = make_net()
    functional.set_step_mode(net, "m")
    x_seq = torch.randn(5, 3, 6) * 3
    with monitor.OutputMonitor(net, ATMN) as spikes_mon:
        with monitor.AttributeMonitor("v", False, net, ATMN) as v_mon:
            net(x_seq)
            assert spikes_mon.monitored_layers == ["1", "3"]  # BinaryMultiStep is an ATMN
            assert spikes_mon["1"][0].shape == (5, 3, 16)
            assert set(spikes_mon["1"][0].unique().tolist()) <= {-1.0, 0.0, 1.0}
            assert set(spikes_mon["3"][0].unique().tolist()) <= {0.0, 1.0}
            assert torch.equal(v_mon["1"][0], net[1].v)


def test_to_functional_forward_is_pure_and_matches_the_stateful_run():
    net = make_net()
    functional.set_step_mode(net, "m")
    x_seq = torch.randn(5, 3, 6) * 3
    fn = base.to_functional_forward(net)
    states = tuple(base.extract_memories(net))
    (out_fn,), new_states = fn((x_seq,), states)
    assert net[1].v == 0.0  # the functional call changed no module memory
    out = net(x_seq)
    assert torch.equal(out, out_fn)
    torch.testing.assert_close(new_states[0], net[1].v)
    # the explicit state continues a sequence exactly as the module's own memory does
    (out2_fn,), _ = fn((x_seq,), new_states)
    assert torch.equal(net(x_seq), out2_fn)


def test_atmn_alone_functional_forward_in_both_modes():
    n = ATMN(tau=2.0, v_threshold=0.4, step_mode="s")
    x = torch.randn(7) * 2
    (s,), (v,) = n.functional_forward((x,), (0.0,))
    assert n.v == 0.0
    assert torch.equal(s, n(x)) and torch.equal(v, n.v)


def test_detach_net_cuts_the_graph_between_chunks():
    n = ATMN(tau=2.0, v_threshold=0.4, step_mode="m")
    x = (torch.randn(4, 5) * 2).requires_grad_()
    n(x)
    assert n.v.requires_grad
    functional.detach_net(n)
    assert not n.v.requires_grad
