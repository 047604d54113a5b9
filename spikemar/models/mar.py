"""The MAR language model: a Mamba-2-style SSM LM whose projections are fed by ATMN spikes.

    tokens → embedding → N × [RMSNorm → mixer → residual; RMSNorm → FFN → residual] → RMSNorm → head

Each layer's mixer is a selective SSM (``'ssm'``), causal attention (``'attn'``) or a diagonal
LTI cell (``'lti'``), and each layer is spiking or dense: ``MARConfig.layers`` and
``MARConfig.spiking`` say which, because MAR refines modules layer by layer and hybrids must be
expressible. A spiking layer has MAR's four spike points (before the mixer's input and output
projections, before the FFN's up and down projections); with ``spikes=None`` the same code is the
dense SSM LM. ``ffn_sparsity`` offers plain activation sparsification of the FFN (top-k per token
or a magnitude threshold) as the alternative to spikes.

``model(tokens)`` → logits [batch, L, vocab]; ``model(tokens, return_hidden=True)`` also returns
the residual stream entering each layer (SBDS's pre-norm hidden states).
``state = model.init_state(batch)``; ``logits, state = model.step(tokens_t, state)`` runs one
token with O(1) state per SSM layer (a KV cache for attention layers).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module_hooks

from ..counting import counting_active
from ..ssm.mixer import LTICell, SelectiveMixer, norm_then
from .common import FeedForward, SpikeConfig, check_tokens, spike_point
from .generation import generate
from .transformer import CausalSelfAttention, TransformerConfig

__all__ = ["MARLM", "ActivationSparsifier", "MARConfig"]

MIXERS = ("ssm", "attn", "lti")


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
    layers: str | list[str] = "ssm"  # one kind for all layers, or one per layer
    spikes: SpikeConfig | None = field(default_factory=SpikeConfig)  # None: the dense twin
    spiking: bool | list[bool] = True  # which layers spike (when ``spikes`` is set)
    ffn_sparsity: tuple[str, float] | None = None  # ('topk', fraction kept) or ('threshold', t)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "d_state", "head_dim", "expand"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
        kinds = self.layer_kinds()
        bad = [k for k in kinds if k not in MIXERS]
        if bad:
            raise ValueError(f"layers: expected entries from {MIXERS}, got {bad}")
        self.spiking_layers()
        if self.ffn_sparsity is not None:
            ActivationSparsifier(*self.ffn_sparsity)  # validates

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
        return MARConfig(**{**vars(self), "spikes": None})


class ActivationSparsifier(nn.Module):
    """Zero all but the largest activations: ``('topk', fraction)`` keeps that fraction of each
    token's channels by magnitude, ``('threshold', t)`` keeps ``|x| > t``. The mask is applied in
    the backward pass too (gradients reach the kept activations only)."""

    def __init__(self, mode: str, amount: float) -> None:
        super().__init__()
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
        if self.mode == "threshold":
            return x * (x.abs() > self.amount)
        k = max(1, round(self.amount * x.shape[-1]))
        kth = x.abs().topk(k, dim=-1).values[..., -1:]
        return x * (x.abs() >= kth)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, amount={self.amount}"


class _SparseFeedForward(FeedForward):
    def __init__(self, d_model: int, hidden: int, sparsity: tuple[str, float]) -> None:
        super().__init__(d_model, hidden)
        self.spike_hidden = ActivationSparsifier(*sparsity)


class MARLayer(nn.Module):
    def __init__(self, config: MARConfig, kind: str, spiking: bool) -> None:
        super().__init__()
        c = config
        spikes = c.spikes if spiking else None
        self.kind = kind
        self.norm1 = nn.RMSNorm(c.d_model)
        if kind == "ssm":
            self.mixer = SelectiveMixer(
                c.d_model, d_state=c.d_state, head_dim=c.head_dim, expand=c.expand,
                d_conv=c.d_conv, chunk_size=c.chunk_size,
                spike_in=spike_point(c.d_model, spikes),
                spike_out=spike_point(c.expand * c.d_model, spikes),
            )  # fmt: skip
        elif kind == "attn":
            self.spike_attn = spike_point(c.d_model, spikes)
            self.mixer = CausalSelfAttention(
                TransformerConfig(c.vocab_size, c.d_model, 1, c.n_attn_heads, c.max_len)
            )
        else:
            self.spike_attn = spike_point(c.d_model, spikes)
            self.mixer = LTICell(c.d_model)
        self.norm2 = nn.RMSNorm(c.d_model)
        hidden = round(c.ffn_mult * c.d_model)
        if c.ffn_sparsity is not None and not spiking:
            self.ffn = _SparseFeedForward(c.d_model, hidden, c.ffn_sparsity)
        else:
            self.ffn = FeedForward(c.d_model, hidden, spikes)

    def _mix(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "ssm":
            return self.mixer(x)
        return self.mixer(self.spike_attn(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self._mix(self.norm1(x))
        return x + self.ffn(self.norm2(x))

    def init_state(self, batch: int, max_len: int):
        if self.kind == "attn":
            p = self.norm1.weight
            shape = (batch, self.mixer.n_heads, max_len, p.shape[0] // self.mixer.n_heads)
            return [p.new_zeros(shape), p.new_zeros(shape), 0]
        return self.mixer.init_state(batch)

    def step(self, x: torch.Tensor, state):
        """x [batch, d_model] → (x after the layer, new state)."""
        u = self.norm1(x)
        if self.kind == "attn":
            k, v, pos = state
            if pos >= k.shape[2]:
                raise ValueError(f"state: the attention KV cache is full ({k.shape[2]} tokens)")
            mixed = self.mixer.step(self.spike_attn(u)[:, None], k, v, pos)[:, 0]
            state = [k, v, pos + 1]
        elif self.kind == "lti":
            mixed, state = self.mixer.step(self.spike_attn(u), state)
        else:
            mixed, state = self.mixer.step(u, state)
        x = x + mixed
        return x + self.ffn(self.norm2(x)), state

    def _step_inference(self, x: torch.Tensor, state):
        """:meth:`step` without module-call overhead (see ``MARLM._inference_ready``)."""
        if self.kind != "ssm":
            return self.step(x, state)
        mixed, state = self.mixer._step_inference(x, state, self.norm1)
        x = x + mixed
        return x + self.ffn._forward_inference(x, self.norm2), state


class MARLM(nn.Module):
    """The MAR LM; ``MARLM(config.dense())`` is its dense SSM twin."""

    def __init__(self, config: MARConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(
            MARLayer(config, kind, spiking)
            for kind, spiking in zip(config.layer_kinds(), config.spiking_layers(), strict=True)
        )
        self.norm = nn.RMSNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.head.weight, std=0.02)

    def forward(self, tokens: torch.Tensor, return_hidden: bool = False):
        check_tokens(tokens, self.config.vocab_size, "tokens")
        if "attn" in self.config.layer_kinds() and tokens.shape[1] > self.config.max_len:
            raise ValueError(
                f"tokens: length {tokens.shape[1]} exceeds max_len {self.config.max_len}"
            )
        x = self.embed(tokens)
        hidden = []
        for layer in self.layers:
            hidden.append(x)
            x = layer(x)
        logits = self.head(self.norm(x))
        return (logits, hidden) if return_hidden else logits

    def init_state(self, batch: int) -> list:
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch: expected an int >= 1, got {batch!r}")
        return [layer.init_state(batch, self.config.max_len) for layer in self.layers]

    def step(self, tokens_t: torch.Tensor, state: list) -> tuple[torch.Tensor, list]:
        """One token per sequence [batch] → (logits [batch, vocab], new state)."""
        check_tokens(tokens_t, self.config.vocab_size, "tokens_t", rank=1)
        if not isinstance(state, list) or len(state) != len(self.layers):
            raise ValueError(f"state: expected the list of {len(self.layers)} layer states "
                             "from init_state()")  # fmt: skip
        if self._inference_ready():
            return self._step_inference(tokens_t, state)
        x = self.embed(tokens_t)
        new_state = []
        for layer, s in zip(self.layers, state, strict=True):
            x, s = layer.step(x, s)
            new_state.append(s)
        return self.head(self.norm(x)), new_state

    # -- the inference path of step ---------------------------------------------------------
    #
    # Generating one token at batch 1 is a few hundred tiny operations, so their entry costs
    # (module calls, validation, the composite RMSNorm, a neuron's autograd plumbing) are the
    # time. With autograd off, no energy counter active and no hooks on any module, step runs
    # through plain functions and three C kernels: each RMSNorm with the spike point after it
    # (the spikes exact given the norm, the norm equal to nn.RMSNorm to rounding), the other
    # spike points (exact), the SSM mixer between its projections (to rounding, its decays
    # checked in C). The tests compare it with the reference path (autograd on) and with
    # forward.

    def train(self, mode: bool = True) -> MARLM:
        self._hook_modules = None  # re-read the module tree (generate() calls eval())
        return super().train(mode)

    def _inference_ready(self) -> bool:
        """Autograd off, no energy counter, no forward hooks anywhere (the path enters modules
        through ``forward``, so a hook would not fire). The module list is cached (walking it
        costs more than a spike point): a module swapped in later is seen from the next
        ``train()``/``eval()``, which ``generate()`` calls; hooks on any listed module are
        checked on every call."""
        if torch.is_grad_enabled() or counting_active():
            return False
        if _module_hooks._global_forward_hooks or _module_hooks._global_forward_pre_hooks:
            return False
        modules = self.__dict__.get("_hook_modules")
        if modules is None:
            modules = self.__dict__["_hook_modules"] = tuple(self.modules())
        return not any(m._forward_hooks or m._forward_pre_hooks for m in modules)

    def _step_inference(self, tokens_t: torch.Tensor, state: list) -> tuple[torch.Tensor, list]:
        x = self.embed.forward(tokens_t)
        new_state = []
        for layer, s in zip(self.layers, state, strict=True):
            x, s = layer._step_inference(x, s)
            new_state.append(s)
        x = norm_then(x, self.norm, _IDENTITY)
        logits = F.linear(x, self.head.weight, self.head.bias)
        return logits, new_state

    def generate(self, prompt: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
        return generate(self, prompt, max_new_tokens, **kwargs)


_IDENTITY = nn.Identity()
