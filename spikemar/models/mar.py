"""The MAR language model: a Mamba-2-style SSM LM whose projections are fed by ATMN spikes.

    tokens → embedding → N × [RMSNorm → mixer → residual; RMSNorm → FFN → residual] → RMSNorm → head

Each layer's mixer is one of the kinds registered in :data:`spikemar.models.mixers.MIXERS`
(``'ssm'`` Mamba-2's selective SSM, ``'discrete-mamba2'`` Llamba's, ``'attn'`` causal attention,
``'lti'`` a diagonal LTI cell), and each layer is spiking or dense: ``MARConfig.layers`` and
``MARConfig.spiking`` say which, because MAR refines modules layer by layer and hybrids must be
expressible. A spiking layer has MAR's four spike points (before the mixer's input and output
projections, before the FFN's up and down projections; a block without FFN, ``ffn=None`` as in
Hugging Face's Mamba-2, has its mixer's two); with ``spikes=None`` the same code is the dense
model. ``ffn_sparsity`` offers plain activation sparsification of the FFN (top-k per token or a
magnitude threshold) as the alternative to spikes. ``MARConfig.points`` sets spike points one by
one (dense, spiking with their own T/τ/threshold init, or sparsified), by name or pattern
(``'layers.*.ffn.spike_hidden'``): a module-aware schedule (:mod:`spikemar.refine` plans them).
Pretrained Mamba-2 and Llamba checkpoints map onto these configs
(:mod:`spikemar.models.pretrained`).

``model(tokens)`` → logits [batch, L, vocab]; ``model(tokens, return_hidden=True)`` also returns
the residual stream entering each layer (SBDS's pre-norm hidden states).
``state = model.init_state(batch)``; ``logits, state = model.step(tokens_t, state)`` runs one
token with O(1) state per SSM layer (a KV cache for attention layers).
``model.spike_points()`` yields every spike point with the projections it feeds.

**Speed.** ``step`` is one method at every level (model, layer, mixer); each chooses its fast
kernels per operation inside it, with autograd off: the RMSNorms (:class:`spikemar.ssm.RMSNorm`),
the spike points (:class:`~spikemar.models.SpikePoint`, unless an energy counter or ``record``
wants the spikes) and the selective mixer's middle each run in one C call, equal to the PyTorch
operations to rounding (the tests compare them). Submodules are always entered through
``__call__``, so forward hooks registered through PyTorch's public APIs fire on the fast path too.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from .._numbers import check_count, integer, item, plain, plain_data, real
from ..counting import counted_pass, counting_active, declare_sparse, record_ops
from ..ssm.linear import Linear
from ..ssm.mixer import SpikePointSite
from ..ssm.norm import RMSNorm
from .common import (
    FFNS,
    FeedForward,
    GradientCheckpointing,
    SpikeConfig,
    SpikePoint,
    check_tokens,
    head_logits,
    run_blocks,
)
from .generation import generate
from .mixers import MIXERS

__all__ = ["MARLM", "ActivationSparsifier", "MARConfig", "point_module"]


@dataclass
class MARConfig:
    vocab_size: int = 65
    d_model: int = 128
    n_layers: int = 4
    d_state: int = 16
    head_dim: int = 16
    expand: int = 2
    d_conv: int = 4
    chunk_size: int | None = None  # scan chunk; None: chosen from head_dim and d_state
    ffn_mult: float = 8 / 3
    n_attn_heads: int = 4
    max_len: int = 4096  # attention layers' KV cache; SSM layers have no length limit
    layers: str | list[str] = "ssm"  # one mixer kind (see mixers.MIXERS) for all, or one per layer
    spikes: SpikeConfig | None = field(default_factory=SpikeConfig)  # None: the dense twin
    spiking: bool | list[bool] = True  # which layers spike (when ``spikes`` is set)
    ffn_sparsity: tuple[str, float] | None = None  # ('topk', fraction kept) or ('threshold', t)
    # per spike point, overriding the above: {pattern: 'dense' | 'spike' | {T, tau, v_threshold,
    # ...} | {'sparsify': 'topk'|'threshold', 'amount': x}}; see point_module (needs ``spikes``)
    points: dict[str, str | dict] | None = None
    # -- for pretrained architectures (Hugging Face Mamba-2, Llamba); the defaults are MAR's
    norm_eps: float | None = None  # RMSNorm ε of every norm; None: the dtype's machine epsilon
    final_norm_eps: float | None = None  # the final norm's ε; None: norm_eps
    ffn: str | None = "swiglu"  # the block's FFN: 'swiglu', 'llama' (Llama's names) or None
    ffn_hidden: int | None = None  # the FFN's width; None: round(ffn_mult · d_model)
    ffn_bias: bool = False
    n_groups: int = 1  # groups of the SSM's B and C (Llamba: n_qk_heads)
    bias: bool = False  # biases of the SSM mixer's projections
    conv_bias: bool = True
    conv_activation: str = "identity"  # after the discrete mixer's convolution ('ssm': SiLU)
    dt_limit: tuple[float, float] = (0.0, math.inf)  # Δ clamp of the selective mixer
    tie_embeddings: bool = False  # the head reuses the embedding matrix
    head_bias: bool = False
    residual_in_fp32: bool = False  # keep the residual stream in float32 (HF Mamba-2's option)

    def __post_init__(self) -> None:
        # NumPy scalars (a sweep's np.arange, a value read from a file) are taken and stored as
        # Python numbers, so the config saves to JSON and loads with weights_only=True
        for name in ("vocab_size", "d_model", "n_layers", "d_state", "head_dim", "expand",
                     "n_groups"):  # fmt: skip
            setattr(self, name, check_count(name, getattr(self, name)))
        if not _int_at_least(self.d_conv, 1):
            raise ValueError(f"d_conv: expected an int >= 1 (convolution taps), got "
                             f"{self.d_conv!r}")  # fmt: skip
        self.d_conv = integer(self.d_conv)
        self.ffn_mult = plain(self.ffn_mult)
        if (
            self.ffn is not None
            and self.ffn_hidden is None
            and not (
                real(self.ffn_mult) is not None
                and math.isfinite(self.ffn_mult)
                and round(self.ffn_mult * self.d_model) >= 1
            )
        ):
            raise ValueError(
                f"ffn_mult: expected a number with round(ffn_mult * d_model) >= 1, got "
                f"{self.ffn_mult!r} (ffn=None builds blocks without an FFN)"
            )
        if self.chunk_size is not None and not _int_at_least(self.chunk_size, 1):
            raise ValueError(f"chunk_size: expected an int >= 1 or None (chosen from head_dim and "
                             f"d_state), got {self.chunk_size!r}")  # fmt: skip
        if self.ffn_hidden is not None and not _int_at_least(self.ffn_hidden, 0):
            raise ValueError(f"ffn_hidden: expected an int >= 0 or None (round(ffn_mult * "
                             f"d_model)), got {self.ffn_hidden!r}")  # fmt: skip
        self.chunk_size, self.ffn_hidden = plain(self.chunk_size), plain(self.ffn_hidden)
        if self.spikes is not None and not isinstance(self.spikes, SpikeConfig):
            raise ValueError(f"spikes: expected a SpikeConfig or None (the dense twin), got "
                             f"{self.spikes!r}")  # fmt: skip
        if (self.ffn is not None and self.ffn_hidden == 0 and self.spikes is not None
                and self.spikes.threshold == "channel"):  # fmt: skip
            raise ValueError(
                "ffn_hidden: 0 leaves the FFN's hidden spike point no channel for per-channel "
                "thresholds (spikes.threshold='channel'); give ffn=None for blocks without an "
                "FFN, ffn_hidden >= 1, or threshold='layer'"
            )
        kinds = self.layer_kinds()
        bad = [k for k in kinds if k not in MIXERS]
        if bad:
            raise ValueError(f"layers: expected entries from {tuple(MIXERS)}, got {bad}")
        self.spiking_layers()
        # stored as Python numbers with or without attention layers (a config without them
        # still saves both, to JSON too); checked only where attention uses them, as before
        self.n_attn_heads, self.max_len = plain(self.n_attn_heads), plain(self.max_len)
        if "attn" in kinds:  # the attention layers' heads and KV cache
            for name in ("n_attn_heads", "max_len"):
                if not _int_at_least(getattr(self, name), 1):
                    raise ValueError(f"{name}: expected an int >= 1 (attention layers), got "
                                     f"{getattr(self, name)!r}")  # fmt: skip
            if self.d_model % self.n_attn_heads:
                raise ValueError(f"n_attn_heads: {self.n_attn_heads} does not divide d_model = "
                                 f"{self.d_model}")  # fmt: skip
        if self.ffn_sparsity is not None:
            if not isinstance(self.ffn_sparsity, tuple | list) or len(self.ffn_sparsity) != 2:
                raise ValueError(f"ffn_sparsity: expected ('topk', f) or ('threshold', t), got "
                                 f"{self.ffn_sparsity!r}")  # fmt: skip
            ActivationSparsifier(*self.ffn_sparsity)  # validates
            self.ffn_sparsity = plain_data(self.ffn_sparsity)  # a named tuple kept as given
        if self.points is not None:
            keys = self.points if isinstance(self.points, dict) else [None]
            if not all(isinstance(k, str) for k in keys):
                raise ValueError(f"points: expected a dict {{pattern: setting}}, got "
                                 f"{self.points!r}")  # fmt: skip
            base = self.spikes if self.spikes is not None else SpikeConfig()
            for pattern, setting in self.points.items():
                point_module(1, setting, base, name=f"points[{pattern!r}]")  # validates
            self.points = plain_data(self.points)
        if self.ffn is not None and self.ffn not in FFNS:
            raise ValueError(f"ffn: expected one of {sorted(FFNS)} or None, got {self.ffn!r}")
        for name in ("norm_eps", "final_norm_eps"):
            eps = getattr(self, name)
            if eps is not None and not (real(eps) is not None and eps >= 0):
                raise ValueError(f"{name}: expected a float >= 0 or None, got {eps!r}")
            setattr(self, name, plain(eps))
        # a list after JSON, and any other sequence of two bounds (an ndarray, a tensor: their
        # elements as the numbers they hold); each bound a real number (float('abc')'s error
        # named no argument). Stored as a tuple of two Python floats, as always.
        limits: tuple = ()
        if not isinstance(self.dt_limit, str):
            try:
                limits = tuple(real(item(bound)) for bound in self.dt_limit)
            except TypeError:  # not iterable (a number, None, a 0-d array or tensor)
                pass
        if len(limits) != 2 or None in limits or not 0 <= limits[0] <= limits[1]:
            shown = limits if limits and None not in limits else self.dt_limit
            raise ValueError(f"dt_limit: expected (min, max) with 0 <= min <= max, got "
                             f"{shown}")  # fmt: skip
        self.dt_limit = limits

    def layer_kinds(self) -> list[str]:
        kinds = [self.layers] * self.n_layers if isinstance(self.layers, str) else list(self.layers)
        if len(kinds) != self.n_layers:
            raise ValueError(f"layers: expected {self.n_layers} entries, got {len(kinds)}")
        return kinds

    def spiking_layers(self) -> list[bool]:
        flags = [self.spiking] * self.n_layers if isinstance(self.spiking, bool) else self.spiking
        if len(flags) != self.n_layers:
            raise ValueError(f"spiking: expected {self.n_layers} entries, got {len(flags)}")
        return [bool(f) and self.spikes is not None for f in flags]

    def dense(self) -> MARConfig:
        """The same architecture without spikes (the dense twin / stage-2 teacher)."""
        return MARConfig(**{**vars(self), "spikes": None, "points": None})


def _int_at_least(value: object, low: int) -> bool:
    whole = integer(value)
    return whole is not None and whole >= low


class ActivationSparsifier(nn.Module):
    """Zero all but the largest activations: ``('topk', fraction)`` keeps that fraction of each
    token's channels by magnitude, ``('threshold', t)`` keeps ``|x| > t``. The mask is applied in
    the backward pass too (gradients reach the kept activations only)."""

    def __init__(self, mode: str, amount: float) -> None:
        super().__init__()
        if real(amount) is None:
            raise ValueError(f"ffn_sparsity: expected a number as the amount, got {amount!r}")
        if mode == "topk" and not 0 < amount <= 1:
            raise ValueError(f"ffn_sparsity: 'topk' keeps a fraction in (0, 1], got {amount!r}")
        if mode == "threshold" and not amount >= 0:
            raise ValueError(f"ffn_sparsity: 'threshold' needs t >= 0, got {amount!r}")
        if mode not in ("topk", "threshold"):
            raise ValueError(
                f"ffn_sparsity: expected ('topk', f) or ('threshold', t), got {mode!r}"
            )
        self.mode, self.amount = mode, float(amount)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # one comparison (and the mask's product) per element; the projection it feeds counts
        # full MACs and, beside them, those on the zeros, which zero-skipping profiles
        # (spikemar.energy.profiles, '…+zs') leave out: declare_sparse tells the counter
        record_ops(self, kind="sparsifier", elementwise_ops=2 * x.numel(),
                   activation_reads=x.numel(), activation_writes=x.numel())  # fmt: skip
        if self.mode == "threshold":
            return declare_sparse(self, x * (x.abs() > self.amount))
        k = max(1, round(self.amount * x.shape[-1]))
        kth = x.abs().topk(k, dim=-1).values[..., -1:]
        return declare_sparse(self, x * (x.abs() >= kth))

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, amount={self.amount}"


def point_module(
    channels: int, setting: str | dict, base: SpikeConfig, *, name: str = "setting"
) -> nn.Module:
    """The module of one spike point from its per-point ``setting`` (``MARConfig.points``):

    * ``'dense'``: the identity (the next projection multiplies real values);
    * ``'spike'``: a :class:`SpikePoint` with the model's ``spikes`` config ``base``;
    * ``{'T': 2, 'tau': 1.0, 'v_threshold': 0.3, ...}``: a spike point with these
      :class:`SpikeConfig` fields over ``base`` (its own T, τ, threshold init, neuron);
    * ``{'sparsify': 'topk' | 'threshold', 'amount': x}``: an :class:`ActivationSparsifier`.
    """
    if setting == "dense":
        return nn.Identity()
    if setting == "spike":
        return SpikePoint(channels, base)
    if not isinstance(setting, dict):
        raise ValueError(f"{name}: expected 'dense', 'spike' or a dict, got {setting!r}")
    if "sparsify" in setting:
        if set(setting) != {"sparsify", "amount"}:
            raise ValueError(f"{name}: a sparsified point takes exactly 'sparsify' and 'amount', "
                             f"got {sorted(setting)}")  # fmt: skip
        try:
            return ActivationSparsifier(setting["sparsify"], setting["amount"])
        except ValueError as err:  # its message names ffn_sparsity, the layer-wide option
            raise ValueError(f"{name}: {str(err).partition(': ')[2]}") from None
    fields = set(base.as_dict())
    unknown = sorted(set(setting) - fields)
    if unknown:
        raise ValueError(f"{name}: unknown spike fields {unknown}; expected some of "
                         f"{sorted(fields)} or 'sparsify'/'amount'")  # fmt: skip
    try:
        config = SpikeConfig(**{**base.as_dict(), **setting})
    except (ValueError, TypeError) as err:  # SpikeConfig names its field: say which point's
        raise type(err)(f"{name}: {err}") from None
    return SpikePoint(channels, config)


def _apply_points(model: MARLM) -> None:
    """Replace each spike point that a pattern of ``model.config.points`` matches (later patterns
    win) by the module of its setting."""
    config = model.config
    sites = list(model.spike_points(include_dense=True))
    names = [site.name for site in sites]
    unmatched = [p for p in config.points if not fnmatch.filter(names, p)]
    if unmatched:
        raise ValueError(f"points: patterns {unmatched} match no spike point; the model's are "
                         f"{names[:4]}{' ...' if len(names) > 4 else ''}")  # fmt: skip
    for site in sites:
        setting = None
        for pattern, value in config.points.items():
            if fnmatch.fnmatchcase(site.name, pattern):
                setting = value
        if setting is None:
            continue
        if site.projections:  # the width the point feeds (an Identity has no channel count)
            channels = next(iter(site.projections.values())).in_features
        else:
            channels = config.d_model  # a point that feeds no projection sits on the stream
        parent, _, attr = site.name.rpartition(".")
        setattr(model.get_submodule(parent), attr, point_module(channels, setting, config.spikes))


class _SparseFeedForward(FeedForward):
    def __init__(self, d_model: int, hidden: int, sparsity: tuple[str, float], bias: bool) -> None:
        super().__init__(d_model, hidden, bias=bias)
        self.spike_hidden = ActivationSparsifier(*sparsity)


class MARLayer(nn.Module):
    """``x + mixer(norm1(x))``, then ``+ ffn(norm2(x))`` when the config has an FFN."""

    def __init__(self, config: MARConfig, kind: str, spiking: bool) -> None:
        super().__init__()
        c = config
        spikes = c.spikes if spiking else None
        self.kind = kind
        self.residual_in_fp32 = c.residual_in_fp32
        self.norm1 = RMSNorm(c.d_model, eps=c.norm_eps)
        self.mixer = MIXERS[kind](c, spikes)
        self.norm2 = self.ffn = None
        if c.ffn is not None:
            self.norm2 = RMSNorm(c.d_model, eps=c.norm_eps)
            hidden = c.ffn_hidden if c.ffn_hidden is not None else round(c.ffn_mult * c.d_model)
            if c.ffn_sparsity is not None and not spiking:
                self.ffn = _SparseFeedForward(c.d_model, hidden, c.ffn_sparsity, c.ffn_bias)
            else:
                self.ffn = FFNS[c.ffn](c.d_model, hidden, spikes, c.ffn_bias)
        self.register_load_state_dict_pre_hook(_rename_old_spike_point)

    def _residual(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() if self.residual_in_fp32 else x

    def _normed(self, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``norm(x)`` of the stream ``x`` in the norm's dtype: a float32 stream
        (``residual_in_fp32``) of a bfloat16/float16 model is cast first, as transformers'
        Mamba2Block does (``norm(hidden_states.to(norm.weight.dtype))``)."""
        w = norm.weight
        return norm(x if w is None or x.dtype == w.dtype else x.to(w.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._add_branches(x, self.mixer(self._normed(self.norm1, x)))

    def init_state(self, batch: int, max_len: int, in_place: bool = False):
        return self.mixer.init_state(batch, max_len, in_place=in_place)

    def step(self, x: torch.Tensor, state):
        """x [batch, d_model] → (x after the layer, new state)."""
        mixed, state = self.mixer.step(self._normed(self.norm1, x), state)
        return self._add_branches(x, mixed), state

    def prefill(self, x: torch.Tensor, state):
        """x [batch, L, d_model] continuing ``state`` → (x after the layer, the state after the
        last token)."""
        mixed, state = self.mixer.prefill(self._normed(self.norm1, x), state)
        return self._add_branches(x, mixed), state

    def _add_branches(self, x: torch.Tensor, mixed: torch.Tensor) -> torch.Tensor:
        """The stream ``x`` plus the mixer's output ``mixed``, then plus the FFN's branch."""
        x = self._residual(x) + mixed
        x = x if self.ffn is None else x + self.ffn(self._normed(self.norm2, x))
        if counting_active():  # the residual adds are functional: no rule sees them
            self._record_residual(x)
        return x

    def _record_residual(self, x: torch.Tensor) -> None:
        """One add per element of the stream ``x`` per residual branch (mixer, FFN), each
        reading its two operands and writing the sum."""
        adds = x.numel() * (1 if self.ffn is None else 2)
        record_ops(self, kind="residual", elementwise_ops=adds, activation_reads=2 * adds,
                   activation_writes=adds)  # fmt: skip

    def spike_points(self, prefix: str = "") -> Iterator[SpikePointSite]:
        dot = f"{prefix}." if prefix else ""
        yield from self.mixer.spike_points(f"{dot}mixer")
        if self.ffn is not None and not isinstance(self.ffn, _SparseFeedForward):
            yield from self.ffn.spike_points(f"{dot}ffn")


def _check_layer_states(state: list, batch: int, name: str) -> None:
    """Shapes only (no value scan: this runs once per generated token): each layer's state is
    the dataclass its mixer's init_state made, for the batch of the token ids ``name``."""
    for i, s in enumerate(state):
        names = _STATE_FIELDS.get(type(s))
        if names is None:  # a class seen for the first time (dataclasses.fields costs µs)
            if not dataclasses.is_dataclass(s) or isinstance(s, type):
                raise ValueError(f"state[{i}]: expected the layer state from init_state(), "
                                 f"got {type(s).__name__}")  # fmt: skip
            names = _STATE_FIELDS[type(s)] = tuple(f.name for f in dataclasses.fields(s))
        for attr in names:
            t = getattr(s, attr)
            if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] != batch:
                raise ValueError(
                    f"state[{i}].{attr}: made for batch {t.shape[0]}, but {name} has "
                    f"batch {batch} (call init_state({batch}))"
                )


_STATE_FIELDS: dict[type, tuple[str, ...]] = {}  # a state dataclass → its field names


def _rename_old_spike_point(module, state_dict, prefix, *args) -> None:
    """Checkpoints written before the mixer interface kept the spike point of attention and LTI
    layers on the layer ('spike_attn'); it now lives on the mixer ('mixer.spike_in')."""
    old = f"{prefix}spike_attn."
    for key in [k for k in state_dict if k.startswith(old)]:
        state_dict[f"{prefix}mixer.spike_in.{key[len(old) :]}"] = state_dict.pop(key)


class MARLM(GradientCheckpointing, nn.Module):
    """The MAR LM; ``MARLM(config.dense())`` is its dense twin."""

    def __init__(self, config: MARConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(
            MARLayer(config, kind, spiking)
            for kind, spiking in zip(config.layer_kinds(), config.spiking_layers(), strict=True)
        )
        final_eps = config.norm_eps if config.final_norm_eps is None else config.final_norm_eps
        self.norm = RMSNorm(config.d_model, eps=final_eps)
        self.head = Linear(config.d_model, config.vocab_size, bias=config.head_bias)
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.head.weight, std=0.02)
        if config.tie_embeddings:
            self.head.weight = self.embed.weight
        if config.points and config.spikes is not None:  # spikes=None: the dense twin, always
            _apply_points(self)
        # the tokenizer the weights were trained with, where the model was loaded with one
        # (from_pretrained, load_checkpoint): generate then takes and returns text
        self.tokenizer = None

    def forward(self, tokens: torch.Tensor, return_hidden: bool = False):
        check_tokens(tokens, self.config.vocab_size, "tokens")
        if "attn" in self.config.layer_kinds() and tokens.shape[1] > self.config.max_len:
            raise ValueError(
                f"tokens: length {tokens.shape[1]} exceeds max_len {self.config.max_len}"
            )
        return run_blocks(self.embed(tokens), self.layers, self.norm, self.head, return_hidden,
                          self.gradient_checkpointing)  # fmt: skip

    def init_state(self, batch: int, *, in_place: bool = False) -> list:
        """The layers' states before the first token of ``batch`` sequences. ``in_place``:
        ``step`` may update the SSM layers' states in place instead of making new ones per token
        (generation's own state; a state stepped from is then spent, see
        :class:`spikemar.ssm.MixerState`)."""
        if not _int_at_least(batch, 1):
            raise ValueError(f"batch: expected an int >= 1, got {batch!r}")
        max_len = self.config.max_len
        return [layer.init_state(int(batch), max_len, in_place) for layer in self.layers]

    def step(self, tokens_t: torch.Tensor, state: list) -> tuple[torch.Tensor, list]:
        """One token per sequence [batch] → (logits [batch, vocab], new state)."""
        check_tokens(tokens_t, self.config.vocab_size, "tokens_t", rank=1)
        self._check_state(state, tokens_t.shape[0], "tokens_t")
        return self._step(tokens_t, state)

    def _check_state(self, state: list, batch: int, name: str) -> None:
        if not isinstance(state, list) or len(state) != len(self.layers):
            raise ValueError(f"state: expected the list of {len(self.layers)} layer states "
                             "from init_state()")  # fmt: skip
        _check_layer_states(state, batch, name)

    @counted_pass  # a pass of the model for a counter (not through __call__)
    def _step(self, tokens_t: torch.Tensor, state: list) -> tuple[torch.Tensor, list]:
        x = self.embed(tokens_t)
        new_state = []
        for layer, s in zip(self.layers, state, strict=True):
            x, s = layer.step(x, s)
            new_state.append(s)
        return head_logits(self.head, self.norm, x), new_state

    def prefill(
        self, tokens: torch.Tensor, state: list | None = None, *, all_logits: bool = False
    ) -> tuple[torch.Tensor, list]:
        """Feed a run of tokens [batch, L] (a prompt) → (logits of the last token [batch, vocab],
        the state after it), as L calls of ``step`` would, but in one parallel pass where the
        mixers allow it: the SSM layers run their chunked scan from ``state`` (one read of the
        weights for all L tokens instead of L); attention layers write the L keys and values
        into their KV cache and attend causally over it. ``state``: from ``init_state`` or an
        earlier ``step``/``prefill`` (None: a fresh one; an ``in_place`` SSM state is written
        over; a KV cache always is, as ``step`` writes it). A run that would overflow a KV
        cache is refused before any layer runs. Equal to ``step``'s logits to rounding (the
        parallel pass sums in another order; a spike point whose input lies within that
        rounding of a threshold can fire differently). Differentiable. ``all_logits``: the
        logits of every token of the run [batch, L, vocab] (a long text scored chunk by chunk
        with its state carried, as ``forward`` would score it in one pass)."""
        check_tokens(tokens, self.config.vocab_size, "tokens")
        if not isinstance(all_logits, bool):
            raise ValueError(f"all_logits: expected True or False, got {all_logits!r}")
        if state is None:
            state = self.init_state(tokens.shape[0])
        self._check_state(state, tokens.shape[0], "tokens")
        for i, (layer, s) in enumerate(zip(self.layers, state, strict=True)):
            # before any layer writes its state: all or nothing
            layer.mixer.check_room(s, tokens.shape[1], f"layer {i}'s")
        return self._prefill(tokens, state, all_logits)

    @counted_pass
    def _prefill(
        self, tokens: torch.Tensor, state: list, all_logits: bool = False
    ) -> tuple[torch.Tensor, list]:
        x = self.embed(tokens)
        new_state = []
        for i, (layer, s) in enumerate(zip(self.layers, state, strict=True)):
            try:
                x, s = layer.prefill(x, s)
            except ValueError as err:  # a mixer's "state…" names its layer here: state[i]…
                if not str(err).startswith("state"):
                    raise
                raise ValueError(f"state[{i}]{str(err).removeprefix('state')}") from err
            new_state.append(s)
        return head_logits(self.head, self.norm, x if all_logits else x[:, -1]), new_state

    def spike_points(self, include_dense: bool = False) -> Iterator[SpikePointSite]:
        """Every spike point of the model in layer order, each with the projections it feeds
        (paths as in ``named_modules()``). ``include_dense``: also the places of spike points
        in dense layers (their module is ``nn.Identity``) and sparsified ones."""
        for i, layer in enumerate(self.layers):
            for site in layer.spike_points(f"layers.{i}"):
                if include_dense or isinstance(site.module, SpikePoint):
                    yield site

    def generate(
        self, prompt: torch.Tensor | None = None, max_new_tokens: int | None = None, **kwargs
    ) -> torch.Tensor:
        """:func:`spikemar.models.generate` on this model (``input_ids=``, ``do_sample=`` and
        ``attention_mask=`` as transformers' ``generate`` takes them)."""
        return generate(self, prompt, max_new_tokens, **kwargs)
