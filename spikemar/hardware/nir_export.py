r"""Export to NIR (the Neuromorphic Intermediate Representation), and back.

:func:`export_nir` writes a ``nir.NIRGraph`` with ``nir.write``: ``input`` → per block
[``flatten_{i}``] → synapse → [LTI] → neuron → ``output``, nodes named by the modules' paths.

* ``nn.Linear`` → ``nir.Linear`` (``nir.Affine`` with a bias); ``nn.Conv2d`` → ``nir.Conv2d``
  (``groups`` = 1 only: nir 1.0.8 cannot type a grouped conv);
  ``nn.Flatten`` → ``nir.Flatten`` over the per-sample dimensions, ``start_dim`` = −3 (counted
  from the end, so that it means the same whether a reader counts NIR's dimensions without the
  batch, as nir's type inference and SpikingJelly do, or hands ``start_dim`` to
  ``torch.nn.Flatten`` on batched input, as norse does; ``start_dim`` = 0 flattened norse's
  batch dimension too).
* :class:`~spikemar.hardware.CUBALIF` → ``nir.CubaLIF`` that reproduces it exactly in the usual
  forward-Euler reading with time step ``dt`` (norse's ``from_nir(graph, dt=dt)``):
  ``tau_syn = dt/δ_u``, ``tau_mem = dt/δ_v``, ``w_in = 1/δ_u``, ``r = 1/δ_v``, ``v_leak = 0``,
  ``v_reset = 0``. That needs δ_u, δ_v > 0 (τ = ∞ has no Euler form).
* **ATMN** has no NIR node: NIR knows neither ternary spikes nor a membrane divided by τ with a
  signed soft reset. It is written as ``nir.IF`` (``r`` = 1/dt, so that NIR's ``v̇ = R·I`` read
  with step ``dt`` adds the input once per step as ATMN does, as SpikingJelly's ``import_from_nir``
  requires (norse's IAF adds the input once per step whatever ``r`` is, and logs that it
  expected 1); ``v_threshold`` = V, ``v_reset`` = 0: the nearest primitive, which a reader that
  ignores metadata runs as a binary, hard-reset IF)
  whose ``metadata`` carries the exact neuron: ``spikemar_neuron`` = ``"ATMN"``,
  ``spikemar_version`` = 1, ``tau`` (``inf`` for no carry-over), ``ternary`` (0/1),
  ``v_threshold`` (per neuron), ``reset`` = ``"subtract"`` and ``equations`` (the text below).
* the **LTI cell** is written as ``nir.LI`` (``tau = dt/(1−λ)``, ``r = b/(1−λ)``, ``v_leak`` = 0:
  the state h) with ``metadata`` ``spikemar_neuron`` = ``"LTI"`` and ``decay``, ``b``, ``c``, ``d``
  (the readout ``y = c·h + d·x`` has no single NIR node).

:func:`import_nir` reads such a file back into a spikemar ``nn.Sequential`` (metadata first),
and other producers' chains of the nodes above (the graph's ends found by type: nirtorch names
them ``input_1``, …); a CubaLIF without spikemar's ``dt`` is read with ``dt = tau_syn/w_in``, so
SpikingJelly's ``CUBALIFNode`` files come in at whatever ``dt`` they were written with.
The graph's ``metadata`` carries ``spikemar_format`` = ``spikemar-nir`` and ``spikemar_version``
(:mod:`spikemar.hardware.formats`); a newer version, in the graph or in a node, is refused.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .._io import atomic_write, check_output_path
from .._numbers import real
from ..neurons import ATMN, BinaryMultiStep, TernarySingleStep
from ..ssm.mixer import LTICell
from .fixed_point import Block, UnsupportedModuleError, check_block_shapes, lower, synaptic_input
from .formats import NIR_FORMAT, NIR_VERSION, check_input_shape, check_version
from .lif import CUBALIF

__all__ = ["ATMN_EQUATIONS", "export_nir", "import_nir"]

ATMN_EQUATIONS = (
    "h_t = x_t + u_{t-1}/tau; s_t = +1 if h_t >= V, -1 if h_t <= -V (ternary; binary: 0), "
    "0 otherwise; u_t = h_t - V*s_t; u_{-1} = 0"
)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().double().numpy()


def export_nir(model: nn.Module, path: str | os.PathLike, input_shape, *, dt: float = 1e-3):
    """Write ``model`` (an ``nn.Sequential`` of blocks, see :mod:`spikemar.hardware.fixed_point`)
    to ``path`` as NIR, atomically; ``input_shape`` is one sample's shape. Returns the graph."""
    import nir

    shape = check_input_shape(input_shape)
    step = real(dt)
    if step is None or not (math.isfinite(step) and step > 0):
        raise ValueError(f"dt: expected a finite number > 0, got {dt!r}")
    dt = step  # a Python float: it is written into the file's metadata
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"path: expected a str or path, got {type(path).__name__}")
    path = check_output_path(path, name="path")  # before any work: fail early
    blocks = lower(model)
    check_block_shapes(blocks, shape)
    nodes: dict = {"input": nir.Input(input_type=np.array(shape))}
    edges: list[tuple[str, str]] = []
    prev = "input"
    x = torch.zeros(1, *shape, dtype=torch.float64)

    def add(name: str, node) -> None:
        nonlocal prev
        nodes[name] = node
        edges.append((prev, name))
        prev = name

    for i, b in enumerate(blocks):
        synapse_path = next(iter(b.modules))
        if b.flatten and x.dim() > 2:
            sample = x.shape[1:]  # start_dim counted from the end: see the module docstring
            add(f"flatten_{i}", nir.Flatten(input_type=np.array(sample), start_dim=-len(sample)))
        in_hw = tuple(x.shape[2:])
        x = synaptic_input(x, b, b.weight.double(), None)
        out_shape = tuple(x.shape[1:])
        add(synapse_path, _synapse_node(nir, b, in_hw))
        if b.lti is not None:
            lti_path = next(p for p, m in b.modules.items() if isinstance(m, LTICell))
            add(lti_path, _lti_node(nir, b, dt))
        add(b.path, _neuron_node(nir, b, out_shape, dt))
    nodes["output"] = nir.Output(output_type=np.array(tuple(x.shape[1:])))
    edges.append((prev, "output"))
    metadata = {"spikemar_format": NIR_FORMAT, "spikemar_version": NIR_VERSION}
    graph = nir.NIRGraph(nodes=nodes, edges=edges, metadata=metadata)
    # made in memory, then written as bytes: HDF5 (under nir.write) that finds the disk full
    # crashes the process (SIGSEGV) closing the file; a plain write fails with an OSError
    image = io.BytesIO()
    with atomic_write(path, name="path") as tmp:  # errors name path, not the temporary
        nir.write(image, graph)
        tmp.write_bytes(image.getbuffer())
    return graph


def _synapse_node(nir, b: Block, in_hw: tuple[int, ...]):
    w = _np(b.weight)
    if b.synapse == "dense":
        return nir.Linear(weight=w) if b.bias is None else nir.Affine(weight=w, bias=_np(b.bias))
    bias = np.zeros(w.shape[0]) if b.bias is None else _np(b.bias)
    if w.shape[2] != w.shape[3]:
        raise UnsupportedModuleError(
            f"{next(iter(b.modules))}: a {w.shape[2]}x{w.shape[3]} kernel: nir 1.0.8 infers a "
            "conv's output shape from a square kernel and rejects the graph otherwise"
        )
    if b.groups != 1:
        raise UnsupportedModuleError(
            f"{next(iter(b.modules))}: a Conv2d with groups = {b.groups}: nir 1.0.8 takes a "
            "conv's input channels from its weight (in_channels / groups) and rejects the graph, "
            "when writing and when reading it"
        )
    return nir.Conv2d(
        input_shape=in_hw,
        weight=w, stride=b.stride, padding=b.padding, dilation=b.dilation, groups=b.groups,
        bias=bias,
    )  # fmt: skip


def _neuron_node(nir, b: Block, out_shape: tuple[int, ...], dt: float):
    ones = np.ones(out_shape)
    if b.neuron == "cuba":
        du, dv = b.current_decay, b.voltage_decay
        if du == 0 or dv == 0:
            raise UnsupportedModuleError(
                f"{b.path}: CUBALIF with current_decay = {du}, voltage_decay = {dv}: NIR's "
                "CubaLIF needs both > 0 (a decay of 0 is τ = ∞, which has no Euler form)"
            )
        return nir.CubaLIF(
            tau_syn=ones * dt / du, tau_mem=ones * dt / dv, r=ones / dv, v_leak=0 * ones,
            v_threshold=ones * float(b.v_threshold), v_reset=0 * ones, w_in=ones / du,
            metadata={"spikemar_neuron": "CUBALIF", "spikemar_version": 1, "dt": dt},
        )  # fmt: skip
    v = np.broadcast_to(_np(b.v_threshold), out_shape).copy()
    return nir.IF(
        r=ones / dt,
        v_threshold=v,
        v_reset=0 * ones,
        metadata={
            "spikemar_neuron": "ATMN",
            "spikemar_version": 1,
            "tau": float(b.tau),
            "ternary": int(b.ternary),
            "v_threshold": v,
            "reset": "subtract",
            "equations": ATMN_EQUATIONS,
        },
    )


def _lti_node(nir, b: Block, dt: float):
    lam, bb = _np(b.lti["decay"]), _np(b.lti["b"])
    return nir.LI(
        tau=dt / (1 - lam),
        r=bb / (1 - lam),
        v_leak=0 * lam,
        metadata={
            "spikemar_neuron": "LTI",
            "spikemar_version": 1,
            **{k: _np(b.lti[k]) for k in ("decay", "b", "c", "d")},
            "equations": "h_t = decay*h_{t-1} + b*x_t; y_t = c*h_t + d*x_t",
        },
    )


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def import_nir(path: str | os.PathLike) -> nn.Sequential:
    """Read a NIR file written by :func:`export_nir` back into a spikemar ``nn.Sequential``
    (ATMN and LTI from their metadata). Raises ``FileNotFoundError`` for a missing file and
    ``ValueError`` naming the path for a corrupt, truncated, non-NIR or newer file, or naming
    a node it cannot read."""
    import nir

    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"path: expected a str or path, got {type(path).__name__}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: no NIR file at {path}")
    try:
        graph = nir.read(str(path))
    except OSError as err:
        raise ValueError(f"path: {path} is not a readable HDF5 file (corrupt or truncated: "
                         f"{err})") from None  # fmt: skip
    except (KeyError, ValueError, TypeError, AttributeError) as err:
        raise ValueError(f"path: {path} is not a NIR graph that nir reads "
                         f"({type(err).__name__}: {err})") from None  # fmt: skip
    meta = getattr(graph, "metadata", None) or {}
    if "spikemar_version" in meta:
        check_version(meta["spikemar_version"], NIR_VERSION, path, "NIR file")
    for node in graph.nodes.values():
        node_meta = getattr(node, "metadata", None) or {}
        if "spikemar_version" in node_meta:
            check_version(node_meta["spikemar_version"], NIR_VERSION, path, "NIR file")
    return nn.Sequential(*(_module(name, graph.nodes[name]) for name in _chain(graph, path)))


def _end(graph, kind, what: str, path: Path) -> str:
    """The name of the graph's ``kind`` node (nir.Input or nir.Output): the one named ``what``
    ('input', 'output'), else the one node of that type. NIR marks a graph's ends by type,
    whatever their names (nirtorch's tracer, behind norse's and SpikingJelly's exporters, names
    the input 'input_1'; nir adds an Input or Output of its own to a loose node)."""
    if isinstance(graph.nodes.get(what), kind):
        return what
    names = [name for name, node in graph.nodes.items() if isinstance(node, kind)]
    if len(names) != 1:
        raise ValueError(f"path: {path} holds a NIR graph with {len(names)} {what} nodes "
                         f"{names}; import_nir reads a graph with one")  # fmt: skip
    return names[0]


def _chain(graph, path: Path) -> list[str]:
    """The names of the nodes between ``input`` and ``output``, in order; a ValueError naming
    ``path`` for a graph that is not one chain (a branch, a recurrent edge, a loose node), which
    an ``nn.Sequential`` cannot hold."""
    import nir

    first = _end(graph, nir.Input, "input", path)
    last = _end(graph, nir.Output, "output", path)
    nexts: dict[str, list[str]] = {}
    for src, dst in graph.edges:
        nexts.setdefault(src, []).append(dst)
    names, name = [], first
    while name != last:
        after = nexts.get(name, [])
        if len(after) != 1:
            what = f"feeds {after}" if after else "feeds no node"
            raise ValueError(f"path: {path} holds a NIR graph that is not one chain from "
                             f"{first!r} to {last!r}: node {name!r} {what}")  # fmt: skip
        name = after[0]
        if name in names or name == first:
            raise ValueError(f"path: {path} holds a recurrent NIR graph (a cycle through "
                             f"{name!r}); import_nir reads feed-forward chains")  # fmt: skip
        if name != last:
            names.append(name)
    loose = sorted(set(graph.nodes) - {first, last, *names})
    if loose:
        raise ValueError(f"path: {path} holds NIR nodes off the chain from {first!r} to "
                         f"{last!r}: {loose}")  # fmt: skip
    return names


def _module(name: str, node) -> nn.Module:
    import nir

    meta = getattr(node, "metadata", {}) or {}
    kind = _text(meta.get("spikemar_neuron", ""))
    t = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32)  # noqa: E731
    if isinstance(node, nir.Flatten):
        return nn.Flatten()
    if isinstance(node, nir.Linear | nir.Affine):
        bias = isinstance(node, nir.Affine)
        m = nn.Linear(node.weight.shape[1], node.weight.shape[0], bias=bias)
        with torch.no_grad():
            m.weight.copy_(t(node.weight))
            if bias:
                m.bias.copy_(t(node.bias))
        return m
    if isinstance(node, nir.Conv2d):
        w = node.weight
        # NIR's Conv2d always has a bias; export_nir writes zeros for a conv without one, which
        # must come back without one (a CUBALIF takes no bias before it)
        bias = node.bias is not None and bool(np.any(np.asarray(node.bias) != 0))
        if isinstance(node.padding, str):
            raise ValueError(f"{name}: a Conv2d with padding {node.padding!r}; spikemar reads "
                             "numeric padding (Loihi's Conv takes numbers)")  # fmt: skip
        ints = lambda a: tuple(int(n) for n in np.atleast_1d(a))  # noqa: E731
        m = nn.Conv2d(
            w.shape[1] * int(node.groups), w.shape[0], tuple(w.shape[2:]),
            stride=ints(node.stride), padding=ints(node.padding), dilation=ints(node.dilation),
            groups=int(node.groups), bias=bias,
        )  # fmt: skip
        with torch.no_grad():
            m.weight.copy_(t(w))
            if bias:
                m.bias.copy_(t(node.bias))
        return m
    if kind in ("ATMN", "LTI"):
        try:
            return _atmn(name, node, meta, t) if kind == "ATMN" else _lti(name, meta, t)
        except KeyError as err:
            raise ValueError(
                f"{name}: {kind} metadata without {err.args[0]!r} (the keys "
                "export_nir writes: see spikemar.hardware.nir_export)"
            ) from None
        except (TypeError, RuntimeError) as err:  # a value that is not a number, a wrong shape
            raise ValueError(f"{name}: {kind} metadata that spikemar cannot read "
                             f"({type(err).__name__}: {err})") from None  # fmt: skip
        except ValueError as err:  # the neuron's own check (tau < 1, a threshold <= 0, ...)
            if str(err).startswith(f"{name}: "):
                raise
            raise ValueError(f"{name}: {kind} metadata that spikemar cannot read ({err})") from None
    if isinstance(node, nir.CubaLIF):
        return _cuba_lif(name, node, float(meta["dt"]) if "dt" in meta else None)
    raise ValueError(f"{name}: a {type(node).__name__} node that spikemar does not read")


def _number(name: str, meta: dict, key: str) -> float:
    try:
        return float(np.asarray(meta[key]).item())
    except (TypeError, ValueError):
        raise ValueError(f"{name}: metadata {key} = {meta[key]!r}, expected a number") from None


def _atmn(name: str, node, meta: dict, t) -> nn.Module:
    v = t(meta["v_threshold"])
    neurons = np.shape(node.v_threshold)
    if v.dim() and tuple(v.shape) != tuple(neurons):
        raise ValueError(f"{name}: ATMN metadata v_threshold of shape {tuple(v.shape)} for a "
                         f"node of shape {tuple(neurons)}")  # fmt: skip
    v_channel = v.reshape(-1, v.shape[-1])[0] if v.dim() else v
    if not torch.equal(v_channel.expand_as(v), v):
        raise ValueError(f"{name}: ATMN thresholds that vary beyond the last dimension")
    tau, ternary = _number(name, meta, "tau"), bool(int(_number(name, meta, "ternary")))
    if not ternary:
        return BinaryMultiStep(tau, v_channel.clone())
    if math.isinf(tau):
        return TernarySingleStep(v_channel.clone())
    return ATMN(tau, v_channel.clone())


def _lti(name: str, meta: dict, t) -> LTICell:
    decay = np.asarray(meta["decay"], dtype=np.float64)
    if decay.ndim != 1 or not np.all((decay >= 0) & (decay <= 1)):
        raise ValueError(f"{name}: LTI metadata decay {decay!r}: expected one value in [0, 1] "
                         "per channel")  # fmt: skip
    m = LTICell(decay.shape[0])
    with torch.no_grad():
        m.log_rate.copy_(torch.log(-torch.log(t(decay).double())).float())
        for key in ("b", "c", "d"):
            getattr(m, key).copy_(t(meta[key]))
    return m


def _cuba_lif(name: str, node, dt: float | None) -> CUBALIF:
    """CUBALIF from a ``nir.CubaLIF`` in the form :func:`export_nir` writes (one value per
    parameter, ``w_in = tau_syn/dt``, ``r = tau_mem/dt``, ``v_leak = v_reset = 0``); any other
    CubaLIF is a ValueError naming the node rather than a neuron that computes something else.
    ``dt`` is the node's metadata ``dt``; a node without one (another producer's: SpikingJelly
    writes this form with its own dt, 1e-4 by default) is read with ``dt = tau_syn / w_in``."""
    values = {}
    for key in ("tau_syn", "tau_mem", "r", "w_in", "v_leak", "v_reset", "v_threshold"):
        a = np.ravel(np.asarray(getattr(node, key), dtype=np.float64))
        if a.size == 0 or not np.all(a == a[0]):
            raise ValueError(f"{name}: a CubaLIF whose {key} varies across neurons; spikemar's "
                             "CUBALIF has one value")  # fmt: skip
        values[key] = float(a[0])
    if dt is None:
        dt = values["tau_syn"] / values["w_in"] if values["w_in"] > 0 else 1e-3
        if not (math.isfinite(dt) and dt > 0):
            dt = 1e-3
    du, dv = dt / values["tau_syn"], dt / values["tau_mem"]
    expected = {"w_in": 1 / du, "r": 1 / dv, "v_leak": 0.0, "v_reset": 0.0}
    for key, want in expected.items():
        if not math.isclose(values[key], want, rel_tol=1e-9, abs_tol=1e-12):
            raise ValueError(
                f"{name}: a CubaLIF with {key} = {values[key]:.6g}; spikemar's CUBALIF read with "
                f"dt = {dt:g} needs {key} = {want:.6g} (w_in = tau_syn/dt, r = tau_mem/dt, "
                "v_leak = v_reset = 0)"
            )
    try:
        return CUBALIF(du, dv, values["v_threshold"])
    except ValueError as err:  # tau_syn < dt, a threshold <= 0, ...
        raise ValueError(f"{name}: a CubaLIF that CUBALIF cannot hold with dt = {dt:g} "
                         f"({err})") from None  # fmt: skip
