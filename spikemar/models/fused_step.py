"""One generated token of an SSM language model in one C call: :class:`FusedStep`.

``model.step`` enters ~100 modules per token of a 24-layer model; at batch 1 on a CPU their
Python costs ~100 µs per layer (~2.5 ms of a ~20 ms token of the 130 M Mamba-2, whose floor is
reading its weights once). A :class:`FusedStep` compiles the model's modules once into a list
of operations (``ssm/_cpu/program_impl.h``: embedding, RMSNorm, projection, the mixer's middle,
spike point, SwiGLU gate, residual add) that one C call runs per token, each operation with the
kernel its module's own fast path uses: logits equal ``model.step``'s (to the bit where the
module path takes those kernels too: float32/float64 on the CPU, at most
:data:`spikemar.ssm.linear.MAX_FAST_ROWS` sequences, no FFN; to rounding through an FFN, whose
SiLU is PyTorch's there). ::

    fused = FusedStep(model, batch=1)
    state = fused.init_state()
    logits, state = fused(tokens_t, state)          # as model.step(tokens_t, state)

    model.generate(prompt, 100, fused=True)          # generate builds one per call

What it leaves out, on purpose (the reasons a serious user must know):

* **hooks**: the modules are not entered, so their forward hooks and pre-hooks do not fire
  (the reason this is an opt-in). Under spikemar's energy counter (:func:`spikemar.counting`)
  and when a spike point records its spikes (``record = True``), a call runs ``model.step``
  instead, so counts and rasters stay right.
* **what it reads when**: weights are read from their storage at every call (in-place changes,
  an optimizer step or ``load_state_dict``, are seen); spike thresholds V = exp(a) are computed
  when it is built and again when ``a`` changed in place (its version counter: not a change
  through ``.data``) or τ did. A parameter whose storage was replaced (``model.double()``) is
  detected and raises; replaced modules or parameters are not: build a new one after changing
  the model.
* **state**: updated in place (``init_state`` makes it so), as ``generate`` does.
* **threads**: calls from several threads run one at a time (they share the scratch buffers);
  the thread counts are torch's when it is built.

Supported: :class:`~spikemar.models.MARLM` with selective (Mamba-2) or discrete (Llamba) mixers
in every layer, dense or spiking (MAR's fused ATMN spike points), SwiGLU/Llama FFNs or none, on
the CPU in float32 or float64. Anything else (attention or LTI mixers, sparsified FFNs, a
subclassed module, CUDA) raises ValueError naming the first module it cannot compile
(:func:`unsupported_reason` asks without raising).
"""

from __future__ import annotations

import ctypes
import threading
from pathlib import Path

import torch
from torch import nn

from .._numbers import integer
from ..counting import counting_active
from ..neurons import cpu_backend
from ..neurons.cpu_backend import KernelLibrary, build_library
from ..neurons.functional import ThresholdError, _decay
from ..ssm.linear import Linear
from ..ssm.mixer import DiscreteMixer, MixerState, SelectiveMixer
from ..ssm.norm import RMSNorm
from .common import FeedForward, LlamaMLP, SpikePoint

__all__ = ["FusedStep", "unsupported_reason"]

_DIR = Path(__file__).resolve().parent.parent / "ssm" / "_cpu"
_EMBED, _NORM, _LINEAR, _MIXER, _SPIKE, _SWIGLU, _ADD = range(7)  # program_impl.h's OP_*


class _Op(ctypes.Structure):
    """program_impl.h's ``step_op`` (the same layout for both element types)."""

    _fields_ = [
        ("kind", ctypes.c_int64),
        ("nthreads", ctypes.c_int64),
        ("p", ctypes.c_void_p * 4),
        ("n", ctypes.c_int64 * 4),
        ("f", ctypes.c_double * 2),
    ]


def _build() -> ctypes.CDLL:
    headers = ("program_body.h", "program_impl.h", "ssm_impl.h", "linear_impl.h")
    lib = build_library(_DIR / "program.c", tuple(_DIR / h for h in headers))
    p = ctypes.c_void_p
    for suffix in ("f32", "f64"):
        fn = getattr(lib, f"run_program_{suffix}")
        fn.argtypes = [p, ctypes.c_int64, p, p, p]  # ops, n, tokens, states, code
        fn.restype = ctypes.c_int64
    return lib


_LIBRARY = KernelLibrary(_build)
_DTYPES = (torch.float32, torch.float64)
_MIXERS = (SelectiveMixer, DiscreteMixer)
_FFNS = (FeedForward, LlamaMLP)


def unsupported_reason(model: nn.Module, batch: int = 1) -> str | None:
    """Why :class:`FusedStep` cannot compile ``model`` for ``batch`` sequences (None: it can).
    Builds nothing that outlives the call."""
    try:
        FusedStep(model, batch)
    except (ValueError, RuntimeError) as err:  # what it cannot compile, a bad batch, no compiler
        return str(err)
    return None


class FusedStep:
    """``model.step`` for ``batch`` sequences as one C call per token (see the module
    docstring for what it equals and what it leaves out). Raises ValueError naming the first
    module it cannot compile, or a bad ``batch``; RuntimeError where the kernels cannot be
    built (no C compiler)."""

    def __init__(self, model: nn.Module, batch: int = 1) -> None:
        from .mar import MARLM, MARLayer  # mar imports generation, which imports this

        if integer(batch) is None or batch < 1:  # NumPy's ints as Python's
            raise ValueError(f"batch: expected an int >= 1, got {batch!r}")
        batch = integer(batch)
        if not isinstance(model, MARLM) or type(model).step is not MARLM.step:
            raise ValueError(f"model: expected a MARLM (whose step it compiles), got "
                               f"{type(model).__name__}")  # fmt: skip
        dtype = model.embed.weight.dtype
        if dtype not in _DTYPES or not model.embed.weight.is_cpu:
            raise ValueError(f"model: expected float32/float64 parameters on the CPU, got "
                               f"{dtype} on {model.embed.weight.device}")  # fmt: skip
        self._lib = _LIBRARY.load()
        self.model, self.batch, self.dtype = model, batch, dtype
        self._ops: list[tuple] = []
        # the tensors the program points into are held by these three (and the mixers' steps)
        self._checked: list[tuple[torch.Tensor, int]] = []  # parameters and their storage
        self._buffers: dict[tuple[str, int], torch.Tensor] = {}
        # per spike point: its a, neuron, point, V (refreshed in place) and op index; and what
        # V was computed from: a's version counter and τ (compared as lists at each call)
        self._thresholds: list[tuple] = []
        self._versions: list[int] = []
        self._taus: list[float] = []
        self._kernels: list = []  # the mixers' prepared steps (their constants' addresses)
        self._error_sites: list[str] = []  # per op: the module path it stands for
        config = model.config
        if "attn" in config.layer_kinds() or "lti" in config.layer_kinds():
            kind = next(k for k in config.layer_kinds() if k in ("attn", "lti"))
            raise ValueError(f"model: a fused step compiles SSM mixers only, the model has "
                               f"{kind!r} layers")  # fmt: skip
        x = self._buffer("stream", config.d_model)
        self._embed(model.embed, x)
        for i, layer in enumerate(model.layers):
            name = f"layers.{i}"
            if type(layer) is not MARLayer:
                raise ValueError(f"{name}: {type(layer).__name__} is not a MARLayer")
            self._mixer(layer, i, name, x)
            if layer.ffn is not None:
                self._ffn(layer, name, x)
        logits_in = self._chain([("norm", model.norm)], x, "")
        if type(model.head) not in (Linear, nn.Linear):  # a subclass's forward would be skipped
            raise ValueError(f"head: a fused step cannot compile {type(model.head).__name__}")
        self._linear("head", model.head, logits_in, "logits")
        self._head = len(self._ops) - 1  # its output pointer is each call's new logits
        # the logits are as wide as the head writes them (what model.step returns)
        self._logits_width = model.head.out_features
        self._array = (_Op * len(self._ops))(*(_Op(*op) for op in self._ops))
        lib = self._lib
        self._run = lib.run_program_f32 if dtype == torch.float32 else lib.run_program_f64
        self._code = ctypes.c_int64()
        self._code_ref = ctypes.byref(self._code)
        # ctypes lets go of the GIL in the call: two threads' calls would share the buffers and
        # the head's logits pointer (one writing into the other's freed logits)
        self._lock = threading.Lock()
        # (MixerState, conv, ssm) per layer of the states the program points at; none at first
        self._seen: tuple = ()
        self._state_array = None
        self.vocab_size = config.vocab_size

    # -- compiling --------------------------------------------------------------------------
    def _buffer(self, role: str, width: int) -> torch.Tensor:
        """A [batch, width] scratch buffer, one per role and width, shared across layers."""
        key = (role, width)
        if key not in self._buffers:
            self._buffers[key] = torch.zeros(self.batch, width, dtype=self.dtype)
        return self._buffers[key]

    def _param(self, t: torch.Tensor | None, name: str) -> int:
        """A parameter's address, after checking it fits (CPU, the model's dtype, contiguous);
        0 for None."""
        if t is None:
            return 0
        if t.dtype != self.dtype or not t.is_cpu or not t.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous CPU {self.dtype} tensor, got "
                               f"{t.dtype} on {t.device}")  # fmt: skip
        self._checked.append((t, t.data_ptr()))
        return t.data_ptr()

    def _emit(self, kind: int, site: str, *, threads: int = 1, p=(), n=(), f=()) -> None:
        pad = list(p) + [0] * (4 - len(p))
        self._ops.append((kind, threads, tuple(pad), tuple(list(n) + [0] * (4 - len(n))),
                          tuple(list(f) + [0.0] * (2 - len(f)))))  # fmt: skip
        self._error_sites.append(site)

    def _embed(self, embed: nn.Module, out: torch.Tensor) -> None:
        if type(embed) is not nn.Embedding or embed.max_norm is not None:
            raise ValueError(f"embed: expected a plain nn.Embedding, got {embed}")
        w = embed.weight
        if w.dim() != 2 or w.shape[1] != out.shape[1]:
            raise ValueError(f"embed: {tuple(w.shape)} rows for a stream {out.shape[1]} wide")
        # ids in [0, config.vocab_size), what model.step checks (and the table's rows)
        vocab = min(w.shape[0], self.model.config.vocab_size)
        self._emit(_EMBED, "embed", p=(self._param(w, "embed.weight"), out.data_ptr()),
                   n=(w.shape[1], vocab, self.batch))  # fmt: skip

    def _chain(self, modules: list[tuple[str, nn.Module]], x: torch.Tensor, prefix: str):
        """Operations for modules applied one after another to x; returns the last output."""
        for name, m in modules:
            path = f"{prefix}.{name}" if prefix else name
            if type(m) is nn.Identity:
                continue
            if type(m) in (RMSNorm, nn.RMSNorm):
                x = self._norm(path, m, x)
            elif type(m) is SpikePoint:
                x = self._spike(path, m, x)
            elif type(m) in (Linear, nn.Linear):
                x = self._linear(path, m, x, name)  # one output per projection name
            else:
                raise ValueError(f"{path}: a fused step cannot compile {type(m).__name__}")
        return x

    def _norm(self, path: str, m: nn.RMSNorm, x: torch.Tensor) -> torch.Tensor:
        width = x.shape[1]
        if tuple(m.normalized_shape) != (width,):
            raise ValueError(f"{path}: normalized_shape {tuple(m.normalized_shape)} is not "
                               f"({width},)")  # fmt: skip
        groups = getattr(m, "groups", 1)
        eps = torch.finfo(self.dtype).eps if m.eps is None else m.eps
        out = self._buffer(f"norm{width}", width)
        w = self._param(m.weight, f"{path}.weight")
        self._emit(_NORM, path, p=(x.data_ptr(), w, out.data_ptr()),
                   n=(self.batch, groups, width // groups), f=(float(eps),))  # fmt: skip
        return out

    def _linear(self, path: str, m: nn.Linear, x: torch.Tensor, role: str) -> torch.Tensor:
        if x.shape[1] != m.in_features:
            raise ValueError(f"{path}: in_features {m.in_features}, input width {x.shape[1]}")
        out = self._buffer(role, m.out_features)
        w = self._param(m.weight, f"{path}.weight")
        b = self._param(m.bias, f"{path}.bias")
        self._emit(_LINEAR, path, threads=torch.get_num_threads(),
                   p=(x.data_ptr(), w, b, out.data_ptr()),
                   n=(self.batch, m.in_features, m.out_features))  # fmt: skip
        return out

    def _spike(self, path: str, point: SpikePoint, x: torch.Tensor) -> torch.Tensor:
        neuron = point.neuron
        a, width = neuron.log_threshold, x.shape[1]
        if not point.kernel_fits(x, neuron):  # the rule the module's own fused path follows
            raise ValueError(f"{path}: no fused CPU kernel for backend {neuron.backend!r}, T = "
                             f"{point.T}, a threshold of shape {tuple(a.shape)} on {a.device} "
                             f"for {width} channels")  # fmt: skip
        p = point._inference_parameters(neuron)  # V = exp(a) as the module's fused path has it
        vth = p.v_threshold.detach().to(self.dtype).contiguous()
        lib = cpu_backend.load_library()
        kernel = lib.atmn_quantize_forward_f32 if self.dtype == torch.float32 else \
            lib.atmn_quantize_forward_f64  # fmt: skip
        fn = ctypes.cast(kernel, ctypes.c_void_p).value
        out = self._buffer(f"spike{width}", width)
        n = self.batch * width
        self._emit(_SPIKE, path, threads=cpu_backend._threads(n * point.T),
                   p=(fn, x.data_ptr(), vth.data_ptr(), out.data_ptr()),
                   n=(n, vth.numel() if vth.dim() == 1 else 0, point.T, int(p.ternary)),
                   f=(float(p.tau), _decay(p.tau)))  # fmt: skip
        self._thresholds.append((a, neuron, point, vth, len(self._ops) - 1))
        self._versions.append(a._version)
        self._taus.append(p.tau)
        return out

    def _mixer(self, layer: nn.Module, i: int, name: str, x: torch.Tensor) -> None:
        mixer = layer.mixer
        if type(mixer) not in _MIXERS:
            raise ValueError(f"{name}.mixer: a fused step cannot compile "
                               f"{type(mixer).__name__}")  # fmt: skip
        u = self._chain([("norm1", layer.norm1)], x, name)
        zx = self._chain([("spike_in", mixer.spike_in), ("in_proj", mixer.in_proj)], u,
                         f"{name}.mixer")  # fmt: skip
        kernel = mixer.step_kernel()
        if kernel is None:
            raise ValueError(f"{name}.mixer: its C step cannot serve its parameters")
        # the C step reads and writes the widths its parameters give: the buffers and the states
        # (made and checked from the mixer's attributes) must have them
        widths = (zx.shape[1], mixer.d_inner, mixer.state_heads, mixer.head_dim, mixer.d_state,
                  (mixer.conv_channels, mixer.d_conv - 1))  # fmt: skip
        if widths != (kernel.width, kernel._I, *kernel.state_shape, kernel.conv_shape):
            raise ValueError(f"{name}.mixer: its modules' widths do not fit its parameters "
                               f"(in_proj gives {zx.shape[1]}, its C step takes "
                               f"{kernel.width})")  # fmt: skip
        for t in kernel._held:  # the kernel reads the parameters' storage itself
            if t is not None:
                self._checked.append((t, t.data_ptr()))
        self._kernels.append(kernel)
        gated = self._buffer("gated", mixer.d_inner)
        a = self._buffer("a", mixer.state_heads)
        self._emit(_MIXER, f"{name}.mixer", threads=kernel.threads(self.batch),
                   p=(kernel.address, zx.data_ptr(), gated.data_ptr(), a.data_ptr()),
                   n=(i, self.batch))  # fmt: skip
        out = self._chain([(n, mixer._modules[n]) for n in mixer.out_modules], gated,
                          f"{name}.mixer")  # fmt: skip
        # residual_in_fp32: the stream rounded to float32 before the add (float64 models)
        fp32 = int(layer.residual_in_fp32 and self.dtype != torch.float32)
        self._add(name, x, out, fp32)

    def _add(self, name: str, x: torch.Tensor, out: torch.Tensor, fp32: int = 0) -> None:
        if out.shape != x.shape:  # the add reads x.numel() values of out
            raise ValueError(f"{name}: a branch {out.shape[1]} wide for a stream {x.shape[1]} "
                               "wide")  # fmt: skip
        self._emit(_ADD, name, p=(x.data_ptr(), out.data_ptr()), n=(x.numel(), fp32))

    def _ffn(self, layer: nn.Module, name: str, x: torch.Tensor) -> None:
        ffn = layer.ffn
        if type(ffn) not in _FFNS:
            raise ValueError(f"{name}.ffn: a fused step cannot compile {type(ffn).__name__}")
        prefix = f"{name}.ffn"
        gate, up, down = (ffn._modules[n] for n in ffn.names)
        s = self._chain([("norm2", layer.norm2)], x, name)
        s = self._chain([("spike_in", ffn.spike_in)], s, prefix)
        g = self._chain([(ffn.names[0], gate)], s, prefix)
        u = self._chain([(ffn.names[1], up)], s, prefix)
        h = self._buffer("ffn_hidden", g.shape[1])
        if u.shape[1] != g.shape[1]:
            raise ValueError(f"{prefix}: gate and up widths differ")
        self._emit(_SWIGLU, prefix, p=(g.data_ptr(), u.data_ptr(), h.data_ptr()), n=(h.numel(),))
        out = self._chain([("spike_hidden", ffn.spike_hidden), (ffn.names[2], down)], h, prefix)
        self._add(name, x, out)

    # -- running ----------------------------------------------------------------------------
    def init_state(self) -> list:
        """The model's state for this step's batch, updated in place by each call."""
        return self.model.init_state(self.batch, in_place=True)

    def _state_pointers(self, state: list) -> None:
        """Checks the layers' states (once per set of tensors) and points the program at them."""
        model = self.model
        if not isinstance(state, list) or len(state) != len(model.layers):
            raise ValueError(f"state: expected the list of {len(model.layers)} layer states from "
                             "init_state()")  # fmt: skip
        tensors = []
        for i, (s, layer) in enumerate(zip(state, model.layers, strict=True)):
            mixer = layer.mixer
            if not isinstance(s, MixerState):
                raise ValueError(f"state[{i}]: expected the MixerState from init_state(), got "
                                 f"{type(s).__name__}")  # fmt: skip
            if not s.in_place:
                raise ValueError(f"state[{i}]: a fused step updates states in place; make them "
                                 "with init_state(batch, in_place=True)")  # fmt: skip
            shapes = ((self.batch, mixer.conv_channels, mixer.d_conv - 1),
                      (self.batch, mixer.state_heads, mixer.head_dim, mixer.d_state))  # fmt: skip
            for field, t, shape in (("conv", s.conv, shapes[0]), ("ssm", s.ssm, shapes[1])):
                if (not isinstance(t, torch.Tensor) or tuple(t.shape) != shape
                        or t.dtype != self.dtype or not t.is_cpu or not t.is_contiguous()
                        or t.requires_grad):  # fmt: skip
                    got = (f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor)
                           else type(t).__name__)  # fmt: skip
                    raise ValueError(
                        f"state[{i}].{field}: expected a contiguous CPU {self.dtype} tensor of "
                        f"shape {shape}, got {got}"
                    )
                tensors.append(t)
        convs, ssms = tensors[::2], tensors[1::2]
        self._seen = tuple(
            (s, c, q, c.data_ptr(), q.data_ptr())
            for s, c, q in zip(state, convs, ssms, strict=True)
        )
        self._state_array = (ctypes.c_void_p * len(tensors))(*(t.data_ptr() for t in tensors))

    def __call__(self, tokens_t: torch.Tensor, state: list) -> tuple[torch.Tensor, list]:
        """One token per sequence [batch] → (logits [batch, vocab], ``state`` updated in place).
        Errors as ``model.step``'s: tokens outside the vocabulary, a decay that is not finite,
        NaN or inf reaching a spike point; after one of these the state is spent."""
        if counting_active() or any(e[2].record for e in self._thresholds):
            return self.model.step(tokens_t, state)  # counts and rasters need the modules
        if not isinstance(tokens_t, torch.Tensor) or tokens_t.dtype not in (
            torch.int64, torch.int32
        ):  # fmt: skip
            got = tokens_t.dtype if isinstance(tokens_t, torch.Tensor) else type(tokens_t).__name__
            raise TypeError(f"tokens_t: expected integer token ids (int64/int32), got {got}")
        if tuple(tokens_t.shape) != (self.batch,):
            raise ValueError(f"tokens_t: expected token ids [{self.batch}] (this fused step's "
                             f"batch), got {tuple(tokens_t.shape)}")  # fmt: skip
        with self._lock:
            return self._locked_call(tokens_t, state)

    def _locked_call(self, tokens_t: torch.Tensor, state: list) -> tuple[torch.Tensor, list]:
        for t, ptr in self._checked:
            if t.data_ptr() != ptr:
                raise RuntimeError(
                    "a parameter's storage changed since this FusedStep was built (model.to(), "
                    ".double(), ...): build a new one"
                )
        # a threshold changed in place since the last call: Tensor._version is the counter
        # PyTorch bumps on every in-place change (the one autograd checks saved tensors by),
        # read here and never written; comparing values instead costs ~3 µs a point per token
        points = self._thresholds  # as lists: ~0.2 µs a spike point (a loop: twice that)
        versions, taus = [e[0]._version for e in points], [e[1].tau for e in points]
        if versions != self._versions or taus != self._taus:
            for k in range(len(points)):
                self._refresh_threshold(k)
        # the full check once per set of layer states; after it, that the same objects hold
        # the same tensors on the same storage (set_() or a growing resize_() moves it), still
        # in place (generate passes its list back every token)
        seen = self._seen
        if not (
            seen
            and type(state) is list
            and len(state) == len(seen)
            and all(
                s is o
                and s.conv is c
                and s.ssm is q
                and s.in_place is True
                and c.data_ptr() == cp
                and q.data_ptr() == qp
                for s, (o, c, q, cp, qp) in zip(state, seen, strict=True)
            )
        ):
            self._state_pointers(state)
        tokens = tokens_t.to(torch.int64).contiguous()
        logits = torch.empty(self.batch, self._logits_width, dtype=self.dtype)
        self._array[self._head].p[3] = logits.data_ptr()
        failed = self._run(self._array, len(self._ops), tokens.data_ptr(), self._state_array,
                           self._code_ref)  # fmt: skip
        if failed:
            self._raise(failed - 1, self._code.value, tokens)
        return logits, state

    def _refresh_threshold(self, k: int) -> None:
        """V = exp(a) and τ of spike point k again where its ``a`` changed in place or its τ
        changed, as the module's fused path computes them, into the V tensor and the operation
        the program reads."""
        a, neuron, point, vth, index = self._thresholds[k]
        if a._version == self._versions[k] and neuron.tau == self._taus[k]:
            return
        p = point._inference_parameters(neuron)
        v = p.v_threshold.detach().to(self.dtype)
        if v.shape != vth.shape:
            raise RuntimeError(f"{self._error_sites[index]}: its threshold's shape changed "
                               "since this FusedStep was built: build a new one")  # fmt: skip
        vth.copy_(v)
        op = self._array[index]
        op.f[0], op.f[1] = float(p.tau), _decay(p.tau)
        self._versions[k], self._taus[k] = a._version, p.tau

    def _raise(self, index: int, code: int, tokens: torch.Tensor) -> None:
        kind, path = self._ops[index][0], self._error_sites[index]
        if kind == _EMBED:
            raise ValueError(f"tokens_t: ids must lie in [0, {self.vocab_size}), got "
                             f"{tokens[code].item()} at position {code}")  # fmt: skip
        if kind == _MIXER:
            if code < 0:  # its scratch (mixer_step_cpu raises the same)
                raise MemoryError(f"{path}: the mixer step's scratch could not be allocated")
            raise ValueError(f"{path}: a_t (log decay) must be finite and <= 0, but {code} "
                             "values are not")  # fmt: skip
        if kind == _SPIKE:
            _, _, point, vth, _ = next(e for e in self._thresholds if e[4] == index)
            n = self._ops[index][3][0]
            try:
                cpu_backend._raise_if_bad(code, vth, n, point.T, "activation")
            except ThresholdError as err:
                raise point.neuron.diverged_threshold_error() from err
        raise RuntimeError(f"{path}: the fused step failed with code {code}")
