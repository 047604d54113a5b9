"""A small causal Transformer language model: the stage-1 teacher.

nanoGPT's shape with Llama's parts: token embedding → N × [RMSNorm → causal self-attention →
residual; RMSNorm → SwiGLU FFN → residual] → RMSNorm → head, learned absolute positions. Two
forms compute the same function: ``forward`` over a whole sequence, and ``step`` over one token
with a key/value cache preallocated to ``max_len`` (``init_state``), which is what generation
uses. ``forward(tokens, return_hidden=True)`` also returns the residual stream entering each
layer (the pre-norm hidden states that SBDS aligns).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .._numbers import check_count, plain, real
from ..counting import counted_pass, counting_active, record_ops
from .common import FeedForward, GradientCheckpointing, check_tokens, run_blocks
from .generation import generate

__all__ = ["KVCache", "TransformerConfig", "TransformerLM"]


@dataclass
class TransformerConfig:
    vocab_size: int = 65
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    max_len: int = 256
    ffn_mult: float = 8 / 3  # SwiGLU hidden width = ffn_mult · d_model (Llama's 2/3 of 4×)
    dropout: float = 0.0

    def __post_init__(self) -> None:
        # NumPy's numbers are stored as Python's, so the config saves as JSON and loads with
        # torch.load(weights_only=True)
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_len"):
            setattr(self, name, check_count(name, getattr(self, name)))
        mult = real(self.ffn_mult)
        if mult is None or not math.isfinite(mult) or round(mult * self.d_model) < 1:
            raise ValueError(f"ffn_mult: expected a number with round(ffn_mult * d_model) >= 1, "
                             f"got {self.ffn_mult!r}")  # fmt: skip
        # nn.Dropout's range: 1 zeroes every activation in training, yet builds (and loads)
        if real(self.dropout) is None or not 0 <= self.dropout <= 1:
            raise ValueError(f"dropout: expected a number in [0, 1], got {self.dropout!r}")
        # ffn_mult=3 stays 3 in a saved config, as in MARConfig
        self.ffn_mult, self.dropout = plain(self.ffn_mult), plain(self.dropout)
        if self.d_model % self.n_heads:
            raise ValueError(f"n_heads: {self.n_heads} does not divide d_model = {self.d_model}")


@dataclass
class KVCache:
    """Keys and values of every layer [n_layers, batch, heads, max_len, head_dim]; ``length``
    tokens are filled."""

    k: torch.Tensor
    v: torch.Tensor
    length: int = 0


class CausalSelfAttention(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.out = nn.Linear(config.d_model, config.d_model, bias=False)
        self.dropout = config.dropout

    def _heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, L, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=-1)
        shape = (B, L, self.n_heads, D // self.n_heads)
        return tuple(t.view(shape).transpose(1, 2) for t in (q, k, v))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = self._heads(x)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        # scores q·k and the weighted sum of values over the causal triangle; softmax element-wise
        pairs = B * self.n_heads * L * (L + 1) // 2
        # memory: each query reads the keys and values before it (the KV cache), k and v are
        # written to it, q read, the mixed values written
        record_ops(self, kind="attention", macs=2 * pairs * (D // self.n_heads),
                   elementwise_ops=3 * pairs, state_reads=2 * pairs * (D // self.n_heads),
                   state_writes=2 * B * L * D, activation_reads=B * L * D,
                   activation_writes=B * L * D)  # fmt: skip
        return self.out(y.transpose(1, 2).reshape(B, L, D))

    def step(self, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: int):
        """One token x [B, 1, D] at position ``pos``; writes its key/value into the caches."""
        B, _, D = x.shape
        q, k, v = self._heads(x)
        k_cache[:, :, pos : pos + 1] = k
        v_cache[:, :, pos : pos + 1] = v
        y = F.scaled_dot_product_attention(q, k_cache[:, :, : pos + 1], v_cache[:, :, : pos + 1])
        pairs = B * self.n_heads * (pos + 1)
        record_ops(self, kind="attention", macs=2 * pairs * (D // self.n_heads),
                   elementwise_ops=3 * pairs, state_reads=2 * pairs * (D // self.n_heads),
                   state_writes=2 * B * D, activation_reads=B * D,
                   activation_writes=B * D)  # fmt: skip
        return self.out(y.transpose(1, 2).reshape(B, 1, D))

    def prefill(self, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: int):
        """Tokens x [B, L, D] at positions ``pos`` … ``pos + L − 1`` in one pass: their keys and
        values written into the caches (as ``step`` writes one), each query attending over the
        cache before it and the tokens up to itself. Differentiable (the cached part enters as
        a copy, so later writes into the cache leave the graph intact)."""
        B, L, D = x.shape
        q, k, v = self._heads(x)
        keys = k if pos == 0 else torch.cat([k_cache[:, :, :pos], k], dim=2)
        values = v if pos == 0 else torch.cat([v_cache[:, :, :pos], v], dim=2)
        k_cache[:, :, pos : pos + L] = k
        v_cache[:, :, pos : pos + L] = v
        if pos == 0:
            y = F.scaled_dot_product_attention(q, keys, values, is_causal=True)
        else:  # query i sees the pos cached tokens and the new ones up to itself
            mask = torch.ones(L, pos + L, dtype=torch.bool, device=x.device).tril(diagonal=pos)
            y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        pairs = B * self.n_heads * (L * pos + L * (L + 1) // 2)
        record_ops(self, kind="attention", macs=2 * pairs * (D // self.n_heads),
                   elementwise_ops=3 * pairs, state_reads=2 * pairs * (D // self.n_heads),
                   state_writes=2 * B * L * D, activation_reads=B * L * D,
                   activation_writes=B * L * D)  # fmt: skip
        return self.out(y.transpose(1, 2).reshape(B, L, D))


class Block(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.norm1 = nn.RMSNorm(config.d_model)
        self.attn = CausalSelfAttention(config)
        self.norm2 = nn.RMSNorm(config.d_model)
        self.ffn = FeedForward(config.d_model, round(config.ffn_mult * config.d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        x = x + self.ffn(self.norm2(x))
        if counting_active():  # the two residual adds are functional: no rule sees them
            n = 2 * x.numel()
            record_ops(self, kind="residual", elementwise_ops=n, activation_reads=2 * n,
                       activation_writes=n)  # fmt: skip
        return x


class TransformerLM(GradientCheckpointing, nn.Module):
    """Causal Transformer LM; ``model(tokens)`` → logits [batch, L, vocab]."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.pos = nn.Embedding(config.max_len, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = nn.RMSNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.apply(_init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of residual projections
            if name.endswith(("attn.out.weight", "ffn.down.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * config.n_layers))
        self.tokenizer = None  # set by load_checkpoint: generate then takes and returns text

    def forward(self, tokens: torch.Tensor, return_hidden: bool = False):
        check_tokens(tokens, self.config.vocab_size, "tokens", max_len=self.config.max_len)
        L = tokens.shape[1]
        x = self.embed(tokens) + self.pos(torch.arange(L, device=tokens.device))
        if counting_active():  # the position embedding's add
            record_ops(self, kind="position", elementwise_ops=x.numel(),
                       activation_reads=2 * x.numel(), activation_writes=x.numel())  # fmt: skip
        return run_blocks(x, self.blocks, self.norm, self.head, return_hidden,
                          self.gradient_checkpointing)  # fmt: skip

    def init_state(self, batch: int, *, in_place: bool = False) -> KVCache:
        """An empty KV cache for ``batch`` sequences; ``step`` writes each token into it in
        place whatever ``in_place`` says (generate's common interface)."""
        c = self.config
        p = next(self.parameters())
        shape = (c.n_layers, batch, c.n_heads, c.max_len, c.d_model // c.n_heads)
        return KVCache(p.new_zeros(shape), p.new_zeros(shape), 0)

    def step(self, tokens_t: torch.Tensor, state: KVCache) -> tuple[torch.Tensor, KVCache]:
        """One token per sequence [batch] → logits [batch, vocab]; the cache grows by one."""
        check_tokens(tokens_t, self.config.vocab_size, "tokens_t", rank=1)
        self._check_state(state, tokens_t.shape[0], "tokens_t")
        return self._step(tokens_t, state)

    def _check_state(self, state: KVCache, batch: int, name: str) -> None:
        if not isinstance(state, KVCache):
            raise ValueError(f"state: expected the KVCache from init_state(), got "
                             f"{type(state).__name__}")  # fmt: skip
        if state.k.shape[1] != batch:
            raise ValueError(f"state: made for batch {state.k.shape[1]}, but {name} has batch "
                             f"{batch} (call init_state({batch}))")  # fmt: skip

    @counted_pass
    def _step(self, tokens_t: torch.Tensor, state: KVCache) -> tuple[torch.Tensor, KVCache]:
        pos = state.length
        if pos >= self.config.max_len:
            raise ValueError(
                f"state: the KV cache is full ({self.config.max_len} tokens, the model's max_len)"
            )
        x = self.embed(tokens_t)[:, None] + self.pos.weight[pos]
        for i, block in enumerate(self.blocks):
            x = x + block.attn.step(block.norm1(x), state.k[i], state.v[i], pos)
            x = x + block.ffn(block.norm2(x))
        logits = self.head(self.norm(x))[:, 0]
        return logits, KVCache(state.k, state.v, pos + 1)

    def prefill(
        self, tokens: torch.Tensor, state: KVCache | None = None
    ) -> tuple[torch.Tensor, KVCache]:
        """Feed a run of tokens [batch, L] → (logits of the last [batch, vocab], the cache after
        it), as L calls of ``step`` would, in one pass: each layer writes the L keys and values
        into the cache and attends causally over it."""
        check_tokens(tokens, self.config.vocab_size, "tokens")
        state = self.init_state(tokens.shape[0]) if state is None else state
        self._check_state(state, tokens.shape[0], "tokens")
        pos, L = state.length, tokens.shape[1]
        if pos + L > self.config.max_len:
            raise ValueError(f"tokens: {L} tokens after the {pos} in the KV cache exceed the "
                             f"model's max_len {self.config.max_len}")  # fmt: skip
        return self._prefill(tokens, state)

    @counted_pass
    def _prefill(self, tokens: torch.Tensor, state: KVCache) -> tuple[torch.Tensor, KVCache]:
        pos, L = state.length, tokens.shape[1]
        x = self.embed(tokens) + self.pos.weight[pos : pos + L]
        for i, block in enumerate(self.blocks):
            x = x + block.attn.prefill(block.norm1(x), state.k[i], state.v[i], pos)
            x = x + block.ffn(block.norm2(x))
        return self.head(self.norm(x[:, -1])), KVCache(state.k, state.v, pos + L)

    def generate(
        self, prompt: torch.Tensor | None = None, max_new_tokens: int | None = None, **kwargs
    ) -> torch.Tensor:
        """:func:`spikemar.models.generate` on this model (``input_ids=``, ``do_sample=`` and
        ``attention_mask=`` as transformers' ``generate`` takes them)."""
        return generate(self, prompt, max_new_tokens, **kwargs)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
