"""The Lava side of spikemar's export: the ATMN Process, its ProcessModels, and a runner.

This module imports numpy, h5py and lava only (no PyTorch; of spikemar only the plain
:mod:`spikemar.hardware.formats`, for the format version it refuses beyond), so it runs
in the separate Lava environment (``build/venv-lava``, built by ``.ci/lava-env``) on the files that
:func:`spikemar.hardware.export_lava` writes. :func:`spikemar.hardware.run_lava` calls it as::

    build/venv-lava/bin/python -m spikemar.hardware.lava.runtime NET.h5 IN.npy OUT.npy [--float]

with (only) the spikemar package on ``PYTHONPATH``. ``IN.npy`` holds the input [steps, *input_shape]
(PyTorch layout); ``OUT.npy`` receives the last layer's spikes [steps, *output_shape],
already shifted back by the one-step delay that each of Lava's synapses adds.

The ATMN Process and its ProcessModels are in :mod:`spikemar.hardware.lava.atmn`.

**Layers**: CUBA layers go through netx's own loader functions (``netx.hdf5.Network.create_dense``
and ``create_conv``) in fixed point; ATMN layers are netx ``Dense``/``Conv`` blocks whose neuron
is the ATMN Process. In floating point every layer is built from the float parameters that the
file keeps under ``layer/{i}/spikemar`` (netx's own float path scales integers inconsistently).
"""

from __future__ import annotations

import sys
import types


def _stand_in_torchvision() -> None:
    """lava-dl's slayer imports torchvision at start-up for object detection, which netx never
    uses; torchvision's CUDA builds cannot be imported beside CPU torch (DESIGN.md §3)."""
    if "torchvision" in sys.modules:
        return
    try:
        import torchvision  # noqa: F401
    except Exception:
        tv = types.ModuleType("torchvision")
        tv.ops = types.ModuleType("torchvision.ops")
        tv.transforms = types.ModuleType("torchvision.transforms")
        sys.modules.update(
            {"torchvision": tv, "torchvision.ops": tv.ops, "torchvision.transforms": tv.transforms}
        )


_stand_in_torchvision()

# lava sets the multiprocessing start method when imported: import it before anything else does
import numpy as np  # noqa: E402

from .atmn import ATMN  # noqa: E402

# -- building a network from the file ---------------------------------------------------------


def _whc(shape) -> tuple:
    """PyTorch's (C, H, W) or (F,) → Lava's (W, H, C) or (F,)."""
    return tuple(int(n) for n in np.asarray(shape)[::-1])


def _to_lava(x: np.ndarray) -> np.ndarray:
    """A per-neuron array in PyTorch layout → Lava's WHC layout (reversed axes)."""
    return np.ascontiguousarray(np.asarray(x).transpose(tuple(range(np.ndim(x)))[::-1]))


def build_network(path: str, fixed_point: bool, input_message_bits: int = 8):
    """The layers of the exported network as Lava processes, connected; returns
    ``(layers, input_shape_whc)``. Each layer's ``inp``/``out`` ports are netx blocks' ports."""
    import h5py
    from lava.lib.dl.netx.blocks.process import Conv, Dense
    from lava.lib.dl.netx.hdf5 import Network
    from lava.lib.dl.netx.utils import NetDict, optimize_weight_bits
    from lava.proc.lif.process import LIF

    from ..formats import NETX_FORMAT, NETX_VERSION, check_version

    f = h5py.File(path, "r")
    form = f.attrs.get("format")
    if (form.decode() if isinstance(form, bytes) else form) != NETX_FORMAT:
        raise ValueError(f"path: {path} is not a netx file written by spikemar (format {form!r})")
    check_version(f.attrs.get("version"), NETX_VERSION, path, "netx file")
    net = NetDict(f=f)
    layer_cfg = net["layer"]
    input_shape = _whc(layer_cfg[0]["shape"])
    layers, flatten_next, message_bits = [], False, input_message_bits
    for i in range(1, len(layer_cfg)):
        cfg = layer_cfg[i]
        kind = cfg["type"]
        if kind == "flatten":
            flatten_next = True
            continue
        raw = f[f"layer/{i}"]
        neuron_type = cfg["neuron"]["type"]
        prev_shape = layers[-1].shape if layers else input_shape
        if neuron_type == "CUBA" and fixed_point:
            if kind == "dense":
                layer, _ = Network.create_dense(cfg, input_message_bits=message_bits)
            else:
                layer, _ = Network.create_conv(cfg, prev_shape, input_message_bits=message_bits)
            out_bits = 0
        else:
            layer, out_bits = _spikemar_block(
                raw, kind, neuron_type, fixed_point, prev_shape, message_bits, len(layers) + 2,
                Dense, Conv, LIF, optimize_weight_bits,
            )  # fmt: skip
        if layers:
            src = layers[-1].out
            if flatten_next:
                src = src.transpose([2, 1, 0]).flatten()
            src.connect(layer.inp)
        flatten_next = False
        layers.append(layer)
        message_bits = out_bits
    f.close()
    return layers, input_shape


def _spikemar_block(raw, kind, neuron_type, fixed_point, prev_shape, message_bits, start_step,
                    Dense, Conv, LIF, optimize_weight_bits):  # fmt: skip
    sm = raw["spikemar"]
    shape = _whc(raw["shape"][()])
    if neuron_type == "CUBA":  # floating point only: fixed point goes through netx's loader
        neuron_params = {
            "neuron_proc": LIF,
            "vth": float(sm["v_threshold"][()]),
            "du": float(sm["current_decay"][()]),
            "dv": float(sm["voltage_decay"][()]),
            "bias_mant": 0.0,
            "bias_exp": 0,
        }
        out_bits = 0
    else:
        tern = int(raw["neuron/ternary"][()])
        if fixed_point:
            vth = _to_lava(raw["neuron/vThMant"][()])
            carry = int(raw["neuron/carry"][()])
            bias = raw["bias"][()] if "bias" in raw else 0
            lti = {k: raw[f"neuron/lti/{k}"][()] for k in ("decay", "b", "c", "d")} if (
                "lti" in raw["neuron"]) else None  # fmt: skip
        else:
            vth = _to_lava(sm["v_threshold"][()])
            tau = float(sm["tau"][()])
            carry = 0.0 if np.isinf(tau) else 1.0 / tau
            bias = sm["bias"][()] if "bias" in sm else 0.0
            lti = {k: sm[f"lti/{k}"][()] for k in ("decay", "b", "c", "d")} if (
                "lti" in sm) else None  # fmt: skip
        if np.ndim(bias) and kind == "conv":  # per channel → per neuron (C, H, W)
            bias = np.broadcast_to(np.asarray(bias)[:, None, None], tuple(raw["shape"][()]))
        neuron_params = {
            "neuron_proc": ATMN,
            "vth": vth,
            "carry": carry,
            "ternary": tern,
            "bias": _to_lava(bias) if np.ndim(bias) else bias,
            "lti": None if lti is None else {k: _to_lava(v) for k, v in lti.items()},
            "start_step": start_step,
            "num_message_bits": 8,  # graded spikes: the payload carries the sign
        }
        out_bits = 8
    if fixed_point:
        weight = raw["weight"][()].astype(np.int64)
    else:
        weight = sm["weight"][()].astype(np.float64)
    if kind == "dense":
        if fixed_point:
            weight, num_bits, exponent, sign_mode = optimize_weight_bits(weight)
        else:
            num_bits, exponent, sign_mode = 8, 0, None
        block = Dense(
            shape=shape, neuron_params=neuron_params, weight=weight,
            num_weight_bits=num_bits, weight_exponent=exponent, sign_mode=sign_mode,
            input_message_bits=message_bits,
        )  # fmt: skip
    else:
        weight = weight[:, :, ::-1, ::-1].transpose((0, 3, 2, 1))
        block = Conv(
            shape=shape, input_shape=prev_shape, neuron_params=neuron_params,
            weight=np.ascontiguousarray(weight),
            stride=raw["stride"][()][::-1], padding=raw["padding"][()][::-1],
            dilation=raw["dilation"][()][::-1], groups=int(raw["groups"][()]),
            input_message_bits=message_bits,
        )  # fmt: skip
    return block, out_bits


def run(
    path: str,
    inputs: np.ndarray,
    fixed_point: bool = True,
    netx_network: bool = False,
    readout: str = "spikes",
):
    """Run the exported network on ``inputs`` [steps, *input_shape] (PyTorch layout) on
    ``Loihi2SimCfg``; return the output spikes [steps, *output_shape] aligned with the input's
    time axis (Lava's synapses add one step each; the extra steps see zero input).

    ``netx_network``: load the whole file with ``netx.hdf5.Network`` instead (CUBA-only
    networks in fixed point: the check that netx's own loader reads the file).
    ``readout="voltage"``: return the last layer's voltage after the run instead, [*output_shape]
    (for a CUBA integrator that reads out a projection, see ``spikemar.hardware.mar_export``)."""
    from lava.magma.core.run_conditions import RunSteps
    from lava.magma.core.run_configs import Loihi2SimCfg
    from lava.proc import io

    steps = inputs.shape[0]
    if netx_network:
        from lava.lib.dl.netx.hdf5 import Network

        network = Network(net_config=path, input_message_bits=8)
        first, last, depth = network, network, len(network.layers)
        input_shape = network.in_layer.inp.shape
    else:
        layers, input_shape = build_network(path, fixed_point)
        first, last, depth = layers[0], layers[-1], len(layers)
    neuron = getattr(last, "neuron", None)
    if readout == "voltage" and not hasattr(neuron, "v"):
        raise ValueError(
            f"readout: 'voltage' reads the voltage v of a CUBA output layer; the last layer of "
            f"{path} is {type(neuron if neuron is not None else last).__name__}, which has none"
        )
    total = steps + depth
    data = np.zeros((*input_shape, total))
    data[..., :steps] = np.moveaxis(_to_lava_batch(inputs), 0, -1)
    source = io.source.RingBuffer(data=data.astype(np.int32) if fixed_point else data)
    sink = io.sink.RingBuffer(shape=last.out.shape, buffer=total)
    source.s_out.connect(first.inp)
    last.out.connect(sink.a_in)
    tag_name = "fixed_pt" if fixed_point else "floating_pt"
    try:  # stop Lava's processes whatever happens, or they outlive this one
        sink.run(condition=RunSteps(num_steps=total), run_cfg=Loihi2SimCfg(select_tag=tag_name))
        out = sink.data.get()
        voltage = neuron.v.get() if readout == "voltage" else None
    finally:
        sink.stop()
    if voltage is not None:
        return _to_lava(voltage)  # back to PyTorch layout
    out = np.moveaxis(out, -1, 0)[depth:]  # [steps, *WHC]
    return np.stack([_to_lava(o) for o in out])  # back to PyTorch layout


def _to_lava_batch(inputs: np.ndarray) -> np.ndarray:
    return np.stack([_to_lava(x) for x in inputs])


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m spikemar.hardware.lava.runtime")
    p.add_argument("network", help="the netx HDF5 file written by spikemar.hardware.export_lava")
    p.add_argument("inputs", help=".npy input [steps, *input_shape] (PyTorch layout)")
    p.add_argument("output", help=".npy to write the output spikes to")
    p.add_argument("--float", action="store_true", help="floating-point ProcessModels")
    p.add_argument("--netx-network", action="store_true", help="load with netx.hdf5.Network")
    p.add_argument("--voltage", action="store_true", help="read the last layer's final voltage")
    args = p.parse_args(argv)
    inputs = np.load(args.inputs)
    out = run(
        args.network, inputs, fixed_point=not args.float, netx_network=args.netx_network,
        readout="voltage" if args.voltage else "spikes",
    )  # fmt: skip
    np.save(args.output, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
