"""Scoring token sequences with a spikemar language model: what an evaluation asks of a model.

Three questions, the three requests of EleutherAI's lm-evaluation-harness:

    loglikelihood(context, continuation)  = Σ_i log p(c_i | context, c_<i),  and whether every
                                            c_i is the argmax (greedy) choice
    rolling loglikelihood(document)       = Σ_i log p(d_i | prefix, d_<i)   (prefix: one token
                                            standing for "start of text", see ``prefix_token``)
    greedy continuation until a stop sequence

Everything here works on token ids and any model with ``model(tokens [batch, L]) → logits
[batch, L, vocab]`` (MARLM, its dense twin, TransformerLM). Requests are batched with right
padding: the models are causal, so padding after a sequence never changes the logits of the
positions before it (a test checks that against unbatched scoring). Log-probabilities are taken
in float64 from the model's logits.

**One pass per document.** An SSM LM has no context limit and its scan is linear in L, so a
document is scored by one forward pass over all of it: every token sees the whole document
before it, nothing is re-encoded. A document longer than 2^24 / vocabulary tokens (about 330 for
a 50k BPE vocabulary, 2048 at most) runs as consecutive ``prefill`` chunks with the state
carried: the same scores (to the chunked scan's rounding), its logits never held whole.
Models with attention have a KV/position limit (``max_length``); for them, and on request
(``window``), a document is cut into consecutive windows that each start afresh from the prefix
token, as the training windows did (lm_eval's wrapper, ``SpikemarLM``, gives a model with a
``max_length`` lm_eval ``hf``'s rolling windows instead).

**Energy on the same tokens.** :class:`Scorer` optionally keeps an energy counter
(:class:`spikemar.energy.EnergyCounter`) attached to every forward pass it runs, so the
operations counted are exactly those that produced the scores; ``positions`` counts the token
positions those passes processed (padding included: the model computed on it too).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .._numbers import check_count, integer, item
from ..energy import EnergyCounter, EnergyReport
from ..models.generation import context_limit
from ..models.hub import is_hub_id
from ..models.states import prefill_each, select_states, stack_states

__all__ = ["ContinuationScore", "Scorer", "load_model", "model_max_length"]


@dataclass(frozen=True)
class ContinuationScore:
    """Log-probability (nats) of a continuation given its context, and whether greedy decoding
    would have produced it."""

    logprob: float
    greedy: bool
    tokens: int


def load_model(
    checkpoint: str | os.PathLike,
    tokenizer: str | os.PathLike | None = None,
    dtype: torch.dtype | str | None = None,
) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` of what an evaluation is pointed at, the model in eval mode on the
    CPU, with the tokenizer that came with it:

    * a spikemar checkpoint file (``spikemar train``/``distill``/``convert``; its character or
      BPE tokenizer is stored inside);
    * a Hugging Face Mamba-2 or Llamba checkpoint directory, or a Hub id like ``owner/name``
      (:func:`spikemar.models.from_pretrained`: the dense model and the directory's tokenizer).

    ``tokenizer``: take the tokenizer from this directory, ``tokenizer.json`` or Hub id instead
    (for a checkpoint that ships none, as state-spaces/mamba2-130m: EleutherAI/gpt-neox-20b).
    ``dtype``: the weights' dtype (a floating torch dtype or its name; ``'auto'`` or None keep a
    checkpoint file's own, and give a Hugging Face directory its ``config.json``'s or float32,
    as :func:`~spikemar.models.from_pretrained`).
    The model's vocabulary must cover the tokenizer's (a larger one, padded as Llamba pads its
    embedding, is fine: its extra ids are never scored but keep their share of the softmax).
    """
    if not isinstance(checkpoint, str | os.PathLike):
        raise TypeError(f"checkpoint: expected a file, a directory or a Hub id, got {checkpoint!r}")
    if tokenizer is not None and not isinstance(tokenizer, str | os.PathLike):
        raise TypeError(f"tokenizer: expected a directory, a tokenizer.json or a Hub id, got "
                        f"{type(tokenizer).__name__}")  # fmt: skip
    from ..models.hub import _dtype

    cast = None if dtype is None or dtype == "auto" else _dtype(dtype)
    path = Path(checkpoint)
    if path.is_file():
        from ..checkpoint import load_checkpoint

        model, own, _ = load_checkpoint(path)
        if cast is not None:
            model = model.to(dtype=cast)
        if tokenizer is None:
            tokenizer = own
        else:
            from ..models.hub import tokenizer_from

            tokenizer = model.tokenizer = tokenizer_from(tokenizer)
    elif path.is_dir() or (not path.exists() and is_hub_id(checkpoint)):
        from ..models import from_pretrained

        model = from_pretrained(checkpoint, tokenizer=True if tokenizer is None else tokenizer,
                                dtype=dtype)  # fmt: skip
        tokenizer = model.tokenizer
    else:
        raise FileNotFoundError(
            f"checkpoint: no file or directory at {path} (expected a spikemar checkpoint file, "
            "a Hugging Face Mamba-2/Llamba directory or a Hub id like 'owner/name')"
        )
    model_vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(model_vocab, int) and model_vocab < tokenizer.vocab_size:
        raise ValueError(
            f"checkpoint: {path}: the model's vocabulary ({model_vocab}) is smaller than its "
            f"tokenizer's ({tokenizer.vocab_size})"
        )
    return model.eval(), tokenizer


# the longest sequence a model accepts in one forward pass (None: no limit, an SSM)
model_max_length = context_limit


def _check_ids(ids: Sequence[int], name: str, vocab: int, *, empty_ok: bool = False) -> list[int]:
    if isinstance(ids, torch.Tensor | np.ndarray):  # read whole: an integer dtype, 1-d
        # or a column [n, 1] (one id per row: int() took each row before)
        if not _integral(ids) or ids.ndim < 1 or any(size != 1 for size in ids.shape[1:]):
            raise ValueError(f"{name}: expected a 1-d sequence of integer token ids, got "
                             f"{ids.dtype} of shape {tuple(ids.shape)}")  # fmt: skip
        out = ids.reshape(-1).tolist()
    else:
        out = []
        for i in ids:
            # each an integer: int() made True token 1 and 2.7 token 2, scoring other tokens
            # (one element of a tensor or array, of any shape, as int() took it before)
            value = integer(item(i, any_shape=True))
            if value is None:
                raise ValueError(f"{name}: expected integer token ids, got {i!r}")
            out.append(value)
    if not out and not empty_ok:
        raise ValueError(f"{name}: expected at least one token id, got none")
    bad = [i for i in out if not 0 <= i < vocab]
    if bad:
        raise ValueError(f"{name}: token ids {bad[:5]} outside the vocabulary [0, {vocab})")
    return out


def _integral(ids: torch.Tensor | np.ndarray) -> bool:
    """Whether a tensor's or array's dtype holds integers: not a float, a bool or a complex
    (a complex tensor is neither floating point nor bool, and its ids compare with nothing)."""
    if isinstance(ids, torch.Tensor):
        dtype = ids.dtype
        return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)
    return ids.dtype.kind in "iu"


class Scorer:
    """Batched scoring of token sequences by ``model`` (in eval mode, under no_grad).

    Args:
        model: a spikemar LM (``model(tokens) → logits``).
        vocab_size: the model's vocabulary (ids are checked against it).
        batch_size: sequences per forward pass.
        device: where the passes run (the model is moved there).
        max_length: the longest forward pass (default :func:`model_max_length`; None: no limit).
        pad_token: the id written after short sequences (any valid id: it is never scored).
        count_energy: keep an :class:`~spikemar.energy.EnergyCounter` on every pass.
    """

    def __init__(
        self,
        model: nn.Module,
        vocab_size: int,
        *,
        batch_size: int = 16,
        device: str | torch.device = "cpu",
        max_length: int | None = None,
        pad_token: int = 0,
        count_energy: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        # NumPy's integers as Python's (a sweep's np.arange), a bool or a float refused
        vocab_size = check_count("vocab_size", vocab_size)
        batch_size = check_count("batch_size", batch_size)
        limit = model_max_length(model)
        if max_length is not None:
            if integer(max_length) is None or max_length < 2:
                raise ValueError(f"max_length: expected an int >= 2 or None, got {max_length!r}")
            max_length = integer(max_length)
            if limit is not None and max_length > limit:
                raise ValueError(f"max_length: {max_length} exceeds the model's max_len {limit}")
            limit = max_length
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.vocab_size = vocab_size
        self.batch_size = batch_size
        self.max_length = limit
        self.pad_token = _check_ids([pad_token], "pad_token", self.vocab_size)[0]
        self.counter = EnergyCounter(self.model) if count_energy else None
        self.positions = 0  # token positions run through the model (for per-token energy)

    # -- the forward pass ---------------------------------------------------------------------

    def _forward(self, rows: list[list[int]]) -> torch.Tensor:
        """Logits [batch, L, vocab] of right-padded ``rows``."""
        L = max(len(r) for r in rows)
        ids = torch.full((len(rows), L), self.pad_token, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        ids = ids.to(self.device)
        with self._pass():
            logits = self.model(ids)
        self.positions += ids.numel()
        return logits

    @contextlib.contextmanager
    def _pass(self) -> Iterator[None]:
        """What every pass of the model runs under: no autograd, and the energy counter where
        this Scorer keeps one (the operations counted are those that produced the scores)."""
        counting = self.counter if self.counter is not None else contextlib.nullcontext()
        with torch.no_grad(), counting:
            yield

    def energy_report(self, hardware: str = "45nm-fp32") -> EnergyReport:
        """The operations of every pass run so far, priced under ``hardware``, per position."""
        if self.counter is None:
            raise ValueError("count_energy: this Scorer was made with count_energy=False")
        if self.positions == 0:
            raise ValueError("energy_report: nothing has been scored yet")
        return self.counter.report(hardware, tokens=self.positions)

    # -- loglikelihood ------------------------------------------------------------------------

    def loglikelihood(
        self, requests: Sequence[tuple[Sequence[int], Sequence[int]]]
    ) -> list[ContinuationScore]:
        """Score each ``(context, continuation)``, both non-empty token lists (an empty
        context is the caller's choice of a start token: lm_eval's wrapper gives the prefix)."""
        pairs = []
        for n, (context, continuation) in enumerate(requests):
            ctx = _check_ids(context, f"requests[{n}] context", self.vocab_size)
            cont = _check_ids(continuation, f"requests[{n}] continuation", self.vocab_size)
            whole = ctx + cont
            if self.max_length is not None and len(whole) - 1 > self.max_length:
                if len(cont) > self.max_length:
                    raise ValueError(
                        f"requests[{n}]: continuation of {len(cont)} tokens exceeds max_length "
                        f"{self.max_length}"
                    )
                whole = whole[-(self.max_length + 1) :]  # drop the oldest context, as lm_eval
            pairs.append((whole[:-1], whole[-len(cont) :]))
        out: list[ContinuationScore | None] = [None] * len(pairs)
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]))
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            logits = self._forward([pairs[i][0] for i in chunk])
            for row, i in enumerate(chunk):
                inputs, cont = pairs[i]
                end = len(inputs)
                sel = logits[row, end - len(cont) : end].double()
                logp = F.log_softmax(sel, dim=-1)
                target = torch.tensor(cont, device=logp.device)
                total = logp.gather(-1, target[:, None]).sum().item()
                greedy = bool((sel.argmax(-1) == target).all())
                out[i] = ContinuationScore(total, greedy, len(cont))
        return out  # type: ignore[return-value]

    # -- rolling loglikelihood -------------------------------------------------------------------

    def token_logprobs(
        self, documents: Sequence[Sequence[int]], prefix: int, window: int | None = None
    ) -> list[torch.Tensor]:
        """Per-token log-probabilities (float64, nats) of every token of each document, each
        conditioned on ``prefix`` and the document before it: one pass over the whole document,
        or consecutive windows of ``window`` tokens that each restart from ``prefix``."""
        prefix = _check_ids([prefix], "prefix", self.vocab_size)[0]
        if window is not None:
            if integer(window) is None or window < 1:
                raise ValueError(f"window: expected an int >= 1 or None, got {window!r}")
            window = integer(window)
        if self.max_length is not None:
            window = min(window or self.max_length, self.max_length)
        segments: list[tuple[int, int, list[int]]] = []  # (document, offset, tokens)
        for n, doc in enumerate(documents):
            ids = _check_ids(doc, f"documents[{n}]", self.vocab_size)
            step = window or len(ids)
            for off in range(0, len(ids), step):
                segments.append((n, off, ids[off : off + step]))
        result = [
            torch.empty(len(doc), dtype=torch.float64) for doc in documents
        ]  # filled segment by segment
        order = sorted(range(len(segments)), key=lambda i: -len(segments[i][2]))
        start = 0
        chunk_tokens = self._stream_chunk()
        while start < len(order) and chunk_tokens and len(segments[order[start]][2]) > chunk_tokens:
            # a long document of an SSM model: chunk by chunk with its state carried (one pass
            # would hold its logits whole: tokens × vocabulary, gigabytes for a BPE vocabulary)
            n, off, seg = segments[order[start]]
            result[n][off : off + len(seg)] = self._streamed_logprobs(prefix, seg, chunk_tokens)
            start += 1
        while start < len(order):
            # long documents alone, short ones batched: bound the positions of one pass
            longest = len(segments[order[start]][2]) + 1
            take = max(1, min(self.batch_size, (self.batch_size * 512) // longest))
            chunk = order[start : start + take]
            start += take
            logits = self._forward([[prefix, *segments[i][2][:-1]] for i in chunk])
            for row, i in enumerate(chunk):
                n, off, seg = segments[i]
                logp = F.log_softmax(logits[row, : len(seg)].double(), dim=-1)
                target = torch.tensor(seg, device=logp.device)[:, None]
                result[n][off : off + len(seg)] = logp.gather(-1, target)[:, 0].cpu()
        return result

    def _stream_chunk(self) -> int | None:
        """Tokens per chunk for documents scored with their state carried (the logits of a
        chunk about 2^24 values: 64 MB in float32, at most 2048 and at least 64 tokens), or
        None where the model cannot (only a MARLM without attention carries its state across
        ``prefill`` calls without a limit)."""
        from ..models import MARLM

        if not isinstance(self.model, MARLM) or context_limit(self.model) is not None:
            return None
        return max(64, min(2048, 2**24 // self.vocab_size))

    def _streamed_logprobs(self, prefix: int, seg: list[int], chunk: int) -> torch.Tensor:
        """Log-probabilities of ``seg`` after ``prefix``, as one forward pass gives them (to
        the rounding of the chunked scan), from ``prefill`` chunk by chunk."""
        ids = torch.tensor([prefix, *seg[:-1]], dtype=torch.long, device=self.device)
        target = torch.tensor(seg, dtype=torch.long, device=self.device)
        out = torch.empty(len(seg), dtype=torch.float64)
        state = None
        with self._pass():
            for start in range(0, len(seg), chunk):
                part = ids[None, start : start + chunk]
                logits, state = self.model.prefill(part, state, all_logits=True)
                logp = F.log_softmax(logits[0].double(), dim=-1)
                picked = logp.gather(-1, target[start : start + chunk, None])[:, 0]
                out[start : start + chunk] = picked.cpu()
                self.positions += part.numel()
        return out

    def loglikelihood_rolling(
        self, documents: Sequence[Sequence[int]], prefix: int, window: int | None = None
    ) -> list[float]:
        """Σ of :meth:`token_logprobs` per document."""
        return [float(t.sum()) for t in self.token_logprobs(documents, prefix, window)]

    # -- greedy generation ------------------------------------------------------------------------

    def greedy_until(
        self,
        contexts: Sequence[Sequence[int]],
        *,
        decode: Callable[[list[int]], str],
        stop: Sequence[str] = (),
        max_new_tokens: int = 64,
    ) -> list[str]:
        """Greedy continuation of each context, decoded, cut before the first stop sequence.

        A model without a context limit that has a recurrent form (``prefill``/``step``: the
        SSM models) reads each context once, in one parallel pass (``prefill``), then runs one
        O(1) ``step`` per new token for a batch of ``batch_size`` requests at once (a request
        leaves the batch when it is done): O(L + new tokens) per request. Models
        with a context limit (attention) re-run the forward pass over the sequence so far for
        each new token, batched across requests (right padding keeps it exact), the context cut
        to the last ``max_length`` tokens as it grows.
        """
        max_new_tokens = check_count("max_new_tokens", max_new_tokens, 0)
        stops = [s for s in stop if s]
        rows = [_check_ids(c, f"contexts[{n}]", self.vocab_size) for n, c in enumerate(contexts)]
        new: list[list[int]] = [[] for _ in rows]
        text = [""] * len(rows)
        active = list(range(len(rows)))
        if self._recurrent():
            for start in range(0, len(rows), self.batch_size):
                chunk = list(range(start, min(start + self.batch_size, len(rows))))
                made = self._greedy_recurrent([rows[i] for i in chunk], decode, stops,
                                              max_new_tokens)  # fmt: skip
                for i, (ids, t) in zip(chunk, made, strict=True):
                    new[i], text[i] = ids, t
            active = []
        for _ in range(max_new_tokens):
            if not active:
                break
            finished = []
            for start in range(0, len(active), self.batch_size):
                chunk = active[start : start + self.batch_size]
                seqs = [self._fit(rows[i] + new[i]) for i in chunk]
                logits = self._forward(seqs)
                for row, i in enumerate(chunk):
                    new[i].append(int(logits[row, len(seqs[row]) - 1].argmax()))
                    text[i] = decode(new[i])
                    if any(s in text[i] for s in stops):
                        finished.append(i)
            active = [i for i in active if i not in set(finished)]
        out = []
        for t in text:
            cut = min((t.find(s) for s in stops if s in t), default=len(t))
            out.append(t[:cut])
        return out

    def _recurrent(self) -> bool:
        """Whether greedy generation runs through the model's recurrent form: no context limit,
        and ``init_state``, ``prefill`` and ``step`` (the MAR models with SSM/LTI mixers)."""
        return self.max_length is None and all(
            callable(getattr(self.model, name, None)) for name in ("init_state", "prefill", "step")
        )

    def _greedy_recurrent(
        self,
        contexts: list[list[int]],
        decode: Callable[[list[int]], str],
        stops: list[str],
        limit: int,
    ) -> list[tuple[list[int], str]]:
        """A batch of requests: each context in its own ``prefill`` (their lengths differ), the
        states stacked, then one ``step`` for all of them per greedy token; a request leaves the
        batch when a stop sequence appears in its decoded text or it has ``limit`` tokens.
        States the rows cannot be stacked from (not dataclasses of batch-first tensors) run
        request by request."""
        new: list[list[int]] = [[] for _ in contexts]
        text = [""] * len(contexts)
        if limit == 0:
            return list(zip(new, text, strict=True))
        with self._pass():
            firsts, states = prefill_each(self.model, [
                torch.tensor([c], dtype=torch.long, device=self.device) for c in contexts
            ])  # fmt: skip
            self.positions += sum(len(c) for c in contexts)
            try:
                batches = [(list(range(len(contexts))), stack_states(states))]
            except ValueError:  # states that do not stack: request by request
                batches = [([i], state) for i, state in enumerate(states)]
            for active, state in batches:
                logits = torch.cat([firsts[i] for i in active])
                while True:
                    tokens = logits.argmax(-1)
                    keep = []
                    for row, i in enumerate(active):
                        new[i].append(int(tokens[row]))
                        text[i] = decode(new[i])
                        if len(new[i]) < limit and not any(s in text[i] for s in stops):
                            keep.append(row)
                    if not keep:
                        break
                    if len(keep) < len(active):  # the finished leave the batch
                        state = select_states(state, keep)
                        tokens = tokens[keep]
                        active = [active[r] for r in keep]
                    logits, state = self.model.step(tokens, state)
                    self.positions += len(active)
        return list(zip(new, text, strict=True))

    def _fit(self, seq: list[int]) -> list[int]:
        if self.max_length is not None and len(seq) > self.max_length:
            return seq[-self.max_length :]
        return seq


def nats_to_bits_per_byte(nats: float, n_bytes: int) -> float:
    """Total nats over a text → bits per UTF-8 byte of it."""
    if n_bytes < 1:
        raise ValueError(f"n_bytes: expected >= 1, got {n_bytes}")
    return nats / (n_bytes * math.log(2))
