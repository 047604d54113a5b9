"""The CPU kernels of :mod:`spikemar.ssm` for inference: one token of the selective mixer between
its projections, and RMSNorm (``_cpu/ssm_impl.h`` has the equations).

Why C: generating one token at batch 1 is a few hundred tiny tensor operations whose entry costs
are the time; the mixer's middle (convolution window, softplus, the scan step, the gate) is ~15
of them, here one call. The library is built on first use with the compiler, flags and cache of
the neurons' CPU backend (:func:`spikemar.neurons.cpu_backend.build_library`). Callers check
shapes and dtypes (the kernels trust them) and run these only with autograd off; each function
equals its PyTorch reference to rounding, which the tests check on random inputs.
"""

from __future__ import annotations

import ctypes
import math
from pathlib import Path

import torch

from ..neurons.cpu_backend import KernelLibrary, build_library

__all__ = ["MixerStep", "mixer_step_cpu", "rms_norm_cpu", "usable"]

_DIR = Path(__file__).parent / "_cpu"


def _build() -> ctypes.CDLL:
    return _bind(build_library(_DIR / "ssm.c", (_DIR / "ssm_impl.h",)))


_LIBRARY = KernelLibrary(_build)


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i32, i64, f64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_double
    for suffix in ("f32", "f64"):
        mix = getattr(lib, f"mixer_step_{suffix}")
        # params, zxbcdt, conv_state, ssm_state, new_conv, new_ssm, gated, a_out, batch, nthreads
        mix.argtypes = [p, p, p, p, p, p, p, p, i64, i32]
        mix.restype = i64
        norm = getattr(lib, f"rms_norm_{suffix}")
        norm.argtypes = [p, i64, i64, i64, p, f64, p]  # x, rows, groups, D, w, eps, out
        norm.restype = None
    return lib


def usable() -> bool:
    """Whether the kernels are built and loaded (building them on the first call)."""
    return _LIBRARY.usable()


class _Params(ctypes.Structure):
    """ssm_impl.h's ``mixer_params``: one mixer's constants (the same layout for both types)."""

    _fields_ = [
        *((name, ctypes.c_void_p) for name in ("conv_w", "conv_b", "dt_bias", "A_log", "D",
                                               "z_bias")),
        *((name, ctypes.c_int64) for name in ("I", "N", "G", "H", "P", "k", "xi_off", "z_off",
                                              "dt_off", "conv_silu", "dt_scales_x")),
        ("dt_min", ctypes.c_double),
        ("dt_max", ctypes.c_double),
    ]  # fmt: skip


# State values (batch · heads · head_dim · d_state) per thread below which another thread costs
# more than it saves: a parallel region's start and join take a few µs, a state value ~1 ns.
_MIN_STATE_PER_THREAD = 1 << 15


class MixerStep:
    """One mixer's C step (see :func:`mixer_step_cpu`, whose arguments these are, ``z_bias``
    sixth) with its constant part prepared once:
    the parameters' pointers, the sizes and switches, kept in the form the kernel reads, so a
    token pays only for its own tensors. The parameters are held (their storage stays alive
    while this object does); :meth:`holds` says whether given tensors are still the ones
    prepared (same storage and shapes), which is how a mixer knows when to prepare anew.

    Raises ValueError when a parameter's shape, dtype or device does not fit the others, or
    it is not contiguous."""

    def __init__(
        self,
        conv_weight: torch.Tensor,
        conv_bias: torch.Tensor | None,
        dt_bias: torch.Tensor | None,
        A_log: torch.Tensor | None,
        D: torch.Tensor,
        z_bias: torch.Tensor | None = None,
        *,
        head_dim: int,
        d_state: int,
        n_groups: int = 1,
        dt_limit: tuple[float, float] = (0.0, math.inf),
        discrete: bool = False,
        conv_silu: bool = True,
    ) -> None:
        lib = _LIBRARY.load()
        if n_groups < 1 or head_dim < 1 or d_state < 1:
            raise ValueError(f"head_dim, d_state, n_groups: expected >= 1, got {head_dim}, "
                             f"{d_state}, {n_groups}")  # fmt: skip
        # the sizes follow from the convolution's K = I + 2GN channels (I = H·head_dim)
        dtype, K, k = conv_weight.dtype, conv_weight.shape[0], conv_weight.shape[-1]
        I = K - 2 * n_groups * d_state
        H = I // head_dim
        if dtype not in (torch.float32, torch.float64) or I < 1 or I % head_dim or H % n_groups:
            raise ValueError(
                f"conv_weight: expected float32/float64 [K, 1, k] with K = H·{head_dim} + "
                f"2·{n_groups}·{d_state} and H a multiple of {n_groups}, got {dtype} "
                f"{tuple(conv_weight.shape)}"
            )
        shapes = {"conv_weight": (K, 1, k), "conv_bias": (K,), "dt_bias": (H,), "A_log": (H,),
                  "D": (H,), "z_bias": (I,)}  # fmt: skip
        given = {"conv_weight": conv_weight, "conv_bias": conv_bias, "dt_bias": dt_bias,
                 "A_log": A_log, "D": D, "z_bias": z_bias}  # fmt: skip
        for name, t in given.items():
            if t is not None and (t.dtype != dtype or not t.is_cpu or t.shape != shapes[name]
                                  or not t.is_contiguous()):  # fmt: skip
                raise ValueError(
                    f"{name}: expected a contiguous CPU {dtype} tensor of shape {shapes[name]}, "
                    f"got {t.dtype} {tuple(t.shape)} on {t.device}"
                )
        if discrete != (dt_bias is None and A_log is None):
            raise ValueError("dt_bias, A_log: None exactly when discrete (A = −1, no Δ bias)")
        # the kernel reads the parameters' own storage (in-place updates are seen): hold it
        self._held = tuple(None if t is None else t.detach() for t in given.values())
        self._key = self._identity(*given.values())
        ptrs = [0 if t is None else t.data_ptr() for t in self._held]
        offsets = (0, K, K + I) if discrete else (I, 0, I + K)  # ξ, z, Δ_raw in a row
        sizes = (I, d_state, n_groups, H, head_dim, k, *offsets, int(conv_silu), int(not discrete))
        self._params = _Params(*ptrs, *sizes, *map(float, dt_limit))
        self._ref = ctypes.byref(self._params)
        self._fn = lib.mixer_step_f32 if dtype == torch.float32 else lib.mixer_step_f64
        self.dtype = dtype
        self.width = I + K + H  # a row of zxbcdt
        self.conv_shape = (K, k - 1)  # a sequence's conv state
        self.state_shape = (H, head_dim, d_state)  # a sequence's SSM state
        self._I, self._H, self._state_values = I, H, H * head_dim * d_state

    def threads(self, batch: int) -> int:
        """The workers a token of ``batch`` sequences gets: torch's thread count, fewer for a
        small state."""
        return max(1, min(torch.get_num_threads(),
                          batch * self._state_values // _MIN_STATE_PER_THREAD))  # fmt: skip

    @property
    def address(self) -> int:
        """The address of the prepared constants (``ssm_impl.h``'s ``mixer_params``), for C
        code that calls the kernel itself (:mod:`spikemar.models.fused_step`); valid while this
        object lives."""
        return ctypes.addressof(self._params)

    @staticmethod
    def _identity(*tensors: torch.Tensor | None) -> tuple:
        return tuple(None if t is None else (t.data_ptr(), t.shape) for t in tensors)

    def holds(self, *params: torch.Tensor | None) -> bool:
        """Whether ``params`` (the constructor's six tensors in its order, conv_weight … z_bias)
        are still the tensors prepared: the same storage and shapes."""
        return self._identity(*params) == self._key

    def accepts(
        self, zxbcdt: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor
    ) -> bool:
        """Whether a token's tensors fit this step: CPU tensors of its dtype with the shapes
        [batch, I + K + H], [batch, K, k − 1], [batch, H, P, N] (what the kernel trusts)."""
        dtype = self.dtype
        if not (zxbcdt.dtype == conv_state.dtype == ssm_state.dtype == dtype):
            return False
        if not (zxbcdt.is_cpu and conv_state.is_cpu and ssm_state.is_cpu) or zxbcdt.dim() != 2:
            return False
        batch, width = zxbcdt.shape
        return (
            width == self.width
            and conv_state.shape == (batch, *self.conv_shape)
            and ssm_state.shape == (batch, *self.state_shape)
        )

    def __call__(
        self,
        zxbcdt: torch.Tensor,
        conv_state: torch.Tensor,
        ssm_state: torch.Tensor,
        *,
        in_place: bool = False,
        threads: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """One token: as :func:`mixer_step_cpu`. ``in_place``: the new states are written over
        ``conv_state`` and ``ssm_state`` (which must then be contiguous) and returned as they
        are. ``threads``: workers (None: torch's thread count, fewer for a small state). Raises
        ValueError for tensors that this step does not :meth:`accept <accepts>`."""
        if not self.accepts(zxbcdt, conv_state, ssm_state):
            raise ValueError(
                f"zxbcdt, conv_state, ssm_state: expected CPU {self.dtype} tensors of shapes "
                f"[batch, {self.width}], [batch, {', '.join(map(str, self.conv_shape))}], [batch, "
                f"{', '.join(map(str, self.state_shape))}], got {zxbcdt.dtype} "
                f"{tuple(zxbcdt.shape)}, {conv_state.dtype} {tuple(conv_state.shape)}, "
                f"{ssm_state.dtype} {tuple(ssm_state.shape)}"
            )
        batch = zxbcdt.shape[0]
        zxbcdt = zxbcdt.contiguous()
        if in_place:
            if not (conv_state.is_contiguous() and ssm_state.is_contiguous()):
                raise ValueError("conv_state, ssm_state: in_place needs contiguous tensors")
            new_conv, new_ssm = conv_state, ssm_state
        else:
            conv_state, ssm_state = conv_state.contiguous(), ssm_state.contiguous()
            new_conv, new_ssm = torch.empty_like(conv_state), torch.empty_like(ssm_state)
        if threads is None:
            threads = self.threads(batch)
        gated, a = zxbcdt.new_empty(batch, self._I), zxbcdt.new_empty(batch, self._H)
        bad = self._fn(self._ref, zxbcdt.data_ptr(), conv_state.data_ptr(), ssm_state.data_ptr(),
                       new_conv.data_ptr(), new_ssm.data_ptr(), gated.data_ptr(), a.data_ptr(),
                       batch, max(1, threads))  # fmt: skip
        if bad < 0:
            raise MemoryError(f"the mixer step's {batch}-sequence scratch could not be allocated")
        return gated, new_conv, new_ssm, a, bad


def mixer_step_cpu(
    zxbcdt: torch.Tensor,
    conv_state: torch.Tensor,
    ssm_state: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    A_log: torch.Tensor | None,
    D: torch.Tensor,
    n_groups: int = 1,
    dt_limit: tuple[float, float] = (0.0, math.inf),
    *,
    discrete: bool = False,
    conv_silu: bool = True,
    z_bias: torch.Tensor | None = None,
    in_place: bool = False,
    threads: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """One token of :class:`spikemar.ssm.SelectiveMixer` from the input projection's output to
    the gated output before the norm, in one C call. All tensors on the CPU in one dtype
    (float32 or float64) with the mixer's shapes: ``zxbcdt`` [batch, I + K + H], ``conv_state``
    [batch, K, k − 1], ``ssm_state`` [batch, H, P, N], ``conv_weight`` [K, 1, k] (K = I + 2GN).

    ``discrete``: one token of :class:`spikemar.ssm.DiscreteMixer` (Llamba's) instead: the row
    is ``[x B C | z | Δ_raw]``, the state's input is x ⊗ B (not Δx ⊗ B), ``dt_bias`` and
    ``A_log`` are None (A = −1), ``conv_silu`` says whether a SiLU follows the convolution and
    ``z_bias`` [I] (or None) is added to z before its SiLU.

    ``in_place``: write the new states over ``conv_state`` and ``ssm_state`` (contiguous) instead
    of new tensors. ``threads``: how many of torch's threads run it (None: all of them, fewer for
    a small state). A mixer that steps often prepares a :class:`MixerStep` once instead.

    Returns ``(gated [batch, I], new conv state, new SSM state, a [batch, H], bad)``, ``bad`` the
    number of log decays that are not finite and ≤ 0 (the caller raises).
    """
    P, N = ssm_state.shape[2:]
    params = (conv_weight, conv_bias, dt_bias, A_log, D, z_bias)
    conv_weight, conv_bias, dt_bias, A_log, D, z_bias = (
        None if t is None else t.contiguous() for t in params
    )
    step = MixerStep(conv_weight, conv_bias, dt_bias, A_log, D, z_bias, head_dim=P, d_state=N,
                     n_groups=n_groups, dt_limit=dt_limit, discrete=discrete,
                     conv_silu=conv_silu)  # fmt: skip
    return step(zxbcdt, conv_state, ssm_state, in_place=in_place, threads=threads)


def rms_norm_cpu(
    x: torch.Tensor, weight: torch.Tensor | None, eps: float, groups: int = 1
) -> torch.Tensor:
    """RMSNorm of ``x`` over each of ``groups`` equal slices of its last dimension, times
    ``weight`` (over the whole last dimension; None: none), in one C call: equal to
    ``nn.RMSNorm`` (``groups`` = 1) to rounding, the sum of squares taken in double. For a
    float32/float64 CPU ``x`` and a ``weight`` of its dtype and last dimension."""
    lib = _LIBRARY.load()
    x = x.contiguous()
    width = x.shape[-1]
    out = torch.empty_like(x, requires_grad=False)
    w = 0 if weight is None else weight.contiguous().data_ptr()
    fn = lib.rms_norm_f32 if x.dtype == torch.float32 else lib.rms_norm_f64
    fn(x.data_ptr(), x.numel() // width, groups, width // groups, w, float(eps), out.data_ptr())
    return out
