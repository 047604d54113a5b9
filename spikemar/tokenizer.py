"""Tokenizers: text to token ids and back, for character-level and pretrained models.

One small interface, :class:`Tokenizer`: ``encode(text) -> list[int]``, ``decode(ids) -> str``,
``vocab_size``, ``to_dict()`` (plain data, stored in spikemar checkpoints so the tokenizer travels
with the weights) and ``save(directory)``; :func:`load_tokenizer` and :func:`tokenizer_from_dict`
read them back. Two kinds:

* :class:`CharTokenizer`: one token per character of a fixed alphabet (nanoGPT's Tiny Shakespeare
  vocabulary); ``{"kind": "char", "chars": ...}``.
* :class:`HFTokenizer`: a Hugging Face ``tokenizers.Tokenizer`` (BPE for Mamba-2 and Llama-3),
  read from a checkpoint directory's ``tokenizer.json``, or through transformers' ``AutoTokenizer``
  when the directory holds only other formats (its fast tokenizer is the same object);
  ``{"kind": "hf", "json": <tokenizer.json text>, "eos_id": ...}``.

:func:`generate_text` is text in, text out for any spikemar language model.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from ._numbers import integer

__all__ = [
    "CHAR_TOKENIZER_FILE",
    "CharTokenizer",
    "HFTokenizer",
    "Tokenizer",
    "generate_text",
    "is_lfs_pointer",
    "load_tokenizer",
    "tokenizer_from_dict",
]

# the file a CharTokenizer saves into a directory (a Hugging Face tokenizer saves tokenizer.json)
CHAR_TOKENIZER_FILE = "spikemar_tokenizer.json"


# how a file that a clone without git-lfs left as a pointer begins (weights, tokenizer.json)
GIT_LFS_POINTER = b"version https://git-lfs.github.com/spec/"


def is_lfs_pointer(path: str | os.PathLike) -> bool:
    """Whether the file at ``path`` is a Git LFS pointer (a clone without git-lfs holds these
    in place of large files)."""
    with open(path, "rb") as f:
        return f.read(len(GIT_LFS_POINTER)) == GIT_LFS_POINTER


@runtime_checkable
class Tokenizer(Protocol):
    """What spikemar needs of a tokenizer."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def eos_id(self) -> int | None: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, tokens: torch.Tensor | np.ndarray | list[int]) -> str: ...

    def to_dict(self) -> dict[str, Any]: ...

    def save(self, directory: str | os.PathLike) -> Path: ...


def _ids(tokens: torch.Tensor | np.ndarray | list[int]) -> list[int]:
    if getattr(tokens, "ndim", 1) != 1:
        raise ValueError(f"tokens: expected a 1-d sequence of ids, got shape {tuple(tokens.shape)}")
    return [int(i) for i in (tokens.tolist() if hasattr(tokens, "tolist") else tokens)]


@dataclass(frozen=True)
class CharTokenizer:
    """One token per character of a fixed alphabet (nanoGPT's character-level vocabulary)."""

    chars: str

    def __post_init__(self) -> None:
        # the alphabet is the vocabulary: a repeated character would get two ids and decode
        # ambiguously (use from_text to build one from a corpus)
        if not isinstance(self.chars, str) or not self.chars:
            raise ValueError(f"chars: expected a non-empty string, got {self.chars!r}")
        if len(set(self.chars)) != len(self.chars):
            repeated = sorted({c for c in self.chars if self.chars.count(c) > 1})
            raise ValueError(
                f"chars: expected each character once, got repeats of {repeated[:10]!r} "
                "(CharTokenizer.from_text(text) builds the alphabet of a text)"
            )

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        if not text:
            raise ValueError("text: expected a non-empty string to build the vocabulary from")
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    @property
    def eos_id(self) -> int | None:
        return None

    @property
    def prefix_ids(self) -> tuple[int, ...]:
        """No token starts a text (see :attr:`HFTokenizer.prefix_ids`)."""
        return ()

    def encode(self, text: str) -> list[int]:
        index = {c: i for i, c in enumerate(self.chars)}
        unknown = sorted({c for c in text if c not in index})
        if unknown:
            raise ValueError(
                f"text: characters {unknown[:10]!r} are not in the tokenizer's vocabulary "
                f"of {self.vocab_size}"
            )
        return [index[c] for c in text]

    def decode(self, tokens: torch.Tensor | np.ndarray | list[int]) -> str:
        ids = _ids(tokens)
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"tokens: ids {bad[:5]} outside the vocabulary [0, {self.vocab_size})")
        return "".join(self.chars[i] for i in ids)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "char", "chars": self.chars}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CharTokenizer:
        if d.get("kind") != "char" or not isinstance(d.get("chars"), str):
            raise ValueError(f"tokenizer: expected {{'kind': 'char', 'chars': str}}, got {d!r}")
        return cls(d["chars"])

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``spikemar_tokenizer.json`` into ``directory``; returns the file."""
        path = Path(directory) / CHAR_TOKENIZER_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict()))
        return path


class HFTokenizer:
    """A Hugging Face ``tokenizers.Tokenizer`` behind spikemar's interface.

    ``encode`` adds no special tokens (spikemar packs documents itself, with ``eos_id`` between
    them); ``decode`` keeps them unless ``skip_special_tokens``. Ids at or past the tokenizer's
    vocabulary (models pad their embedding, e.g. Mamba-2's 50277 → 50288) decode to nothing.
    """

    def __init__(self, tokenizer: Any, eos_id: int | None = None) -> None:
        from tokenizers import Tokenizer as _HF

        if not isinstance(tokenizer, _HF):
            raise TypeError(
                f"tokenizer: expected a tokenizers.Tokenizer, got {type(tokenizer).__name__}"
            )
        self._tokenizer = tokenizer
        self._json = tokenizer.to_str()
        if eos_id is not None:
            # NumPy's ids as Python's: to_dict's goes into checkpoints (weights_only=True)
            if integer(eos_id) is None:
                raise ValueError(f"eos_id: expected a token id (an int) or None, got {eos_id!r}")
            eos_id = integer(eos_id)
            if not 0 <= eos_id < self.vocab_size:
                raise ValueError(f"eos_id: {eos_id} outside the vocabulary of {self.vocab_size}")
        self._eos_id = eos_id

    @classmethod
    def from_file(cls, path: str | os.PathLike, eos_id: int | None = None) -> HFTokenizer:
        from tokenizers import Tokenizer as _HF

        path = Path(path)
        try:
            tok = _HF.from_file(str(path))
        except Exception as err:  # tokenizers raises a bare Exception on bad JSON
            lfs = is_lfs_pointer(path)  # a clone without git-lfs holds pointers, not the file
            why = "a Git LFS pointer, not the file: run git lfs pull" if lfs else str(err)
            raise ValueError(f"tokenizer: {path} is not a readable tokenizer.json ({why})") from err
        return cls(tok, eos_id)

    @classmethod
    def from_directory(cls, directory: str | os.PathLike) -> HFTokenizer:
        """``tokenizer.json`` of a checkpoint directory, else transformers' ``AutoTokenizer``
        (local files only); the end-of-sequence id from ``tokenizer_config.json`` or
        ``config.json``. Where ``tokenizer_config.json`` names a class that builds the
        special-token template from ``add_bos_token``/``add_eos_token`` (LlamaTokenizerFast,
        GPTNeoXTokenizerFast, ...), the template is the one AutoTokenizer builds, not the
        file's: ``add_bos_token: false`` means no BOS (:attr:`prefix_ids`)."""
        directory = Path(directory)
        eos = _eos_from_directory(directory)
        if (directory / "tokenizer.json").is_file():
            tok = cls.from_file(directory / "tokenizer.json")
            if _post_processor_rebuilt(directory):
                # the template transformers builds from add_bos_token/add_eos_token replaces the
                # file's: its BOS (or none) is what the model was trained with. Only where the
                # ids differ: a tokenizer equal in use (GPT-NeoX's) keeps its JSON, which
                # checkpoints already saved with it compare equal to
                try:
                    auto = _auto_tokenizer(directory).backend_tokenizer
                except ValueError:
                    # transformers cannot build this directory's tokenizer at all (e.g. asked to
                    # rebuild from a slow tokenizer.model it lacks): no template of its to
                    # match; the file's, as spikemar read such a directory before
                    auto = None
                if auto is not None and auto.encode("a").ids != tok._tokenizer.encode("a").ids:
                    tok._tokenizer.post_processor = auto.post_processor
            # config.json's id is the model's: one past the tokenizer's ids names no token of it
            # (transformers' AutoTokenizer never reads it), as for a tokenizer from elsewhere
            eos_id = integer(eos)  # a JSON true is no id
            eos_id = eos_id if eos_id is not None and 0 <= eos_id < tok.vocab_size else None
            if isinstance(eos, str):
                eos_id = tok._tokenizer.token_to_id(eos)
            return cls(tok._tokenizer, eos_id)
        # the vocabulary files of transformers' other formats (a tokenizer_config.json alone,
        # as HFTokenizer.save writes beside tokenizer.json, is no tokenizer)
        others = ("tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
        vocabulary = [*directory.glob("*.model"), *directory.glob("*.tiktoken")]
        if not vocabulary and not any((directory / f).is_file() for f in others):
            raise FileNotFoundError(
                f"tokenizer: {directory} has no tokenizer (expected tokenizer.json, or "
                f"{', '.join(others)} for transformers' AutoTokenizer)"
            )
        auto = _auto_tokenizer(directory)
        return cls(auto.backend_tokenizer, auto.eos_token_id)

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def eos_id(self) -> int | None:
        return self._eos_id

    @functools.cached_property
    def prefix_ids(self) -> tuple[int, ...]:
        """The ids the tokenizer's own post-processor puts before every text when asked for
        special tokens: Llama-3's (so Llamba's) ``<|begin_of_text|>``, which its model saw at
        the start of every document; ``()`` for tokenizers without one (GPT-NeoX's, used by
        Mamba-2: an end-of-text token separates documents instead). :meth:`encode` leaves them
        out; the training data and the evaluation put them in (as transformers' and lm_eval's
        ``tokenizer(text)`` do)."""
        raw = self._tokenizer
        for probe in ("a", "text", "0"):  # a probe the vocabulary cannot encode gives no ids
            plain = raw.encode(probe, add_special_tokens=False).ids
            if plain:
                break
        full = raw.encode(probe, add_special_tokens=True).ids
        for k in range(len(full) - len(plain) + 1):
            if full[k : k + len(plain)] == plain:
                return tuple(full[:k])
        return ()

    def with_eos_id(self, eos_id: int | None) -> HFTokenizer:
        """The same tokenizer with another end-of-text id."""
        return HFTokenizer(self._tokenizer, eos_id)

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text: expected a str, got {type(text).__name__}")
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Many texts at once (the tokenizers library runs them on its own threads)."""
        return [e.ids for e in self._tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(
        self, tokens: torch.Tensor | np.ndarray | list[int], skip_special_tokens: bool = False
    ) -> str:
        ids = _ids(tokens)
        negative = [i for i in ids if i < 0]
        if negative:
            raise ValueError(f"tokens: negative ids {negative[:5]}")
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "hf", "json": self._json, "eos_id": self._eos_id}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HFTokenizer:
        from tokenizers import Tokenizer as _HF

        if d.get("kind") != "hf" or not isinstance(d.get("json"), str):
            raise ValueError(
                f"tokenizer: expected {{'kind': 'hf', 'json': str}}, got keys {sorted(d)}"
            )
        eos_id = d.get("eos_id")
        if isinstance(eos_id, bool):
            # saved before from_directory read config.json's "eos_token_id": true as no id: the
            # old code took it as an id, yet only by accident (packing wrote token int(True),
            # generation refused it, lm_eval's end token fell back to "\n"). It loads as no
            # end-of-text token, as the same directory now reads, so the two compare equal.
            eos_id = None
        return cls(_HF.from_str(d["json"]), eos_id)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``tokenizer.json`` into ``directory`` (readable by tokenizers and transformers),
        and the end-of-text token, where there is one, as ``eos_token`` of
        ``tokenizer_config.json`` (the key transformers and :meth:`from_directory` read), and a
        single start-of-text token (:attr:`prefix_ids`) as its ``bos_token``; other keys of an
        existing file are kept. Returns the ``tokenizer.json`` path."""
        directory = Path(directory)
        config_path = directory / "tokenizer_config.json"
        config: dict[str, Any] | None = None
        if config_path.is_file():  # read (and refuse) before anything is written
            try:
                config = json.loads(config_path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise ValueError(f"directory: {config_path} is not JSON ({err})") from err
            if not isinstance(config, dict):
                raise ValueError(f"directory: {config_path} holds a JSON "
                                 f"{type(config).__name__}, not an object")  # fmt: skip
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "tokenizer.json"
        path.write_text(self._json)
        named = dict(config or {})
        if self._eos_id is not None:
            named["eos_token"] = self._tokenizer.id_to_token(self._eos_id)
        else:  # no end-of-text token: none named
            named.pop("eos_token", None)
        if len(self.prefix_ids) == 1:  # Llama-3's <|begin_of_text|>, as its own config names it:
            # transformers' bos_token_id, so lm_eval's HFLM starts an empty context with it too
            named["bos_token"] = self._tokenizer.id_to_token(self.prefix_ids[0])
        if named != (config or {}):
            if config is None:
                named = {"tokenizer_class": "PreTrainedTokenizerFast", **named}
            config_path.write_text(json.dumps(named, indent=2))
        return path

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, HFTokenizer):
            return NotImplemented
        return self._json == other._json and self._eos_id == other._eos_id

    def __hash__(self) -> int:
        return hash((self._json, self._eos_id))

    def __repr__(self) -> str:
        return f"HFTokenizer(vocab_size={self.vocab_size}, eos_id={self._eos_id})"


def _auto_tokenizer(directory: Path) -> Any:
    """transformers' ``AutoTokenizer`` of a directory (local files only, its fast form), its
    failures as one ValueError naming the directory."""
    try:
        from transformers import AutoTokenizer

        auto = AutoTokenizer.from_pretrained(directory, local_files_only=True, use_fast=True)
    except Exception as err:
        why = " ".join(str(err).split())
        why = why if len(why) <= 300 else why[:297] + "..."  # its texts list every model type
        raise ValueError(f"tokenizer: transformers cannot read the tokenizer in {directory} "
                         f"({type(err).__name__}: {why})") from err  # fmt: skip
    if getattr(auto, "backend_tokenizer", None) is None:
        raise ValueError(f"tokenizer: {directory}'s tokenizer has no fast (tokenizers) form")
    return auto


def _post_processor_rebuilt(directory: Path) -> bool:
    """Whether transformers' AutoTokenizer replaces ``tokenizer.json``'s post-processor for this
    directory: its ``tokenizer_config.json`` names a class (LlamaTokenizerFast,
    GPTNeoXTokenizerFast, ...) that builds the template from ``add_bos_token`` and
    ``add_eos_token`` and the class's defaults for them (``update_post_processor``), instead of
    keeping the file's, as PreTrainedTokenizerFast (Llama-3's) does."""
    try:
        name = json.loads((directory / "tokenizer_config.json").read_text()).get("tokenizer_class")
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False  # no such file, or not an object: AutoTokenizer has no class to go by there
    if not isinstance(name, str) or name in ("PreTrainedTokenizerFast", "PreTrainedTokenizer"):
        return False
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    try:  # AutoTokenizer takes the named class's fast form
        fast = tokenizer_class_from_name(name if name.endswith("Fast") else f"{name}Fast")
    except Exception:  # a class transformers cannot import: it names it when asked to load
        return False
    return fast is not None and callable(getattr(fast, "update_post_processor", None))


def _eos_from_directory(directory: Path) -> int | str | None:
    """The end-of-sequence token of a checkpoint directory, as an id or a token string."""
    for name, key in (("tokenizer_config.json", "eos_token"), ("config.json", "eos_token_id")):
        f = directory / name
        if f.is_file():
            try:
                value = json.loads(f.read_text()).get(key)
            except (json.JSONDecodeError, AttributeError):
                continue
            if isinstance(value, dict):  # AddedToken serialised as a dict
                value = value.get("content")
            if isinstance(value, list):
                value = value[0] if value else None
            if isinstance(value, int | str):
                return value
    return None


def tokenizer_from_dict(d: dict[str, Any]) -> CharTokenizer | HFTokenizer:
    """The tokenizer that ``to_dict()`` described (as stored in checkpoints and data caches)."""
    kinds = {"char": CharTokenizer, "hf": HFTokenizer}
    if not isinstance(d, dict) or d.get("kind") not in kinds:
        kind = d.get("kind") if isinstance(d, dict) else type(d).__name__
        raise ValueError(f"tokenizer: unknown kind {kind!r}; expected one of {sorted(kinds)}")
    return kinds[d["kind"]].from_dict(d)


def load_tokenizer(path: str | os.PathLike) -> CharTokenizer | HFTokenizer:
    """A tokenizer from a directory (``tokenizer.json``, ``spikemar_tokenizer.json``, or what
    transformers' AutoTokenizer reads) or from one of those files."""
    path = Path(path)
    if path.is_file():
        if path.name == CHAR_TOKENIZER_FILE:
            return tokenizer_from_dict(json.loads(path.read_text()))
        return HFTokenizer.from_file(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer: no file or directory at {path}")
    if (path / CHAR_TOKENIZER_FILE).is_file() and not (path / "tokenizer.json").is_file():
        return tokenizer_from_dict(json.loads((path / CHAR_TOKENIZER_FILE).read_text()))
    return HFTokenizer.from_directory(path)


@torch.no_grad()
def generate_text(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    prompt: str | list[str],
    max_new_tokens: int = 100,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    fused: bool = False,
    eos_token_id: int | list[int] | None = None,
) -> str | list[str]:
    """Continue ``prompt`` (text) by up to ``max_new_tokens`` tokens; returns prompt and
    continuation as text, stopped before ``eos_token_id``, by default the tokenizer's
    end-of-text token where it has one (``eos_id``; as transformers' ``generate`` stops).
    A list of prompts is generated as one batch (left-padded, each row continuing as it would
    alone: :func:`spikemar.models.generate`'s ``attention_mask``) and returns a list of texts.
    The model reads each prompt after the tokenizer's own start-of-text ids (``prefix_ids``:
    Llama-3's ``<|begin_of_text|>``), as ``tokenizer(prompt)`` gives them to transformers'
    ``generate``; they are not part of the returned text.
    ``temperature`` 0 is greedy, ``top_k``/``top_p`` keep the most likely tokens; ``fused``:
    one C call per token (see :func:`spikemar.models.generate`). The model's vocabulary must
    cover the tokenizer's."""
    from .models.generation import generate

    many = isinstance(prompt, list | tuple)
    prompts = list(prompt) if many else [prompt]
    if not prompts:
        raise ValueError("prompt: expected a non-empty string or a non-empty list of them")
    prefix = list(getattr(tokenizer, "prefix_ids", ()))
    model_vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    rows = []
    for n, text in enumerate(prompts):
        name = f"prompt[{n}]" if many else "prompt"
        if not isinstance(text, str) or not text:
            raise ValueError(f"{name}: expected a non-empty string, got {text!r}")
        ids = tokenizer.encode(text)
        if not ids:
            raise ValueError(f"{name}: {text!r} encodes to no tokens")
        ids = prefix + ids
        if model_vocab is not None and max(ids) >= model_vocab:
            raise ValueError(
                f"tokenizer: ids up to {max(ids)} exceed the model's vocabulary of "
                f"{model_vocab}; the model and tokenizer do not belong together"
            )
        rows.append(ids)
    device = next(model.parameters()).device
    eos = eos_token_id
    if eos is None:
        eos = tokenizer.eos_id
        if eos is not None and model_vocab is not None and eos >= model_vocab:
            eos = None  # a token the model cannot make
    width = max(len(r) for r in rows)
    pads = [width - len(r) for r in rows]
    tokens = torch.tensor([[0] * p + r for p, r in zip(pads, rows, strict=True)], device=device)
    mask = None
    if any(pads):
        mask = torch.tensor([[0] * p + [1] * len(r) for p, r in zip(pads, rows, strict=True)],
                            device=device)  # fmt: skip
    try:
        out = generate(model, tokens, max_new_tokens, temperature=temperature, top_k=top_k,
                       top_p=top_p, generator=generator, fused=fused, eos_token_id=eos,
                       attention_mask=mask).cpu().tolist()  # fmt: skip
    except ValueError as err:  # the padding is this function's, not the caller's
        message = str(err)
        if not message.startswith("attention_mask: "):
            raise
        raise ValueError("prompt: " + message.removeprefix("attention_mask: ")) from err
    ends = set() if eos is None else set(eos) if isinstance(eos, list | tuple) else {eos}
    texts = []
    for row, pad in zip(out, pads, strict=True):
        for n in range(width, len(row)):
            if row[n] in ends:  # the continuation stops before the first end token
                row = row[:n]
                break
        texts.append(tokenizer.decode(row[pad + len(prefix) :]))
    return texts if many else texts[0]
