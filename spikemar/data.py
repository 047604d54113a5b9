"""Text data for the language models: token files, tokenized once and memory-mapped.

A corpus is a UTF-8 text file, a ``.jsonl`` file (one JSON object per line, its ``text`` field a
document) or a folder of ``.txt``/``.jsonl`` files (read recursively, in sorted order, hidden
files and folders left out). It is tokenized once, one file at a time, into ``train.bin`` and
``val.bin`` (``uint16`` while the vocabulary fits, ``uint32`` beyond, e.g. Llama-3's 128k) under a
folder named by a hash of the source's bytes and of the tokenizer, so a changed file or another
tokenizer never reads a stale cache, and a cached corpus is found without decoding it; the files
are memory-mapped. Documents are packed into one stream, separated by the tokenizer's
end-of-sequence token (a newline where it has none); the first 90 % of the stream is the training
split and the last 10 % validation; a batch is random windows of ``L + 1`` tokens (input and
next-token target).

Without a tokenizer the vocabulary is the sorted set of characters of the text, as nanoGPT's
``shakespeare_char`` does it: losses are then in nats per character, comparable with nanoGPT's
published numbers on Tiny Shakespeare. With one (:mod:`spikemar.tokenizer`, e.g. a pretrained
model's BPE) losses are in nats per token.

The default corpus is Tiny Shakespeare from the project's shared data folder
(``../shared/data/tinyshakespeare/input.txt`` beside the repository, or ``$SPIKEMAR_DATA``); any
corpus can be given instead. Nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ._io import atomic_write
from .tokenizer import CharTokenizer, Tokenizer, tokenizer_from_dict

__all__ = [
    "CharTokenizer",
    "TokenDataset",
    "corpus_files",
    "default_corpus",
    "prepare",
    "read_documents",
    "read_text",
]

TRAIN_FRACTION = 0.9
PROGRESS_BYTES = 16 << 20  # a corpus this large shows its tokenization (seconds or more)


def default_corpus() -> Path:
    """Tiny Shakespeare: ``$SPIKEMAR_DATA`` if set (an empty value counts as unset, not as the
    current folder), else the shared data folder beside the repo."""
    if os.environ.get("SPIKEMAR_DATA"):
        return Path(os.environ["SPIKEMAR_DATA"])
    repo = Path(__file__).resolve().parents[1]
    return repo.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


def read_text(path: str | os.PathLike) -> str:
    """Read a UTF-8 text file; clear errors for a missing, empty or binary file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: no text file at {path}")
    raw = path.read_bytes()
    if not raw:
        raise ValueError(f"path: {path} is empty; expected a UTF-8 text file")
    if b"\x00" in raw[:65536]:
        raise ValueError(f"path: {path} holds NUL bytes; expected a UTF-8 text file, not binary")
    try:
        return raw.decode("utf-8-sig")  # a byte-order mark (Windows editors write one) is no text
    except UnicodeDecodeError as err:
        raise ValueError(f"path: {path} is not UTF-8 text ({err})") from err


def _write_atomic(path: Path, data: bytes | np.ndarray) -> None:
    # named: a full disk reads "token cache: cannot write '.../train.bin' (No space left on
    # device)" with its errno, not a bare "[Errno 28]" about a temporary file
    with atomic_write(path, name="token cache") as tmp:
        tmp.write_bytes(data)


SUFFIXES = (".txt", ".jsonl")  # in any case: NOTES.TXT is a text file too


def _is_jsonl(path: Path) -> bool:
    return path.suffix.lower() == ".jsonl"


def corpus_files(path: str | os.PathLike) -> list[Path]:
    """The files a corpus is read from: the file itself, or a folder's ``.txt``/``.jsonl`` files
    (recursively, sorted by path). Hidden files and folders (``.git``, ``.ipynb_checkpoints``,
    an editor's ``.#draft.txt``) are not part of a corpus: Hugging Face ``datasets`` leaves them
    out of a data folder too."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"path: no text file or folder at {path}")
    files = sorted(
        f
        for f in path.rglob("*")
        if f.suffix.lower() in SUFFIXES
        and not any(part.startswith(".") for part in f.relative_to(path).parts)
        and f.is_file()
    )
    if not files:
        raise FileNotFoundError(f"path: the folder {path} holds no .txt or .jsonl file")
    return files


def _file_documents(f: Path) -> list[str]:
    """One file's documents: a text file is one, a ``.jsonl`` file each line's ``text``."""
    text = read_text(f)
    if not _is_jsonl(f):
        return [text]
    docs = []
    # lines end at "\n" only: str.splitlines also splits at U+2028, U+2029 and U+0085,
    # which JSON strings may hold unescaped (json.dumps(..., ensure_ascii=False) writes them)
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"path: {f} line {n} is not JSON ({err.msg})") from err
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ValueError(f"path: {f} line {n}: expected an object with a string 'text'")
        docs.append(record["text"])
    return docs


def read_documents(path: str | os.PathLike) -> list[str]:
    """The documents of a corpus: a text file (one document), a ``.jsonl`` file (each line's
    ``text``) or a folder of ``.txt``/``.jsonl`` files (see :func:`corpus_files`)."""
    docs = [d for f in corpus_files(path) for d in _file_documents(f)]
    if not any(docs):
        raise ValueError(f"path: {path} holds no text")
    return docs


def _source_digest(path: Path, files: list[Path], tokenizer: Tokenizer | None) -> str:
    """The cache key: the files' bytes (streamed, never decoded: a cached corpus of any size is
    found without being read into memory), a folder's file names, and the tokenizer."""
    h = hashlib.sha256()
    for f in files:
        if path.is_dir():
            h.update(f.relative_to(path).as_posix().encode() + b"\0")
        with f.open("rb") as fh:
            h.update(hashlib.file_digest(fh, "sha256").digest())
    if tokenizer is not None:
        h.update(json.dumps(tokenizer.to_dict(), sort_keys=True).encode())
        prefix = tuple(getattr(tokenizer, "prefix_ids", ()))
        if prefix:  # documents start with it since 2026-12: caches made without it are stale
            h.update(f"prefix {prefix}".encode())
    return h.hexdigest()[:16]


def _char_tokenizer(files: list[Path]) -> CharTokenizer:
    """The sorted set of characters of a corpus (with the newline that separates documents
    where there are several), read one file at a time."""
    chars: set[str] = set()
    n_docs = 0
    for f in files:
        docs = _file_documents(f)
        n_docs += len(docs)
        for d in docs:
            chars.update(d)
    if n_docs > 1:
        chars.add("\n")
    return CharTokenizer("".join(sorted(chars or "\n")))  # no text: _encode says so


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _encode(
    path: Path, tokenizer: Tokenizer, files: list[Path], dtype: np.dtype, progress: bool = False
) -> tuple[np.ndarray, int]:
    """Every document encoded and packed, ``eos_id`` (or a newline) between documents, each
    preceded by the tokenizer's own start-of-text ids where it has them (``prefix_ids``:
    Llama-3's ``<|begin_of_text|>``, as ``tokenizer(text)`` puts it before every document).
    One file's text is in memory at a time, and the ids are kept in the token files' ``dtype``.
    Returns the ids and the number of documents. ``progress``: a bar over the files' bytes on
    a terminal, else a line before and after (a corpus of :data:`PROGRESS_BYTES` or more)."""
    sep = None
    prefix = np.asarray(getattr(tokenizer, "prefix_ids", ()), dtype=dtype)
    batch = getattr(tokenizer, "encode_batch", None)
    parts: list[np.ndarray] = []
    n_docs = 0
    text = False
    total = sum(f.stat().st_size for f in files)
    show = progress and total >= PROGRESS_BYTES
    bar = None
    if show and sys.stderr.isatty():
        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"tokenizing {path.name}")
    elif show:
        size = f"{total / 2**20:.0f} MiB, {_count(len(files), 'file')}"
        print(f"spikemar: tokenizing {path} ({size})", file=sys.stderr, flush=True)
    for f in files:
        docs = _file_documents(f)
        text = text or any(docs)
        for i in range(0, len(docs), 1024):
            chunk = docs[i : i + 1024]
            encoded = batch(chunk) if batch is not None else [tokenizer.encode(d) for d in chunk]
            for ids in encoded:
                if n_docs:
                    if sep is None:
                        eos = tokenizer.eos_id
                        sep = np.asarray([eos] if eos is not None else tokenizer.encode("\n"))
                        sep = sep.astype(dtype)
                    parts.append(sep)
                n_docs += 1
                if len(prefix):
                    parts.append(prefix)
                ids = np.asarray(ids, dtype=np.int64)
                if len(ids) and not 0 <= ids.min() <= ids.max() <= np.iinfo(dtype).max:
                    raise ValueError(
                        f"tokenizer: encoded an id outside 0..{np.iinfo(dtype).max} (its "
                        f"vocabulary of {tokenizer.vocab_size} sizes the token files' {dtype})"
                    )
                parts.append(ids.astype(dtype))
        if bar is not None:
            bar.update(f.stat().st_size)
    if bar is not None:
        bar.close()
    elif show:
        counts = f"{_count(n_docs, 'document')}, {_count(sum(map(len, parts)), 'token')}"
        print(f"spikemar: tokenized {path}: {counts}", file=sys.stderr, flush=True)
    if not text:
        raise ValueError(f"path: {path} holds no text")
    return np.concatenate(parts), n_docs


def prepare(
    path: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    tokenizer: Tokenizer | None = None,
    progress: bool = True,
) -> Path:
    """Tokenize a corpus once into ``train.bin``, ``val.bin`` and ``meta.json``; returns the folder.

    ``tokenizer`` None builds a character vocabulary from the text. The folder is keyed by the
    hash of the source's content and the tokenizer under ``cache_dir`` (default
    ``~/.cache/spikemar/data``); each file is written to a temporary name and renamed, and
    ``meta.json`` last, so an interrupted run leaves no half-written cache, and one that fails
    part-way (a full disk: ``OSError`` "token cache: cannot write PATH (reason)", with its
    errno; Ctrl-C) removes the files it wrote. ``progress``: show the tokenization of a corpus
    of 16 MiB or more (a bar on a terminal, else two lines).
    """
    if path is None and not default_corpus().exists():
        raise FileNotFoundError(
            f"data: no Tiny Shakespeare at {default_corpus()} (the default corpus); give --data "
            "FILE (any UTF-8 text), set SPIKEMAR_DATA, or save https://raw.githubusercontent.com"
            "/karpathy/char-rnn/master/data/tinyshakespeare/input.txt (1.1 MB) there"
        )
    path = Path(path) if path is not None else default_corpus()
    files = corpus_files(path)
    digest = _source_digest(path, files, tokenizer)
    root = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "spikemar" / "data"
    folder = root / f"{path.stem}-{digest}"
    if _complete(folder):
        return folder  # else (a token file deleted or cut short) tokenized again
    if tokenizer is None:
        tokenizer = _char_tokenizer(files)
    if tokenizer.vocab_size > np.iinfo(np.uint32).max:
        raise ValueError(f"tokenizer: a vocabulary of {tokenizer.vocab_size} does not fit uint32")
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32)
    ids, n_docs = _encode(path, tokenizer, files, dtype, progress)
    n_train = int(len(ids) * TRAIN_FRACTION)
    if n_train < 2 or len(ids) - n_train < 2:
        raise ValueError(
            f"path: {path} has {len(ids)} tokens, too few for a 90/10 split with at least "
            "2 tokens in each part"
        )
    meta = {"source": str(path), "sha256_16": digest, "tokenizer": tokenizer.to_dict(),
            "dtype": np.dtype(dtype).name, "documents": n_docs,
            "train_tokens": n_train, "val_tokens": len(ids) - n_train}  # fmt: skip
    # the splits are written from the array itself (no bytes copy); meta.json last: marks done
    parts = [("train.bin", ids[:n_train]), ("val.bin", ids[n_train:]),
             ("meta.json", json.dumps(meta, indent=1).encode())]  # fmt: skip
    written = []
    try:
        for name, data in parts:
            _write_atomic(folder / name, data)
            written.append(folder / name)
    except BaseException:
        # a full disk or an interrupt between files: the token files written so far are no
        # cache without meta.json, only room taken on a disk that may be full (unless another
        # run finished the same cache meanwhile: then they are its files)
        if not _complete(folder):
            for f in written:
                f.unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # not empty: another run's files
                folder.rmdir()
        raise
    return folder


def _complete(folder: Path) -> bool:
    """Whether a cache folder holds ``meta.json`` and both token files at the sizes it names."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        itemsize = np.dtype(meta.get("dtype", "uint16")).itemsize
        return all(
            (folder / f"{split}.bin").stat().st_size == int(meta[f"{split}_tokens"]) * itemsize
            for split in ("train", "val")
        )
    except (OSError, ValueError, KeyError, TypeError):  # missing, unreadable or not this layout
        return False


class TokenDataset:
    """Memory-mapped token splits of a prepared corpus, sampled as random windows."""

    def __init__(self, folder: str | os.PathLike) -> None:
        folder = Path(folder)
        meta_path = folder / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"folder: {folder} is not a prepared corpus (no meta.json)")
        self.meta = json.loads(meta_path.read_text())
        self.tokenizer = tokenizer_from_dict(self.meta["tokenizer"])
        dtype = np.dtype(self.meta.get("dtype", "uint16"))
        self.splits = {
            name: np.memmap(folder / f"{name}.bin", dtype=dtype, mode="r")
            for name in ("train", "val")
        }

    @classmethod
    def from_text_file(
        cls,
        path: str | os.PathLike | None = None,
        cache_dir: str | os.PathLike | None = None,
        tokenizer: Tokenizer | None = None,
    ) -> TokenDataset:
        """A text file, a ``.jsonl`` file or a folder of them (see :func:`prepare`)."""
        return cls(prepare(path, cache_dir, tokenizer))

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def _split(self, split: str) -> np.ndarray:
        if split not in self.splits:
            raise ValueError(f"split: expected 'train' or 'val', got {split!r}")
        return self.splits[split]

    def batch(
        self, split: str, batch_size: int, L: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs, targets)``, each [batch_size, L] int64; targets are inputs shifted by one."""
        data = self._split(split)
        if L < 1 or batch_size < 1:
            raise ValueError(f"batch_size and L: expected >= 1, got {batch_size} and {L}")
        if len(data) < L + 1:
            raise ValueError(f"L: {L} + 1 tokens exceed the {len(data)} of the {split!r} split")
        starts = torch.randint(len(data) - L, (batch_size,), generator=generator)
        windows = np.stack([data[s : s + L + 1] for s in starts.tolist()]).astype(np.int64)
        windows = torch.from_numpy(windows)
        return windows[:, :-1], windows[:, 1:]

    def windows(self, split: str, L: int, max_windows: int | None = None) -> torch.Tensor:
        """Consecutive, non-overlapping windows of ``L + 1`` tokens from the start of a split
        (inputs ``w[:, :-1]``, targets ``w[:, 1:]``): [n, L + 1] int64, deterministic."""
        data = self._split(split)
        if L < 1:
            raise ValueError(f"L: expected >= 1, got {L}")
        n = (len(data) - 1) // L
        if max_windows is not None:
            n = min(n, max_windows)
        if n < 1:
            raise ValueError(f"L: {L} + 1 tokens exceed the {len(data)} of the {split!r} split")
        out = np.stack([data[i * L : i * L + L + 1] for i in range(n)]).astype(np.int64)
        return torch.from_numpy(out)
