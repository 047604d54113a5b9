"""The mixer kinds a MAR layer can have, in one table: ``MARConfig.layers`` names them.

Each kind is a class behind :class:`spikemar.ssm.Mixer` (``forward``, ``init_state``, ``step``,
``spike_inputs``) and one registration here, a builder from the model's config and the layer's
spike configuration (None: dense). The layer only asks its mixer; it never branches on the kind.
Adding a kind::

    @register_mixer("my-kind")
    def _my_kind(c: MARConfig, spikes: SpikeConfig | None) -> Mixer:
        return MyMixer(c.d_model, spike_in=spike_point(c.d_model, spikes))

Kinds: ``'ssm'`` Mamba-2's selective mixer (:class:`~spikemar.ssm.SelectiveMixer`, also
transformers' ``Mamba2Mixer``), ``'discrete-mamba2'`` Llamba's
(:class:`~spikemar.ssm.DiscreteMixer`), ``'attn'`` causal softmax attention
(:class:`AttentionMixer`), ``'lti'`` the diagonal LTI cell (:class:`~spikemar.ssm.LTIMixer`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from ..ssm.mixer import (
    DiscreteMixer,
    LTIMixer,
    Mixer,
    SelectiveMixer,
    SpikeInputs,
    check_mixer_input,
)
from .common import SpikeConfig, spike_point
from .transformer import CausalSelfAttention, TransformerConfig

if TYPE_CHECKING:
    from .mar import MARConfig

__all__ = ["MIXERS", "AttentionMixer", "AttentionState", "register_mixer"]

MixerBuilder = Callable[["MARConfig", "SpikeConfig | None"], Mixer]
MIXERS: dict[str, MixerBuilder] = {}


def register_mixer(kind: str) -> Callable[[MixerBuilder], MixerBuilder]:
    """Register ``builder(config, spikes) -> Mixer`` under ``kind`` (a name for
    ``MARConfig.layers``)."""

    def register(builder: MixerBuilder) -> MixerBuilder:
        if kind in MIXERS:
            raise ValueError(f"kind: a mixer {kind!r} is already registered")
        MIXERS[kind] = builder
        return builder

    return register


@dataclass
class AttentionState:
    """An attention layer's KV cache [batch, heads, max_len, head_dim] with ``length`` tokens
    filled."""

    k: torch.Tensor
    v: torch.Tensor
    length: int = 0


class AttentionMixer(CausalSelfAttention, Mixer):
    """Causal self-attention as a layer's mixer, with the spike point before its ``qkv``
    projection (the output projection is fed by real-valued attention outputs)."""

    spike_inputs: ClassVar[SpikeInputs] = {"spike_in": ("qkv",)}
    host_reason = "softmax attention over the KV cache"

    def __init__(self, config: TransformerConfig, spike_in: nn.Module | None = None) -> None:
        super().__init__(config)
        self.spike_in = nn.Identity() if spike_in is None else spike_in

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        check_mixer_input(u, "u", 3, self.qkv.in_features)
        return CausalSelfAttention.forward(self, self.spike_in(u))

    def _check_state(self, state: AttentionState, batch: int) -> None:
        """``state`` is an :class:`AttentionState` of this mixer's KV cache for ``batch``."""
        if not isinstance(state, AttentionState):
            raise ValueError(f"state: expected the AttentionState from init_state(), got "
                             f"{type(state).__name__}")  # fmt: skip
        k = state.k
        head_dim = self.qkv.in_features // self.n_heads
        if not (isinstance(k, torch.Tensor) and k.dim() == 4 and k.shape[0] == batch
                and k.shape[1] == self.n_heads and k.shape[3] == head_dim
                and isinstance(state.v, torch.Tensor) and state.v.shape == k.shape):  # fmt: skip
            have = tuple(k.shape) if isinstance(k, torch.Tensor) else type(k).__name__
            raise ValueError(f"state.k: expected [{batch}, {self.n_heads}, max_len, {head_dim}] "
                             f"(this mixer's KV cache, batch {batch}) and state.v alike, got "
                             f"{have}")  # fmt: skip

    def init_state(
        self, batch: int, max_len: int | None = None, *, in_place: bool = False
    ) -> AttentionState:
        # in_place changes nothing: step always writes its token into the KV cache in place
        if max_len is None:
            raise ValueError("max_len: an attention layer's KV cache needs a length")
        w = self.qkv.weight
        head_dim = w.shape[1] // self.n_heads
        shape = (batch, self.n_heads, max_len, head_dim)
        return AttentionState(w.new_zeros(shape), w.new_zeros(shape), 0)

    def step(self, u_t: torch.Tensor, state: AttentionState) -> tuple[torch.Tensor, AttentionState]:
        check_mixer_input(u_t, "u_t", 2, self.qkv.in_features)
        self._check_state(state, u_t.shape[0])
        pos = state.length
        if pos >= state.k.shape[2]:
            raise ValueError(f"state: the attention KV cache is full ({state.k.shape[2]} tokens)")
        out = CausalSelfAttention.step(self, self.spike_in(u_t)[:, None], state.k, state.v, pos)
        return out[:, 0], AttentionState(state.k, state.v, pos + 1)

    def prefill(
        self, u: torch.Tensor, state: AttentionState
    ) -> tuple[torch.Tensor, AttentionState]:
        """L tokens in one pass: their keys and values into the KV cache, each attending over the
        cache and the tokens up to itself (see ``CausalSelfAttention.prefill``)."""
        check_mixer_input(u, "u", 3, self.qkv.in_features)
        self._check_state(state, u.shape[0])
        self.check_room(state, u.shape[1])
        pos, L = state.length, u.shape[1]
        out = CausalSelfAttention.prefill(self, self.spike_in(u), state.k, state.v, pos)
        return out, AttentionState(state.k, state.v, pos + L)

    def check_room(self, state: AttentionState, tokens: int, where: str = "its") -> None:
        if not isinstance(state, AttentionState):
            return  # another kind of state: prefill names it
        room = state.k.shape[2]
        if state.length + tokens > room:
            raise ValueError(f"tokens: {tokens} tokens after the {state.length} in {where} "
                             f"attention KV cache exceed its {room} (max_len)")  # fmt: skip


@register_mixer("ssm")
def _selective(c: MARConfig, spikes: SpikeConfig | None) -> Mixer:
    return SelectiveMixer(
        c.d_model, d_state=c.d_state, head_dim=c.head_dim, expand=c.expand, d_conv=c.d_conv,
        chunk_size=c.chunk_size, n_groups=c.n_groups, bias=c.bias, conv_bias=c.conv_bias,
        dt_limit=c.dt_limit, norm_eps=c.norm_eps,
        spike_in=spike_point(c.d_model, spikes),
        spike_out=spike_point(c.expand * c.d_model, spikes),
    )  # fmt: skip


@register_mixer("discrete-mamba2")
def _discrete(c: MARConfig, spikes: SpikeConfig | None) -> Mixer:
    d_inner = c.expand * c.d_model
    return DiscreteMixer(
        c.d_model, d_state=c.d_state, n_qk_heads=c.n_groups, n_v_heads=d_inner // c.head_dim,
        expand=c.expand, d_conv=c.d_conv, activation=c.conv_activation, bias=c.bias,
        conv_bias=c.conv_bias, chunk_size=c.chunk_size,
        spike_in=spike_point(c.d_model, spikes), spike_out=spike_point(d_inner, spikes),
    )  # fmt: skip


@register_mixer("attn")
def _attention(c: MARConfig, spikes: SpikeConfig | None) -> Mixer:
    config = TransformerConfig(c.vocab_size, c.d_model, 1, c.n_attn_heads, c.max_len)
    return AttentionMixer(config, spike_in=spike_point(c.d_model, spikes))


@register_mixer("lti")
def _lti(c: MARConfig, spikes: SpikeConfig | None) -> Mixer:
    return LTIMixer(c.d_model, spike_in=spike_point(c.d_model, spikes))
