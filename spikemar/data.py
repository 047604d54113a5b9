"""Text data for the language models: a character tokenizer and memory-mapped token files.

As nanoGPT's ``shakespeare_char`` does it: the vocabulary is the sorted set of characters of the
text, the first 90 % of the text is the training split and the last 10 % validation, tokens are
stored as ``uint16`` files that are memory-mapped, and a batch is random windows of ``L + 1``
tokens (input and next-token target). Losses are then in nats per character, comparable with
nanoGPT's published numbers on Tiny Shakespeare.

The default corpus is Tiny Shakespeare from the project's shared data folder
(``../shared/data/tinyshakespeare/input.txt`` beside the repository, or ``$SPIKEMAR_DATA``); any
UTF-8 text file can be given instead. Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "CharTokenizer",
    "TokenDataset",
    "default_corpus",
    "prepare",
    "read_text",
]

TRAIN_FRACTION = 0.9


def default_corpus() -> Path:
    """Tiny Shakespeare: ``$SPIKEMAR_DATA`` if set, else the shared data folder beside the repo."""
    if "SPIKEMAR_DATA" in os.environ:
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
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"path: {path} is not UTF-8 text ({err})") from err


@dataclass(frozen=True)
class CharTokenizer:
    """One token per character of a fixed alphabet (nanoGPT's character-level vocabulary)."""

    chars: str

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        if not text:
            raise ValueError("text: expected a non-empty string to build the vocabulary from")
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

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
        ids = tokens.tolist() if hasattr(tokens, "tolist") else list(tokens)
        bad = [i for i in ids if not 0 <= int(i) < self.vocab_size]
        if bad:
            raise ValueError(f"tokens: ids {bad[:5]} outside the vocabulary [0, {self.vocab_size})")
        return "".join(self.chars[int(i)] for i in ids)

    def to_dict(self) -> dict:
        return {"kind": "char", "chars": self.chars}

    @classmethod
    def from_dict(cls, d: dict) -> CharTokenizer:
        if d.get("kind") != "char" or not isinstance(d.get("chars"), str):
            raise ValueError(f"tokenizer: expected {{'kind': 'char', 'chars': str}}, got {d!r}")
        return cls(d["chars"])


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def prepare(
    path: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None
) -> Path:
    """Tokenize a text file once into ``train.bin``, ``val.bin`` (uint16) and ``meta.json``.

    The folder is keyed by the file's content hash under ``cache_dir`` (default
    ``~/.cache/spikemar/data``), each file written to a temporary name and renamed, so an
    interrupted run leaves no half-written split. Returns the folder.
    """
    path = Path(path) if path is not None else default_corpus()
    text = read_text(path)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    root = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "spikemar" / "data"
    folder = root / f"{path.stem}-{digest}"
    if (folder / "meta.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = CharTokenizer.from_text(text)
    if tokenizer.vocab_size > np.iinfo(np.uint16).max:
        raise ValueError(f"path: {path} has {tokenizer.vocab_size} distinct characters (max 65535)")
    ids = np.array(tokenizer.encode(text), dtype=np.uint16)
    n_train = int(len(ids) * TRAIN_FRACTION)
    if n_train < 2 or len(ids) - n_train < 2:
        raise ValueError(
            f"path: {path} has {len(ids)} characters, too few for a 90/10 split with at least "
            "2 tokens in each part"
        )
    _write_atomic(folder / "train.bin", ids[:n_train].tobytes())
    _write_atomic(folder / "val.bin", ids[n_train:].tobytes())
    meta = {"source": str(path), "sha256_16": digest, "tokenizer": tokenizer.to_dict(),
            "train_tokens": n_train, "val_tokens": len(ids) - n_train}  # fmt: skip
    _write_atomic(folder / "meta.json", json.dumps(meta, indent=1).encode())  # last: marks done
    return folder


class TokenDataset:
    """Memory-mapped token splits of a prepared corpus, sampled as random windows."""

    def __init__(self, folder: str | os.PathLike) -> None:
        folder = Path(folder)
        meta_path = folder / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"folder: {folder} is not a prepared corpus (no meta.json)")
        self.meta = json.loads(meta_path.read_text())
        self.tokenizer = CharTokenizer.from_dict(self.meta["tokenizer"])
        self.splits = {
            name: np.memmap(folder / f"{name}.bin", dtype=np.uint16, mode="r")
            for name in ("train", "val")
        }

    @classmethod
    def from_text_file(
        cls, path: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None
    ) -> TokenDataset:
        return cls(prepare(path, cache_dir))

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def batch(
        self, split: str, batch_size: int, L: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs, targets)``, each [batch_size, L] int64; targets are inputs shifted by one."""
        if split not in self.splits:
            raise ValueError(f"split: expected 'train' or 'val', got {split!r}")
        data = self.splits[split]
        if L < 1 or batch_size < 1:
            raise ValueError(f"batch_size and L: expected >= 1, got {batch_size} and {L}")
        if len(data) < L + 1:
            raise ValueError(f"L: {L} + 1 tokens exceed the {len(data)} of the {split!r} split")
        starts = torch.randint(len(data) - L, (batch_size,), generator=generator)
        windows = np.stack([data[s : s + L + 1] for s in starts.tolist()]).astype(np.int64)
        windows = torch.from_numpy(windows)
        return windows[:, :-1], windows[:, 1:]
