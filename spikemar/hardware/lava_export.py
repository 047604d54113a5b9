"""Export to Lava: a netx HDF5 file (with spikemar's ATMN layers in it) and a runner.

:func:`export_lava` writes one HDF5 file in lava-dl netx's layout, documented as data here:

``layer/0``: ``type`` = ``input``, ``shape`` = the input's per-sample shape, PyTorch order
    (netx reverses it to its (x, y, z) = (W, H, C) order).
``layer/{i}``: ``flatten`` layers (``type`` only) before a dense layer that follows a conv one;
    otherwise ``type`` = ``dense`` or ``conv`` with

    * ``shape``: the output's per-sample shape, PyTorch order;
    * ``weight``: int, PyTorch layout ([out, in] or [out, in, kH, kW]), even values in
      [−256, 254] (:mod:`spikemar.hardware.fixed_point`: netx then finds weight exponent 0);
    * conv only: ``stride``, ``padding``, ``dilation`` ([y, x]) and ``groups``;
    * ``bias`` (ATMN layers only): int, added to the dendritic input every step;
    * ``neuron/type`` = ``CUBA`` (netx's own: ``iDecay``, ``vDecay`` 12-bit with 4096 = 1.0,
      ``vThMant`` the 17-bit threshold mantissa (× 2^6), ``refDelay`` = 1, ``gradedSpike`` = 0)
      or ``ATMN`` (spikemar's, which netx's loader does not know: ``vThMant`` per neuron,
      PyTorch order; ``carry`` = round(4096/τ); ``ternary`` 0/1; ``gradedSpike`` = 1, payload
      ±1; optional ``lti/{decay, b, c, d}`` per neuron, 4096 = 1.0);
    * ``spikemar/``: the float parameters for Lava's floating-point run (``weight``, ``bias``,
      ``v_threshold``, ``tau``, ``current_decay``, ``voltage_decay``, ``lti/…``) and ``scale``
      (integer synaptic input = scale × float synaptic input).

``spikemar`` attributes at the root: ``format`` = ``spikemar-netx``, ``version`` = 1
(:mod:`spikemar.hardware.formats`: :func:`run_lava` and the Lava runtime refuse a newer one).
A file whose layers are all CUBA is a plain netx network: ``netx.hdf5.Network(path)`` loads and
runs it. Files with ATMN layers need :mod:`spikemar.hardware.lava.runtime` (numpy + lava), which
builds CUBA layers with netx's own ``create_dense``/``create_conv`` and ATMN layers as netx blocks
around the ATMN Process.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import signal
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .._io import atomic_write, check_output_path
from .._numbers import check_count, plain, real
from .fixed_point import (
    Block,
    FixedBlock,
    FixedPointNetwork,
    check_block_shapes,
    quantize_network,
    synaptic_input,
)
from .formats import NETX_FORMAT as FORMAT
from .formats import NETX_VERSION as VERSION
from .formats import check_input_shape, check_version

__all__ = ["LavaRunError", "LavaUnavailableError", "export_lava", "lava_python", "run_lava"]

REPO_ROOT = Path(__file__).resolve().parents[2]
PAYLOAD_LIMIT = 2**23  # a graded spike's signed 24-bit payload


class LavaUnavailableError(RuntimeError):
    """The Lava environment is not there (build it with ``.ci/lava-env``)."""


class LavaRunError(RuntimeError):
    """Lava's run failed; the message holds its last line, ``stderr`` all of its output."""

    def __init__(self, message: str, stderr: str) -> None:
        super().__init__(message)
        self.stderr = stderr


def _bytes(text: str) -> np.ndarray:
    return np.array([text.encode("ascii")], dtype="S10")  # netx reads type[0].decode('ascii')


def export_lava(
    model: nn.Module | FixedPointNetwork, path: str | os.PathLike, input_shape
) -> FixedPointNetwork:
    """Quantise ``model`` (an ``nn.Sequential`` of blocks, see
    :mod:`spikemar.hardware.fixed_point`) and write it to ``path`` as a netx HDF5 file (layout in
    this module's docstring), atomically. ``input_shape`` is one sample's shape, (F,) or
    (C, H, W). Returns the :class:`FixedPointNetwork` whose integers the file holds."""
    import h5py

    shape = check_input_shape(input_shape)
    path = Path(_check_path_type(path))
    if path.suffix in ("", "."):
        raise ValueError(f"path: expected a file name such as net.h5, got {str(path)!r}")
    check_output_path(path, name="path")  # before quantising: fail early
    fixed = model if isinstance(model, FixedPointNetwork) else quantize_network(model)
    check_block_shapes([fb.block for fb in fixed.blocks], shape)
    # the HDF5 file is made in memory and written out as bytes: HDF5 that finds the disk full
    # under its own writes crashes the process (SIGSEGV) closing the file, leaving its
    # temporary behind; a plain write fails with an OSError that names the file
    image = io.BytesIO()
    with atomic_write(path, name="path") as tmp:  # errors name path, not the temporary
        with h5py.File(image, "w") as f:
            _write_network(f, fixed, shape)
        tmp.write_bytes(image.getbuffer())
    return fixed


def _write_network(f, fixed: FixedPointNetwork, shape: tuple[int, ...]) -> None:
    """The netx layout (this module's docstring) of ``fixed`` in the open HDF5 file ``f``."""
    f.attrs["format"] = FORMAT
    f.attrs["version"] = VERSION
    layer = f.create_group("layer")
    g = layer.create_group("0")
    g.create_dataset("type", data=_bytes("input"))
    g.create_dataset("shape", data=np.array(shape))
    x = torch.zeros(1, *shape, dtype=torch.float64)
    i = 1
    for fb in fixed.blocks:
        b = fb.block
        if b.flatten and x.dim() > 2:
            layer.create_group(str(i)).create_dataset("type", data=_bytes("flatten"))
            i += 1
        x = synaptic_input(x, b, b.weight.double(), None)
        _write_block(layer.create_group(str(i)), fb, tuple(x.shape[1:]))
        i += 1


def _check_path_type(path: object) -> str | os.PathLike:
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"path: expected a str or path, got {type(path).__name__}")
    return path


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def _write_block(g, fb: FixedBlock, out_shape: tuple[int, ...]) -> None:
    b: Block = fb.block
    g.create_dataset("type", data=_bytes(b.synapse))
    g.create_dataset("shape", data=np.array(out_shape))
    g.create_dataset("weight", data=_np(fb.weight).astype(np.int32))
    if b.synapse == "conv":
        g.create_dataset("stride", data=np.array(b.stride))
        g.create_dataset("padding", data=np.array(b.padding))
        g.create_dataset("dilation", data=np.array(b.dilation))
        g.create_dataset("groups", data=b.groups)
    n = g.create_group("neuron")
    sm = g.create_group("spikemar")
    sm.create_dataset("weight", data=_np(b.weight).astype(np.float64))
    sm.create_dataset("scale", data=fb.scale)
    per_neuron = torch.broadcast_to(fb.vth_mant, out_shape) if fb.vth_mant.dim() else fb.vth_mant
    if b.neuron == "cuba":
        n.create_dataset("type", data=_bytes("CUBA"))
        n.create_dataset("iDecay", data=fb.i_decay)
        n.create_dataset("vDecay", data=fb.v_decay)
        n.create_dataset("vThMant", data=int(fb.vth_mant))
        n.create_dataset("refDelay", data=1)
        n.create_dataset("gradedSpike", data=0)
        sm.create_dataset("v_threshold", data=float(b.v_threshold))
        sm.create_dataset("current_decay", data=b.current_decay)
        sm.create_dataset("voltage_decay", data=b.voltage_decay)
        return
    n.create_dataset("type", data=_bytes("ATMN"))
    n.create_dataset("vThMant", data=_np(per_neuron).astype(np.int32))
    n.create_dataset("carry", data=fb.carry)
    n.create_dataset("ternary", data=int(b.ternary))
    n.create_dataset("gradedSpike", data=1)
    v_float = b.v_threshold.double()
    sm.create_dataset(
        "v_threshold",
        data=_np(torch.broadcast_to(v_float, out_shape) if v_float.dim() else v_float),
    )
    sm.create_dataset("tau", data=math.inf if math.isinf(b.tau) else float(b.tau))
    if b.bias is not None:
        g.create_dataset("bias", data=_np(fb.bias).astype(np.int32))
        sm.create_dataset("bias", data=_np(b.bias).astype(np.float64))
    if fb.lti is not None:
        lti, lti_f = n.create_group("lti"), sm.create_group("lti")
        for k in ("decay", "b", "c", "d"):
            lti.create_dataset(k, data=_np(fb.lti[k]).astype(np.int32))
            lti_f.create_dataset(k, data=_np(b.lti[k]).astype(np.float64))


# -- running in Lava --------------------------------------------------------------------------


def lava_python() -> Path:
    """The Python of the Lava environment: ``$SPIKEMAR_LAVA_PYTHON``, else ``build/venv-lava``
    in the repository root. Raises :class:`LavaUnavailableError` saying how to build it."""
    env = os.environ.get("SPIKEMAR_LAVA_PYTHON")
    python = Path(env) if env else REPO_ROOT / "build" / "venv-lava" / "bin" / "python"
    if python.exists() and not (python.is_file() and os.access(python, os.X_OK)):
        raise LavaUnavailableError(
            f"no Lava environment at {python}: not an executable file "
            + ("(SPIKEMAR_LAVA_PYTHON names it)" if env else "(rebuild it: `bash .ci/lava-env`)")
        )
    if not python.exists():
        raise LavaUnavailableError(
            f"no Lava environment at {python}: build it with `bash .ci/lava-env` "
            "(or point SPIKEMAR_LAVA_PYTHON at a Python that has lava-nc and lava-dl)"
        )
    return python


def run_lava(
    path: str | os.PathLike,
    inputs: torch.Tensor,
    num_steps: int,
    fixed_point: bool = True,
    *,
    netx_network: bool = False,
    readout: str = "spikes",
    timeout_s: float = 600.0,
) -> torch.Tensor:
    """Run an exported network in Lava's simulator (``Loihi2SimCfg``, tag ``fixed_pt`` or
    ``floating_pt``) for ``num_steps`` steps of ``inputs`` [num_steps, *input_shape] (one
    sample; integer payloads such as {−1, 0, 1} in fixed point). Returns the last layer's spikes
    [num_steps, *output_shape], aligned with the input's time axis.

    Lava runs in its own environment (:func:`lava_python`) in a subprocess;
    ``netx_network=True`` loads the file with ``netx.hdf5.Network`` itself (CUBA-only files);
    ``readout="voltage"`` returns the last layer's voltage after the run, [*output_shape], in
    Loihi's integer state units (fixed point) instead of the spikes.
    """
    if readout not in ("spikes", "voltage"):
        raise ValueError(f"readout: expected 'spikes' or 'voltage', got {readout!r}")
    seconds = real(timeout_s)
    if seconds is None or not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"timeout_s: expected a finite number of seconds > 0, got {timeout_s!r}")
    timeout_s = plain(timeout_s)  # a Python number for the subprocess' timeout and messages
    path = Path(_check_path_type(path))
    if not path.is_file():
        raise FileNotFoundError(f"path: no exported network at {str(path)!r}")
    num_steps = check_count("num_steps", num_steps)
    if not isinstance(inputs, torch.Tensor) or inputs.dim() < 2:
        raise ValueError("inputs: expected a tensor [num_steps, *input_shape] for one sample")
    if inputs.shape[0] < num_steps:
        raise ValueError(f"inputs: {inputs.shape[0]} steps given, num_steps asks for {num_steps}")
    x = inputs[:num_steps].detach().cpu().double().numpy()
    if not np.isfinite(x).all():
        raise ValueError("inputs: expected finite values; got NaN or inf")
    if fixed_point and not np.array_equal(x, np.round(x)):
        raise ValueError("inputs: fixed point takes integer spike payloads; got fractions")
    if fixed_point and x.size and np.abs(x).max() >= PAYLOAD_LIMIT:
        raise ValueError(  # beyond it Lava's int32 input would wrap around silently
            f"inputs: a payload of {np.abs(x).max():.0f} is outside Loihi 2's 24-bit graded "
            f"spikes (|payload| < {PAYLOAD_LIMIT})"
        )
    neurons = _check_netx_file(path, tuple(inputs.shape[1:]), spikemar_file=not netx_network)
    last_neuron = neurons[-1] if neurons else "none"
    if netx_network and set(neurons) - {"CUBA"}:
        raise ValueError(
            f"netx_network: netx's own loader builds CUBA layers only; {path} has "
            f"{sorted(set(neurons) - {'CUBA'})} layers (run it without netx_network=True)"
        )
    if readout == "voltage" and (netx_network or last_neuron != "CUBA"):
        raise ValueError(
            f"readout: 'voltage' reads the voltage of a CUBA output layer built by spikemar's "
            f"runtime; the last layer of {path} is {last_neuron}"
            + (" (and netx_network=True hides the layers)" if netx_network else "")
        )
    python = lava_python()
    with tempfile.TemporaryDirectory(prefix="spikemar-lava-") as tmp:
        np.save(f"{tmp}/in.npy", x)
        cmd = [str(python), "-m", "spikemar.hardware.lava.runtime", str(path.resolve()),
               f"{tmp}/in.npy", f"{tmp}/out.npy"]  # fmt: skip
        if not fixed_point:
            cmd.append("--float")
        if netx_network:
            cmd.append("--netx-network")
        if readout == "voltage":
            cmd.append("--voltage")
        # only the spikemar package on the path: an installed spikemar sits beside the main
        # environment's packages (numpy 2, ...), which must not shadow the Lava environment's
        Path(tmp, "path").mkdir()
        Path(tmp, "path", "spikemar").symlink_to(Path(__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": str(Path(tmp, "path"))}
        # a session of its own: Lava runs its processes as children, which a timeout must end too
        with subprocess.Popen(
            cmd, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True,
        ) as proc:  # fmt: skip
            try:
                _, stderr = proc.communicate(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                _kill_session(proc.pid)
                _, stderr = proc.communicate()
                raise LavaRunError(
                    f"Lava run of {path} did not finish within timeout_s = {timeout_s} s", stderr
                ) from None
            except BaseException:  # Ctrl-C: Lava's processes go too
                _kill_session(proc.pid)
                raise
        if proc.returncode != 0:
            lines = [line for line in stderr.splitlines() if line.strip()]
            last = lines[-1].strip() if lines else "no output"
            raise LavaRunError(
                f"Lava run of {path} failed (exit {proc.returncode}): {last} (the whole output: "
                "this error's .stderr, or run `python -m spikemar.hardware.lava.runtime` as "
                "DEVELOPERS.md shows)",
                stderr,
            )
        out = np.load(f"{tmp}/out.npy")
    return torch.from_numpy(out.astype(np.float32))


def _kill_session(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def _check_netx_file(
    path: Path, sample_shape: tuple[int, ...], *, spikemar_file: bool
) -> list[str]:
    """Before Lava starts (seconds of start-up): ``path`` is a readable netx HDF5 file of a
    format this spikemar reads, and one step of ``inputs`` has its input layer's shape. Returns
    the neuron type of each layer that has one (``CUBA``, ``ATMN``, …), in order."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            form = f.attrs.get("format")
            form = form.decode() if isinstance(form, bytes) else form
            if form is not None or spikemar_file:
                if form != FORMAT:
                    raise ValueError(f"path: {path} is not a netx file written by spikemar's "
                                     f"export_lava (format {form!r})")  # fmt: skip
                check_version(f.attrs.get("version"), VERSION, path, "netx file")
            shape = tuple(int(n) for n in np.asarray(f["layer/0/shape"]))
            kinds = [f[f"layer/{i}/neuron/type"][0] for i in range(len(f["layer"]))
                     if f"layer/{i}/neuron/type" in f]  # fmt: skip
            neurons = [k.decode() if isinstance(k, bytes) else str(k) for k in kinds]
    except OSError as err:
        raise ValueError(f"path: {path} is not a readable HDF5 file (corrupt or truncated: "
                         f"{err})") from None  # fmt: skip
    except KeyError:
        raise ValueError(f"path: {path} has no input layer (layer/0/shape): not a netx "
                         "network") from None  # fmt: skip
    if sample_shape != shape:
        raise ValueError(f"inputs: one step is {sample_shape}, the network's input layer in "
                         f"{path} takes {shape}: pass [num_steps, *{shape}]")  # fmt: skip
    return neurons
