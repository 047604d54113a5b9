"""The ATMN Process of spikemar's Lava export and its two ProcessModels (numpy and lava only).

**ATMN Process**: ports ``a_in`` (dendritic input) and ``s_out`` (graded spikes with payload
+1/−1: Loihi 2's graded spikes carry the sign). Parameters: ``vth`` (per neuron), ``carry`` (the
membrane's carry-over: 1/τ in floating point, round(4096/τ) in fixed point), ``ternary``,
``bias``, an optional LTI cell in front (``lti_decay``, ``lti_b``, ``lti_c``, ``lti_d``) and
``start_step``. ProcessModels: ``PyATMNModelFloat`` (tag ``floating_pt``) and
``PyATMNModelBitAcc`` (tags ``bit_accurate_loihi``, ``fixed_pt``): the integer equations of
``spikemar.hardware.fixed_point`` with Loihi's wrap-around of 24-bit state.

Lava finds ProcessModels by importing every module in the folder of a Process's module, so this
folder holds only code that needs nothing beyond numpy, h5py and lava.
"""

from __future__ import annotations

import numpy as np
from lava.magma.core.decorator import implements, requires, tag
from lava.magma.core.model.py.model import PyLoihiProcessModel
from lava.magma.core.model.py.ports import PyInPort, PyOutPort
from lava.magma.core.model.py.type import LavaPyType
from lava.magma.core.process.ports.ports import InPort, OutPort
from lava.magma.core.process.process import AbstractProcess
from lava.magma.core.process.variable import Var
from lava.magma.core.resources import CPU
from lava.magma.core.sync.protocols.loihi_protocol import LoihiProtocol

STATE_LIMIT = 2**23
DECAY_BITS = 12
ACT_SHIFT = 6
VTH_SHIFT = 6


class ATMN(AbstractProcess):
    """Adaptive Ternary Multi-step Neuron (MAR) with an optional LTI cell before it.

    ``vth``: threshold per neuron (float V, or the 17-bit mantissa in fixed point, compared
    after ``<< 6``); ``carry``: 1/τ (float) or round(4096/τ) (fixed); ``ternary``: 1 for spikes
    in {−1, 0, +1}, 0 for {0, 1}; ``bias``: added to the dendritic input; ``lti``: a dict with
    ``decay``, ``b``, ``c``, ``d`` per neuron (float, or 4096 = 1.0 in fixed point), or None.
    """

    def __init__(
        self, *, shape, vth, carry, ternary, bias=0, lti=None, start_step=1, name=None, **kwargs
    ):
        super().__init__(shape=shape, name=name)
        self.a_in = InPort(shape=shape)
        self.s_out = OutPort(shape=shape)
        self.u = Var(shape=shape, init=0)
        self.h = Var(shape=shape, init=0)
        self.vth = Var(shape=shape, init=np.broadcast_to(vth, shape).copy())
        self.bias = Var(shape=shape, init=np.broadcast_to(bias, shape).copy())
        self.carry = Var(shape=(1,), init=carry)
        self.ternary = Var(shape=(1,), init=int(ternary))
        self.has_lti = Var(shape=(1,), init=int(lti is not None))
        self.start_step = Var(shape=(1,), init=int(start_step))
        lti = lti or {}
        for key in ("decay", "b", "c", "d"):
            value = np.broadcast_to(lti.get(key, 0), shape).copy()
            setattr(self, f"lti_{key}", Var(shape=shape, init=value))


@implements(proc=ATMN, protocol=LoihiProtocol)
@requires(CPU)
@tag("floating_pt")
class PyATMNModelFloat(PyLoihiProcessModel):
    """ATMN in floating point: the equations of ``spikemar.neurons.functional``."""

    a_in: PyInPort = LavaPyType(PyInPort.VEC_DENSE, float)
    s_out: PyOutPort = LavaPyType(PyOutPort.VEC_DENSE, float)
    u: np.ndarray = LavaPyType(np.ndarray, float)
    h: np.ndarray = LavaPyType(np.ndarray, float)
    vth: np.ndarray = LavaPyType(np.ndarray, float)
    bias: np.ndarray = LavaPyType(np.ndarray, float)
    carry: np.ndarray = LavaPyType(np.ndarray, float)
    ternary: np.ndarray = LavaPyType(np.ndarray, int)
    has_lti: np.ndarray = LavaPyType(np.ndarray, int)
    lti_decay: np.ndarray = LavaPyType(np.ndarray, float)
    lti_b: np.ndarray = LavaPyType(np.ndarray, float)
    lti_c: np.ndarray = LavaPyType(np.ndarray, float)
    lti_d: np.ndarray = LavaPyType(np.ndarray, float)
    start_step: np.ndarray = LavaPyType(np.ndarray, int)

    def run_spk(self) -> None:
        a = self.a_in.recv()
        if self.time_step < self.start_step[0]:
            self.s_out.send(np.zeros_like(self.u))
            return
        x = a + self.bias
        if self.has_lti[0]:
            self.h[:] = self.lti_decay * self.h + self.lti_b * x
            x = self.lti_c * self.h + self.lti_d * x
        h = x + self.u * self.carry[0]
        s = (h >= self.vth).astype(float)
        if self.ternary[0]:
            s = s - (h <= -self.vth)
        self.u[:] = h - self.vth * s
        self.s_out.send(s)


def _decay(x: np.ndarray, mult) -> np.ndarray:
    """Loihi's multiply by ``mult/4096`` rounding towards zero (as Lava's fixed-point LIF)."""
    p = np.asarray(x, dtype=np.int64) * np.asarray(mult, dtype=np.int64)  # no int32 overflow
    return (np.sign(p) * np.right_shift(np.abs(p), DECAY_BITS)).astype(np.int64)


def _wrap(x: np.ndarray) -> np.ndarray:
    """24-bit wrap-around, as Lava's bit-accurate LIF treats its current."""
    x = np.where(x > STATE_LIMIT, x - 2 * STATE_LIMIT, x)
    return np.where(x <= -STATE_LIMIT, x + 2 * STATE_LIMIT, x)


@implements(proc=ATMN, protocol=LoihiProtocol)
@requires(CPU)
@tag("bit_accurate_loihi", "fixed_pt")
class PyATMNModelBitAcc(PyLoihiProcessModel):
    """ATMN in Loihi's integers: 24-bit state, 12-bit carry, threshold mantissa << 6, input
    << 6 (the conventions of Lava's ``PyLifModelBitAcc``)."""

    a_in: PyInPort = LavaPyType(PyInPort.VEC_DENSE, np.int32, precision=24)
    s_out: PyOutPort = LavaPyType(PyOutPort.VEC_DENSE, np.int32, precision=24)
    u: np.ndarray = LavaPyType(np.ndarray, np.int32, precision=24)
    h: np.ndarray = LavaPyType(np.ndarray, np.int32, precision=24)
    vth: np.ndarray = LavaPyType(np.ndarray, np.int32, precision=17)
    bias: np.ndarray = LavaPyType(np.ndarray, np.int32, precision=16)
    carry: np.ndarray = LavaPyType(np.ndarray, np.int32, precision=13)
    ternary: np.ndarray = LavaPyType(np.ndarray, np.int32, precision=1)
    has_lti: np.ndarray = LavaPyType(np.ndarray, np.int32, precision=1)
    lti_decay: np.ndarray = LavaPyType(np.ndarray, np.int32, precision=13)
    lti_b: np.ndarray = LavaPyType(np.ndarray, np.int32, precision=16)
    lti_c: np.ndarray = LavaPyType(np.ndarray, np.int32, precision=16)
    lti_d: np.ndarray = LavaPyType(np.ndarray, np.int32, precision=16)
    start_step: np.ndarray = LavaPyType(np.ndarray, np.int32, precision=24)

    def run_spk(self) -> None:
        a = self.a_in.recv().astype(np.int64)
        if self.time_step < self.start_step[0]:
            self.s_out.send(np.zeros_like(self.u))
            return
        a = a + self.bias
        x = np.left_shift(a, ACT_SHIFT)
        if self.has_lti[0]:
            self.h[:] = _wrap(_decay(self.h, self.lti_decay) + _decay(x, self.lti_b))
            x = _wrap(_decay(self.h, self.lti_c) + _decay(x, self.lti_d))
        h = _wrap(x + _decay(self.u, int(self.carry[0])))
        vth = np.left_shift(self.vth.astype(np.int64), VTH_SHIFT)
        s = (h >= vth).astype(np.int64)
        if self.ternary[0]:
            s = s - (h <= -vth)
        self.u[:] = h - vth * s
        self.s_out.send(s)
