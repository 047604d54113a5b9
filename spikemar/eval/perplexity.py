"""Perplexity of a text file: nats per token, bits per byte, and the loss at each position.

    result = text_perplexity(model, tokenizer, text)               # one stream: one pass
    result = text_perplexity(model, tokenizer, text, window=64)    # windows of 64 tokens

The text is scored after a start token (the tokenizer's beginning-of-text token where it puts
one before a text, as Llama-3's; else its end-of-text token, or ``"\\n"`` for the character
tokenizer: :func:`start_token`), either as **one stream** (every token conditioned on all of the
text before it: an SSM LM does this in one forward pass, with O(1) state per layer and no
context limit) or in consecutive **windows** of ``window`` tokens, each starting afresh, as the
model saw text in training. Comparing the two, and the **per-position loss curve**, answers
whether a model uses context past its training length: if the stream's loss keeps falling at
positions beyond the training windows, it does.

    nats/token  = −Σ log p(token) / tokens
    bits/byte   = −Σ log p(token) / (UTF-8 bytes · ln 2)      (comparable across tokenizers)

The curve: for windows, the mean loss at each position 0 … window−1 over all windows; for one
stream, the mean loss over positions in doubling bins [1, 2), [2, 4), [4, 8), … (one stream has
one token per position, so bins are what make it readable).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._numbers import integer, plain
from .scoring import Scorer, nats_to_bits_per_byte

__all__ = [
    "PerplexityResult",
    "check_unk",
    "end_token",
    "replace_unknown",
    "save_curves",
    "start_token",
    "text_perplexity",
    "text_prefix",
]


def check_unk(tokenizer: Any, unk: str | None) -> str | None:
    """``unk`` checked as a stand-in for characters outside a character tokenizer's alphabet:
    one character of that alphabet (None: no stand-in)."""
    if unk is None:
        return None
    chars = getattr(tokenizer, "chars", None)
    if chars is None:
        raise ValueError("unk: only a character tokenizer has an alphabet to stand in for")
    if not isinstance(unk, str) or len(unk) != 1 or unk not in chars:
        raise ValueError(f"unk: expected one character of the tokenizer's alphabet, got {unk!r}")
    return unk


def replace_unknown(tokenizer: Any, text: str, unk: str | None) -> tuple[str, set[str]]:
    """``(text with unk for every character outside the tokenizer's alphabet, the characters
    replaced)``; unchanged without ``unk`` or an alphabet (a tokenizer with no ``chars``)."""
    chars = getattr(tokenizer, "chars", None)
    if unk is None or chars is None:
        return text, set()
    known = set(chars)
    missing = {c for c in text if c not in known}
    if not missing:
        return text, missing
    return "".join(c if c in known else unk for c in text), missing


def text_prefix(tokenizer: Any) -> list[int]:
    """The ids a Hugging Face tokenizer's own post-processor puts before every text when asked
    for special tokens: Llama-3's (Llamba's) ``<|begin_of_text|>``, which the model saw at the
    start of every document in training and which lm_eval's ``hf`` model puts before every
    context. ``[]`` for tokenizers without one (GPT-NeoX's, Mamba-2's: its end-of-text token
    starts a text instead; the character tokenizer)."""
    return list(getattr(tokenizer, "prefix_ids", ()))  # HFTokenizer.prefix_ids


def end_token(tokenizer: Any) -> int:
    """The end-of-text id: the tokenizer's ``eos_id`` (or Hugging Face's ``eos_token_id``/
    ``bos_token_id``), else the single token of ``"\\n"`` (the character tokenizer, which has
    none)."""
    for name in ("eos_id", "eos_token_id", "bos_token_id"):
        value = integer(getattr(tokenizer, name, None))  # NumPy's ids too, as Python ints
        if value is not None:
            return value
    ids = list(tokenizer.encode("\n"))
    if len(ids) != 1:
        raise ValueError(
            "tokenizer: has no end-of-text token and no single token for '\\n' to start text with"
        )
    return ids[0]


def start_token(tokenizer: Any) -> int:
    """The id that stands for "start of text", as lm_eval's ``hf`` model chooses its prefix
    token: the beginning-of-text token the tokenizer puts before a text (:func:`text_prefix`:
    Llama-3's ``<|begin_of_text|>``), else the end-of-text token (:func:`end_token`: GPT-NeoX's
    ``<|endoftext|>``, ``"\\n"`` for the character tokenizer)."""
    prefix = text_prefix(tokenizer)
    return prefix[-1] if prefix else end_token(tokenizer)


@dataclass(frozen=True)
class PerplexityResult:
    """What :func:`text_perplexity` measured (every loss in nats)."""

    mode: str  # 'stream' or 'window'
    window: int | None
    tokens: int
    chars: int
    bytes: int
    nats_per_token: float
    bits_per_byte: float
    curve_start: list[int] = field(repr=False)  # first position of each curve point
    curve_end: list[int] = field(repr=False)  # one past the last position
    curve_nats: list[float] = field(repr=False)  # mean loss over those positions
    curve_count: list[int] = field(repr=False)  # tokens averaged

    @property
    def perplexity(self) -> float:
        return math.exp(self.nats_per_token)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "perplexity": self.perplexity}

    def summary(self) -> str:
        how = "one stream" if self.mode == "stream" else f"windows of {self.window}"
        return (
            f"{self.nats_per_token:.4f} nats/token, {self.bits_per_byte:.4f} bits/byte, "
            f"perplexity {self.perplexity:.3f} over {self.tokens} tokens ({how})"
        )


def _stream_curve(losses: torch.Tensor) -> tuple[list[int], list[int], list[float], list[int]]:
    starts, ends, means, counts = [], [], [], []
    lo = 0
    while lo < len(losses):
        hi = min(len(losses), max(1, 2 * lo))
        starts.append(lo)
        ends.append(hi)
        means.append(float(losses[lo:hi].mean()))
        counts.append(hi - lo)
        lo = hi
    return starts, ends, means, counts


def text_perplexity(
    model: nn.Module,
    tokenizer: Any,
    text: str,
    *,
    window: int | None = None,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    scorer: Scorer | None = None,
    unk: str | None = None,
) -> PerplexityResult:
    """Score ``text`` with ``model`` (see the module docstring for the two modes).

    ``scorer``: a :class:`~spikemar.eval.scoring.Scorer` of ``model`` to score with instead of
    a new one (``batch_size`` and ``device`` are then its own): one made with
    ``count_energy=True`` counts the operations of the passes that produced the score
    (``scorer.energy_report(hardware)``). ``unk``: a character of a character tokenizer's
    alphabet scored in place of characters outside it (:func:`replace_unknown`; bits/byte
    still counts the text's own bytes, as lm_eval's does for a document)."""
    if not isinstance(text, str) or not text:
        raise ValueError("text: expected a non-empty string")
    window = plain(window)  # NumPy's int as Python's, for the result; token_logprobs checks it
    ids = list(tokenizer.encode(replace_unknown(tokenizer, text, check_unk(tokenizer, unk))[0]))
    if not ids:
        raise ValueError("text: encodes to no tokens")
    if scorer is None:
        scorer = Scorer(model, int(tokenizer.vocab_size), batch_size=batch_size, device=device)
    elif scorer.model is not model:
        raise ValueError("scorer: it scores another model than the one given")
    if window is None and scorer.max_length is not None and len(ids) > scorer.max_length:
        window = scorer.max_length  # attention has a limit: say so through the mode
    logp = scorer.token_logprobs([ids], start_token(tokenizer), window)[0]
    losses = -logp
    if window is None:
        curve = _stream_curve(losses)
    else:
        positions = min(window, len(ids))
        totals = torch.zeros(positions, dtype=torch.float64)
        counts = torch.zeros(positions, dtype=torch.long)
        for off in range(0, len(ids), window):
            seg = losses[off : off + window]
            totals[: len(seg)] += seg
            counts[: len(seg)] += 1
        curve = (
            list(range(positions)),
            list(range(1, positions + 1)),
            (totals / counts).tolist(),
            counts.tolist(),
        )
    total = float(losses.sum())
    n_bytes = len(text.encode("utf-8"))
    return PerplexityResult(
        mode="stream" if window is None else "window",
        window=window,
        tokens=len(ids),
        chars=len(text),
        bytes=n_bytes,
        nats_per_token=total / len(ids),
        bits_per_byte=nats_to_bits_per_byte(total, n_bytes),
        curve_start=curve[0],
        curve_end=curve[1],
        curve_nats=curve[2],
        curve_count=curve[3],
    )


def save_curves(
    results: list[tuple[str, PerplexityResult]],
    path: str | Path,
    *,
    train_length: int | None = None,
    dpi: int = 120,
) -> Path:
    """One PNG with the per-position loss curves of several results (labelled)."""
    from matplotlib.figure import Figure

    if not results:
        raise ValueError("results: expected at least one (label, PerplexityResult)")
    fig = Figure(figsize=(7.0, 4.2))
    ax = fig.add_subplot()
    for label, r in results:
        # 1-based positions (the token's own index counts): a bin [s, e) sits at its geometric
        # middle, so doubling bins are evenly spaced on the log axis
        x = [math.sqrt((s + 1) * e) for s, e in zip(r.curve_start, r.curve_end, strict=True)]
        ax.plot(x, r.curve_nats, marker="o", ms=3, label=f"{label}: {r.nats_per_token:.3f}")
    ax.set_xscale("log")
    ax.set_xlabel("token position, from 1 (in the text, or in the window)")
    ax.set_ylabel("mean loss (nats/token)")
    if train_length:
        ax.axvline(
            train_length, color="grey", ls="--", lw=1, label=f"training length {train_length}"
        )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Loss by position: does the model use context past its training length?",
                 fontsize=9)  # fmt: skip
    fig.tight_layout()
    from ..viz import save_figure

    return save_figure(fig, path, dpi=dpi)  # atomic: an interrupted run leaves no half PNG
