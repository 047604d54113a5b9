"""Sampling from any spikemar language model through its recurrent form.

A model here offers ``init_state(batch, in_place=...)``, ``prefill(tokens [batch, L], state) ->
(logits of the last [batch, vocab], state)`` and ``step(tokens_t [batch], state) -> (logits
[batch, vocab], state)``: the Transformer keeps a KV cache, the SSM models an O(1) state
(updated in place here: generation owns it). The prompt goes through ``prefill`` (the SSM
models' chunked scan: one pass over the weights for the whole prompt, as transformers' generate
prefills), then tokens are sampled with temperature and top-k, each fed back through ``step``.
``fused=True`` runs each token of an SSM model as one C call
(:mod:`spikemar.models.fused_step`).
"""

from __future__ import annotations

import torch

from .._numbers import check_count, integer, item, real
from .fused_step import FusedStep
from .states import prefill_each, stack_states

__all__ = ["context_limit", "filter_logits", "generate"]


def context_limit(model: torch.nn.Module) -> int | None:
    """The most tokens ``model`` can hold (its KV cache, ``config.max_len``), or None where its
    state is O(1) (SSM and LTI layers): no limit."""
    config = getattr(model, "config", None)
    max_len = getattr(config, "max_len", None)
    if max_len is None:
        return None
    kinds = getattr(config, "layer_kinds", None)
    if callable(kinds) and "attn" not in kinds():
        return None  # selective SSM / LTI layers carry O(1) state: no limit
    return int(max_len)


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompt: torch.Tensor | str | list[str] | None = None,
    max_new_tokens: int | None = None,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    fused: bool = False,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    attention_mask: torch.Tensor | None = None,
    input_ids: torch.Tensor | None = None,
    do_sample: bool | None = None,
) -> torch.Tensor | str | list[str]:
    """Continue ``prompt`` [batch, L0] (or [L0]) by ``max_new_tokens`` sampled tokens.

    A list of text prompts is generated as one batch (left-padded: each continues as it would
    alone) and returns a list of texts.
    ``temperature`` 0 is greedy decoding; otherwise tokens are drawn from the logits divided by
    ``temperature``, kept to the ``top_k`` most likely and then to the smallest set whose
    probability reaches ``top_p`` (nucleus sampling), in transformers' order and with its ties
    (``TemperatureLogitsWarper``, ``TopKLogitsWarper``, ``TopPLogitsWarper``). ``generator``
    may live on another device than the model: a CPU generator gives a CUDA model the same
    draws as on the CPU (the probabilities are then copied to it each token, a host sync).
    Returns [batch, L0 + max_new_tokens] (or 1-d). A
    text ``prompt`` (a str) is encoded with the model's own tokenizer (``model.tokenizer``, which
    ``from_pretrained`` and ``load_checkpoint`` set) and the text comes back, prompt and
    continuation, stopped before ``eos_token_id`` (None: the tokenizer's end-of-text token;
    :func:`spikemar.tokenizer.generate_text`).
    ``fused``: run each token as one C call (:class:`spikemar.models.fused_step.FusedStep`, built
    for this call: the same logits, without the modules' Python, and without their hooks);
    raises ValueError for a model it cannot compile (SSM mixers only). ``eos_token_id``: a
    sequence that makes this token (or one of a list of them) is finished (as transformers'
    ``generate``): it goes on with ``pad_token_id`` (None: the first end token) as padding, and
    generation stops early once every sequence has finished (the result is then shorter).
    ``attention_mask`` [batch, L0] (1 for a prompt token, 0 for padding): prompts of different
    lengths, left-padded as a transformers tokenizer pads them for a decoder-only model
    (``padding_side='left'``); each row's prompt is read without its padding (its own
    ``prefill``), then the rows step together, so each row continues exactly as it would alone.
    The result keeps the padded prompt, as transformers' ``generate`` does. Rows of different
    lengths need a model whose state does not grow with the prompt (SSM, LTI layers): a KV
    cache cannot hold them in one batch here.

    transformers' names work too: ``input_ids`` for ``prompt`` (so
    ``model.generate(**tokenizer(text, return_tensors="pt"), max_new_tokens=20)`` runs), and
    ``do_sample``: False is greedy decoding whatever ``temperature`` says (transformers then
    ignores temperature, top-k and top-p), True samples (``temperature`` must be > 0); None
    (the default) leaves it to ``temperature``.
    """
    if input_ids is not None:
        if prompt is not None:
            raise ValueError("input_ids: transformers' name for prompt; give one of them")
        prompt = input_ids
    if prompt is None:
        raise TypeError("prompt: expected token ids (a tensor), a str or a list of str, got None")
    if do_sample is not None:
        if not isinstance(do_sample, bool):
            raise ValueError(f"do_sample: expected True, False or None, got {do_sample!r}")
        if not do_sample:
            temperature = 0.0
        elif temperature == 0:
            raise ValueError("temperature: 0 is greedy decoding; do_sample=True needs a "
                             "temperature > 0")  # fmt: skip
    texts = isinstance(prompt, list | tuple) and bool(prompt)
    if texts and not all(isinstance(p, str) for p in prompt):
        raise TypeError("prompt: expected token ids (a tensor), a str or a list of str")
    if isinstance(prompt, str) or texts:
        tokenizer = getattr(model, "tokenizer", None)
        if tokenizer is None:
            raise ValueError(
                "prompt: a text prompt needs the model's tokenizer (model.tokenizer, set by "
                "from_pretrained and load_checkpoint; this model has none): pass token ids, or "
                "use spikemar.tokenizer.generate_text(model, tokenizer, text)"
            )
        from ..tokenizer import generate_text

        if attention_mask is not None:
            raise ValueError("attention_mask: text prompts are padded here (give token ids "
                             "with their mask instead)")  # fmt: skip
        return generate_text(model, tokenizer, prompt, max_new_tokens, temperature=temperature,
                             top_k=top_k, top_p=top_p, generator=generator, fused=fused,
                             eos_token_id=eos_token_id)  # fmt: skip
    if not isinstance(prompt, torch.Tensor):
        raise TypeError(f"prompt: expected token ids (a tensor), a str or a list of str, got "
                        f"{type(prompt).__name__}")  # fmt: skip
    squeeze = prompt.dim() == 1
    tokens = prompt.unsqueeze(0) if squeeze else prompt
    if tokens.dim() != 2 or tokens.shape[1] == 0:
        raise ValueError(
            "prompt: expected token ids [batch, L0] or [L0] with L0 >= 1, "
            f"got {tuple(prompt.shape)}"
        )
    if tokens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"prompt: expected integer token ids, got dtype {prompt.dtype}")
    # NumPy's numbers as Python's (a sweep's np.arange, np.linspace), a bool refused
    max_new_tokens = check_count("max_new_tokens", max_new_tokens, 0)
    temperature, top_k, top_p = _sampling(temperature, top_k, top_p, greedy=True)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator or None, got "
                        f"{type(generator).__name__}")  # fmt: skip
    if not isinstance(fused, bool):
        raise ValueError(f"fused: expected True or False, got {fused!r}")
    limit = context_limit(model)
    places = tokens.shape[1] + max(max_new_tokens - 1, 0)  # the last new token is not fed
    if limit is not None and places > limit:
        raise ValueError(
            f"max_new_tokens: a prompt of {tokens.shape[1]} tokens and {max_new_tokens} new ones "
            f"need {places} places in the KV cache; the model has {limit} (max_len)"
        )
    if squeeze and isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 1:
        attention_mask = attention_mask.unsqueeze(0)  # a 1-d prompt's 1-d mask
    pads = _left_padding(attention_mask, tokens)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    eos_ids = _eos_ids(eos_token_id, vocab)
    if pad_token_id is not None:  # used where a row has ended (eos_token_id), as transformers'
        if isinstance(pad_token_id, list | tuple):
            raise ValueError(f"pad_token_id: expected one token id, got {pad_token_id!r}")
        pad_id = _eos_ids(pad_token_id, vocab, "pad_token_id")[0]
    else:
        pad_id = None if eos_ids is None else eos_ids[0]
    was_training = model.training
    model.eval()
    try:
        step = FusedStep(model, tokens.shape[0]) if fused else model.step
        logits, state = _prefill(model, tokens, pads)
        out = [tokens]
        done = None if eos_ids is None else torch.zeros_like(tokens[:, 0], dtype=torch.bool)
        stops = None if eos_ids is None else torch.tensor(eos_ids, device=tokens.device)
        for n in range(max_new_tokens):
            next_token = _sample(logits, temperature, top_k, top_p, generator)
            if done is not None:
                next_token = next_token.masked_fill(done, pad_id)
                done |= torch.isin(next_token, stops)
            out.append(next_token[:, None])
            if n + 1 == max_new_tokens or (done is not None and bool(done.all())):
                break  # the last token's logits are never read
            logits, state = step(next_token, state)
    finally:
        model.train(was_training)
    result = torch.cat(out, dim=1)
    return result[0] if squeeze else result


def _left_padding(attention_mask: object, tokens: torch.Tensor) -> list[int] | None:
    """The padding tokens at the start of each row of ``attention_mask`` (None: no mask);
    ValueError for a mask of another shape, other values, or padding not at the
    left."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != tokens.shape:
        got = (
            tuple(attention_mask.shape)
            if isinstance(attention_mask, torch.Tensor)
            else (type(attention_mask).__name__)
        )
        raise ValueError(f"attention_mask: expected a tensor of the prompt's shape "
                         f"{tuple(tokens.shape)}, got {got}")  # fmt: skip
    mask = attention_mask.detach().cpu()
    if mask.is_floating_point() or mask.is_complex() or not ((mask == 0) | (mask == 1)).all():
        raise ValueError("attention_mask: expected 0 (padding) and 1 (prompt token) as "
                         "integers or booleans")  # fmt: skip
    mask = mask.long()
    pads = (mask.cumsum(1) == 0).sum(1)  # zeros before the first 1
    real = mask.sum(1)
    for row, (p, n) in enumerate(zip(pads.tolist(), real.tolist(), strict=True)):
        if n == 0:
            raise ValueError(f"attention_mask: row {row} holds no prompt token")
        if p + n != mask.shape[1]:
            raise ValueError(f"attention_mask: row {row} is not left-padded (0s, then 1s to the "
                             "end: padding_side='left', as transformers expects for "
                             "decoder-only generation)")  # fmt: skip
    return pads.tolist()


def _prefill(model: torch.nn.Module, tokens: torch.Tensor, pads: list[int] | None):
    """The last prompt token's logits and the state after the prompt, updated in place by the
    steps that follow (generation owns its state and never steps from one twice). Left-padded
    rows (``pads``) are read one by one without their padding and stacked."""
    if pads is not None and len(set(pads)) == 1:  # padding all alike (or none): one batch
        tokens, pads = tokens[:, pads[0] :], None
    if pads is None:
        return model.prefill(tokens, model.init_state(tokens.shape[0], in_place=True))
    firsts, states = prefill_each(model, [tokens[r : r + 1, pad:] for r, pad in enumerate(pads)])
    try:
        return torch.cat(firsts), stack_states(states)
    except ValueError as err:
        raise ValueError(
            "attention_mask: prompts of different lengths need a model whose state does not "
            f"grow with them (SSM layers); {type(model).__name__}'s KV caches cannot be "
            "stacked into one batch: generate them one by one"
        ) from err


def _eos_ids(
    eos_token_id: object, vocab: int | None, name: str = "eos_token_id"
) -> list[int] | None:
    """``eos_token_id`` (an id or a list of them, as Llama-3's generation config lists three) as
    a list of ids inside the vocabulary, or None."""
    if eos_token_id is None:
        return None
    many = isinstance(eos_token_id, list | tuple)
    ids = list(eos_token_id) if many else [eos_token_id]
    ok = bool(ids) and all(integer(i) is not None and 0 <= i < (vocab or i + 1) for i in ids)
    if not ok:
        raise ValueError(f"{name}: expected a token id (or a list of them) in [0, {vocab}) "
                         f"or None, got {eos_token_id!r}")  # fmt: skip
    return [int(i) for i in ids]


def _sampling(
    temperature: object, top_k: object, top_p: object, *, greedy: bool
) -> tuple[float, int | None, float | None]:
    """The sampling settings as Python numbers (NumPy's too, a bool refused), else one error
    naming the first bad one; ``greedy``: temperature 0 (greedy decoding) is allowed, where
    nothing divides by it."""
    # a one-element tensor or array is its number, as generate and filter_logits took them
    # before (they only compared and divided by them); filter_logits divided by a tensor of
    # several (per row) too, which stays as it is, unchecked
    if not greedy and isinstance(temperature, torch.Tensor) and temperature.numel() > 1:
        t = temperature
    else:
        t = real(item(temperature, any_shape=True))
        if t is None or not (t >= 0 if greedy else t > 0):
            raise ValueError(f"temperature: expected {'>=' if greedy else '>'} 0, got "
                             f"{temperature!r}")  # fmt: skip
    k = None if top_k is None else integer(item(top_k, any_shape=True))
    if top_k is not None and (k is None or k < 1):
        raise ValueError(f"top_k: expected an int >= 1 or None, got {top_k!r}")
    p = None if top_p is None else real(item(top_p, any_shape=True))
    if top_p is not None and (p is None or not 0 < p <= 1):
        raise ValueError(f"top_p: expected a number in (0, 1] or None, got {top_p!r}")
    return t, k, p


def filter_logits(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> torch.Tensor:
    """``logits`` [..., vocab] ([batch, vocab] when sampling) as sampling sees them: divided by
    ``temperature`` (> 0), all but the ``top_k`` largest set to -inf (ties with the k-th
    kept), then all outside the smallest set of most likely tokens whose probability reaches
    ``top_p`` (at least one kept): transformers' temperature, top-k and top-p warpers, in that
    order, in float32, along the last dimension."""
    # any real tensor of one dimension or more, as before (integer logits become float32); a
    # complex one would lose its imaginary part in .float()
    if not isinstance(logits, torch.Tensor) or logits.dim() < 1 or logits.is_complex():
        what = (f"{tuple(logits.shape)} {logits.dtype}" if isinstance(logits, torch.Tensor)
                else type(logits).__name__)  # fmt: skip
        raise ValueError(f"logits: expected a real tensor [..., vocab], got {what}")
    return _filter(logits, *_sampling(temperature, top_k, top_p, greedy=False))


def _filter(
    logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None
) -> torch.Tensor:
    """:func:`filter_logits` on settings already checked (each generated token)."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        ascending, order = torch.sort(logits, dim=-1)
        mass = ascending.softmax(dim=-1).cumsum(dim=-1)
        drop = mass <= 1 - top_p  # the least likely tokens, while the rest still reach top_p
        drop[..., -1] = False  # the most likely token always stays
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def _sample(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(_filter(logits, temperature, top_k, top_p), dim=-1)
    if generator is not None and generator.device != probs.device:
        # torch.multinomial draws only from a generator on the tensor's device: draw where
        # the generator lives (the same tokens as a model there would draw)
        return torch.multinomial(probs.to(generator.device), 1, generator=generator)[:, 0].to(
            probs.device
        )
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
