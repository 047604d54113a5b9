"""spikemar models inside EleutherAI's lm-evaluation-harness: ``--model spikemar``.

    python -m spikemar.eval run --model spikemar --model_args checkpoint=PATH --tasks piqa
    lm_eval.simple_evaluate(model=SpikemarLM(checkpoint=PATH), tasks=[...])

:class:`SpikemarLM` is an ``lm_eval.api.model.TemplateLM``: lm_eval's own code turns each
``(context, continuation)`` into token ids (trailing spaces of the context moved to the
continuation, the context encoded as a prefix of the whole, an empty context replaced by the
prefix token), and :class:`~spikemar.eval.scoring.Scorer` scores the ids in batches, in float64.
Rolling loglikelihood scores a whole document in one forward pass (the SSM has no context limit);
``generate_until`` is greedy.

**Registration.** Importing this module registers the class under the name ``spikemar`` with
``lm_eval.api.registry.register_model``, lm_eval's documented way to add a model. lm_eval 0.4.13
has no plugin discovery (no entry points are read; ``--include_path`` is for tasks only), so its
own ``lm_eval`` command cannot import spikemar by itself; ``python -m spikemar.eval`` is that
command with spikemar imported first (every ``lm_eval`` argument works the same). lm_eval
registers its own models (``hf``, ...) only when it finds its registry empty, so this module
imports ``lm_eval.models`` before adding ``spikemar``: both then work side by side.

**Tokenizers.** A checkpoint's own tokenizer (character or BPE; a Hugging Face directory's
``tokenizer.json``). As in lm_eval's ``hf`` model, a tokenizer that puts a beginning-of-text
token before a text (Llama-3's, so Llamba's) has it before every context, and it is the prefix
of rolling and empty-context requests; others (GPT-NeoX's, Mamba-2's) start from their
end-of-text token. (lm_eval's ``hf`` model also scores a rolling document's own leading
``<|begin_of_text|>`` after its prefix; here a document is scored after the one prefix.) The
character tokenizer of the Tiny Shakespeare checkpoints knows 65 symbols; text with others
(digits, most punctuation of the standard tasks) raises a clear error unless ``unk=C`` names a
symbol of the alphabet to stand in for them (:attr:`SpikemarLM.replaced_chars` collects the
characters replaced). It has no end-of-text token: ``"\\n"`` stands for the start of a document
(the prefix of rolling and empty-context requests).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import lm_eval.models  # noqa: F401  lm_eval's own models first (see "Registration")
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from .._argtypes import check_device
from ..energy import EnergyReport
from .perplexity import check_unk, end_token, replace_unknown, start_token, text_prefix
from .scoring import Scorer, load_model

__all__ = ["SpikemarLM", "load_model"]

log = logging.getLogger(__name__)

# how an error about characters outside a character tokenizer's alphabet says to set unk: as
# lm_eval's model_args (spikemar eval says its --unk instead)
UNK_HINT = " (model_args unk=' ' replaces them)"


def _as_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
        return value.lower() in ("true", "1")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ValueError(f"{name}: expected true or false, got {value!r}")


def _as_int(name: str, value: Any, minimum: int, *, none_ok: bool = False) -> int | None:
    if value is None or (none_ok and isinstance(value, str) and value.lower() == "none"):
        if none_ok:
            return None
        raise ValueError(f"{name}: expected an int >= {minimum}, got None")
    try:
        out = int(value)
    except (TypeError, ValueError):
        out = None
    if out is None or isinstance(value, bool) or out < minimum or str(out) != str(value).strip():
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")
    return out


@register_model("spikemar")
class SpikemarLM(TemplateLM):
    """A spikemar checkpoint as an lm-evaluation-harness model.

    Args (``--model_args key=value,...``):
        checkpoint: a spikemar checkpoint file (``spikemar train``/``distill``, the packaged
            ``spikemar/assets/mar_shakespeare.pt``), or a Hugging Face Mamba-2/Llamba directory
            or Hub id (:func:`~spikemar.eval.scoring.load_model`); the tokenizer comes with it.
            ``pretrained`` is the same argument by lm_eval ``hf``'s name, so
            ``--model_args pretrained=DIR`` reads as it does for ``--model hf``.
        model, tokenizer: instead of ``checkpoint``, a model object and its tokenizer (Python).
        batch_size: sequences per forward pass (lm_eval's ``--batch_size``; 'auto' means 16).
        device: 'cpu' (default) or a torch device.
        max_length: the longest forward pass (default: none for SSM models, ``max_len`` with
            attention); longer contexts lose their oldest tokens, longer documents are windowed.
        window: score rolling documents in windows of this many tokens that each restart from
            the prefix token, instead of one pass (without it, a model with a ``max_length``
            scores a longer document in lm_eval ``hf``'s rolling windows, as ``hf`` does).
        unk: one character of a character tokenizer's alphabet that stands in for characters
            outside it (default: such text is an error).
        count_energy: count the operations of every pass (default true; see
            :meth:`energy_report`; lm_eval's results JSON gets them as ``config``'s
            ``spikemar_energy``).
        max_gen_toks: default cap on generated tokens (256).
        trust_remote_code: taken and unused (lm_eval's ``--trust_remote_code`` passes it to
            every model; spikemar runs no code from a checkpoint's repository).
        dtype: the checkpoint's weights in this dtype (``bfloat16``, ``float16``, ``float32``;
            ``auto``: the checkpoint's own, as lm_eval ``hf``'s ``dtype``). Default float32 for a
            Hugging Face directory, a spikemar checkpoint file's own dtype.
        tokenizer: with ``model``, its tokenizer object; with ``checkpoint``, where to take the
            tokenizer from instead of the checkpoint (a directory, ``tokenizer.json`` or Hub id:
            ``tokenizer=EleutherAI/gpt-neox-20b`` for state-spaces/mamba2-130m, which ships
            none).
    """

    def __init__(
        self,
        checkpoint: str | os.PathLike | None = None,
        *,
        model: torch.nn.Module | None = None,
        tokenizer: Any = None,
        batch_size: int | str = 16,
        device: str | None = "cpu",
        max_length: int | str | None = None,
        window: int | str | None = None,
        unk: str | None = None,
        count_energy: bool | str = True,
        max_gen_toks: int | str = 256,
        pretrained: str | os.PathLike | None = None,
        dtype: str | torch.dtype | None = None,
        **unknown: Any,
    ) -> None:
        super().__init__()
        if pretrained is not None:
            if checkpoint is not None:
                raise ValueError("pretrained: the same argument as checkpoint; give one of them")
            checkpoint = pretrained
        unknown = {k: v for k, v in unknown.items() if v is not None}
        unknown.pop("max_batch_size", None)  # lm_eval passes it with every model
        # lm_eval's --trust_remote_code adds it for the task data's loaders; spikemar reads
        # weights and tokenizers only, never a repository's code
        _as_bool("trust_remote_code", unknown.pop("trust_remote_code", False))
        if unknown:
            raise ValueError(
                f"model_args: unknown argument(s) {sorted(unknown)}; spikemar takes checkpoint "
                "(or pretrained), tokenizer, dtype, batch_size, device, max_length, window, unk, "
                "count_energy, max_gen_toks"
            )
        if isinstance(checkpoint, int | float) and not isinstance(checkpoint, bool):
            name = "checkpoint" if pretrained is None else "pretrained"
            raise ValueError(
                f"{name}: got the number {checkpoint} (lm_eval's model_args read a name like it "
                f"as one); quote it: {name}='{checkpoint}'"
            )
        if (checkpoint is None) == (model is None):
            raise ValueError("checkpoint: give a checkpoint path or a model (not both)")
        device = str(device or "cpu")
        if device.startswith("cuda") and not torch.cuda.is_available():
            # lm_eval's command line passes --device cuda:0 unless told otherwise
            log.warning("device %s: CUDA is not available; running on the CPU", device)
            device = "cpu"
        device = check_device(device)
        if model is None:  # tokenizer: a source (directory, tokenizer.json, Hub id) or None
            if tokenizer is not None and not isinstance(tokenizer, str | os.PathLike):
                raise ValueError("tokenizer: with a checkpoint, give a tokenizer directory, a "
                                 "tokenizer.json or a Hub id (or pass model= with it)")  # fmt: skip
            model, tokenizer = load_model(checkpoint, tokenizer, dtype)
        elif tokenizer is None:
            raise ValueError("tokenizer: a model object needs its tokenizer")
        elif dtype is not None:
            raise ValueError("dtype: casts a loaded checkpoint; cast a model object yourself")
        if batch_size == "auto" or (isinstance(batch_size, str) and batch_size.startswith("auto")):
            batch_size = 16  # no memory probing on CPU: a fixed size that suits small models
        self.checkpoint = None if checkpoint is None else str(checkpoint)
        self.tokenizer = tokenizer
        self._vocab = int(tokenizer.vocab_size)
        # as lm_eval's hf model: contexts begin with what the tokenizer puts before a text
        # (Llama-3's <|begin_of_text|>), which is also the prefix of rolling and empty-context
        # requests; tokenizers without one (GPT-NeoX's) start from their end-of-text token
        self._text_prefix = text_prefix(tokenizer)
        self._prefix_id = start_token(tokenizer)
        self._eot_id = end_token(tokenizer)
        self._prefix_text = tokenizer.decode(self._text_prefix) if self._text_prefix else None
        self.unk = check_unk(tokenizer, unk)
        self.window = _as_int("window", window, 1, none_ok=True)
        self.max_gen_toks = _as_int("max_gen_toks", max_gen_toks, 1)
        self.scorer = Scorer(
            model,
            self._vocab,
            batch_size=_as_int("batch_size", batch_size, 1),
            device=device,
            max_length=_as_int("max_length", max_length, 2, none_ok=True),
            pad_token=self.eot_token_id,
            count_energy=_as_bool("count_energy", count_energy),
        )
        self._device = self.scorer.device
        eos = getattr(tokenizer, "eos_id", None)
        self._eos_text = tokenizer.decode([eos]) if isinstance(eos, int) else None
        self.replaced_chars: set[str] = set()

    # -- tokenizer ---------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self._eot_id

    @property
    def prefix_token_id(self) -> int:
        return self._prefix_id

    @property
    def max_length(self) -> int | None:
        return self.scorer.max_length

    @property
    def tokenizer_name(self) -> str:
        return type(self.tokenizer).__name__

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kw: Any) -> list:
        """Token ids of ``string``; unless ``add_special_tokens`` is False, after the ids the
        tokenizer puts before a text (none for most; Llama-3's ``<|begin_of_text|>``), which
        lm_eval's ``hf`` model adds too (not twice: a string that starts with it keeps its
        own)."""
        prefix = []
        if add_special_tokens is not False and self._text_prefix:
            if not (self._prefix_text and string.startswith(self._prefix_text)):
                prefix = list(self._text_prefix)
        string, missing = replace_unknown(self.tokenizer, string, self.unk)
        self.replaced_chars |= missing
        try:
            return prefix + list(self.tokenizer.encode(string))
        except ValueError as err:
            hint = UNK_HINT if hasattr(self.tokenizer, "chars") else ""
            raise ValueError(f"{err}{hint}") from err

    def tok_decode(self, tokens: Sequence[int], **kw: Any) -> str:
        return self.tokenizer.decode(list(tokens))

    # -- the three requests ------------------------------------------------------------------

    def _loglikelihood_tokens(
        self, requests: list[tuple[tuple[str, str], list[int], list[int]]], **kw: Any
    ) -> list[tuple[float, bool]]:
        pairs = []
        for _, context, continuation in requests:
            if not continuation:
                raise ValueError("continuation: a request has nothing to score (empty)")
            pairs.append((context or [self.prefix_token_id], continuation))
        scores = self.scorer.loglikelihood(pairs)
        out = []
        for (key, _, _), s in zip(requests, scores, strict=True):
            out.append((s.logprob, s.greedy))
            self.cache_hook.add_partial("loglikelihood", key, (s.logprob, s.greedy))
        return out

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        docs = [self.tok_encode(req.args[0], add_special_tokens=False) for req in requests]
        keep = [i for i, d in enumerate(docs) if d]
        if self.scorer.max_length is not None and self.window is None:
            scored = self._rolling_windows([docs[i] for i in keep])
        else:  # one pass per document, or spikemar's windows that restart from the prefix
            scored = self.scorer.loglikelihood_rolling(
                [docs[i] for i in keep], self.prefix_token_id, self.window
            )
        out = [0.0] * len(docs)  # an empty document has probability 1
        for i, s in zip(keep, scored, strict=True):
            out[i] = s
        for req, s in zip(requests, out, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, s)
        return out

    def _rolling_windows(self, docs: list[list[int]]) -> list[float]:
        """Documents longer than a model's ``max_length`` in lm_eval ``hf``'s windows (its own
        ``get_rolling_token_windows`` and ``make_disjoint_window``: each window predicts the
        next ``max_length`` tokens from the tokens just before them, the last one with as many
        earlier tokens as fit), so that the scores equal ``hf``'s on the same model."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        pairs, owner = [], []
        for n, doc in enumerate(docs):
            windows = get_rolling_token_windows(token_list=doc, prefix_token=self.prefix_token_id,
                                                max_seq_len=self.scorer.max_length,
                                                context_len=1)  # fmt: skip
            for context, continuation in map(make_disjoint_window, windows):
                pairs.append((context, continuation))
                owner.append(n)
        totals = [0.0] * len(docs)
        for n, score in zip(owner, self.scorer.loglikelihood(pairs), strict=True):
            totals[n] += score.logprob
        return totals

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        groups: dict[tuple, list[int]] = {}
        settings = []
        for n, req in enumerate(requests):
            context, gen_kwargs = req.args
            kwargs = dict(gen_kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            if self._eos_text and self._eos_text not in until:
                until.append(self._eos_text)  # as lm_eval's hf model: stop at end of text
            max_new = _as_int("max_gen_toks", kwargs.pop("max_gen_toks", self.max_gen_toks), 1)
            if kwargs.pop("do_sample", False) and float(kwargs.get("temperature", 0.0)) > 0:
                raise ValueError("gen_kwargs: spikemar generates greedily; do_sample is not "
                                 "supported")  # fmt: skip
            key = (tuple(until), max_new)
            groups.setdefault(key, []).append(n)
            settings.append((context, key))
        out = [""] * len(requests)
        for (until, max_new), members in groups.items():
            contexts = [self.tok_encode(settings[i][0]) or [self.prefix_token_id]
                        for i in members]  # fmt: skip
            texts = self.scorer.greedy_until(
                contexts, decode=self.tok_decode, stop=list(until), max_new_tokens=max_new
            )
            for i, t in zip(members, texts, strict=True):
                out[i] = t
                self.cache_hook.add_partial("generate_until", requests[i].args, t)
        return out

    # -- energy ------------------------------------------------------------------------------

    def energy_report(self, hardware: str = "45nm-fp32") -> EnergyReport:
        """The operations of every forward pass this model has run, priced under
        ``hardware``, per token position processed."""
        return self.scorer.energy_report(hardware)

    def get_model_info(self) -> dict[str, Any]:
        """What lm_eval puts into its results' ``config`` after the evaluation (so into the
        ``--output_path`` JSON): the checkpoint and, where operations were counted, the energy
        per token of the passes that produced the scores under every profile and the firing
        rates (:func:`~spikemar.eval.report.energy_summary`), as ``spikemar_energy``."""
        info: dict[str, Any] = {"spikemar_checkpoint": self.checkpoint,
                                "max_length": self.max_length}  # fmt: skip
        if self.scorer.counter is not None and self.scorer.positions:
            from .report import energy_summary

            info["spikemar_energy"] = energy_summary(self.energy_report())
        return info
