"""The data path: tokenizer round trips, nanoGPT's split, memory-mapped batches, bad files."""

from pathlib import Path

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given

from spikemar.data import CharTokenizer, TokenDataset, default_corpus, prepare, read_text

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 40


@given(st.text(min_size=1, max_size=200))
def test_tokenizer_round_trip(text):
    tok = CharTokenizer.from_text(text)
    assert tok.decode(tok.encode(text)) == text
    assert CharTokenizer.from_dict(tok.to_dict()) == tok


def test_vocabulary_is_sorted_characters_like_nanogpt():
    tok = CharTokenizer.from_text("banana!")
    assert tok.chars == "!abn" and tok.encode("nab") == [3, 1, 2]


def test_unknown_characters_and_ids_are_rejected():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(ValueError, match="not in the tokenizer"):
        tok.encode("abz")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([0, 5])


def test_prepare_splits_90_10_and_batches_are_shifted_windows(tmp_path):
    src = tmp_path / "corpus.txt"
    src.write_text(TEXT)
    ds = TokenDataset.from_text_file(src, cache_dir=tmp_path / "cache")
    n = len(TEXT)
    assert len(ds.splits["train"]) == int(0.9 * n)
    assert len(ds.splits["val"]) == n - int(0.9 * n)
    x, y = ds.batch("train", 8, 16, generator=torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (8, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert ds.tokenizer.decode(x[0]) in TEXT


def test_prepare_is_cached_and_keyed_by_content(tmp_path):
    src = tmp_path / "corpus.txt"
    src.write_text(TEXT)
    a = prepare(src, tmp_path / "c")
    assert prepare(src, tmp_path / "c") == a
    src.write_text(TEXT + "more")
    assert prepare(src, tmp_path / "c") != a
    assert not list((tmp_path / "c").rglob(".*"))  # no temporary files left behind


@pytest.mark.parametrize(
    ("content", "match"),
    [(b"", "empty"), (b"\x00\x01binary", "binary"), (b"\xff\xfe\xfa", "UTF-8")],
)
def test_bad_files_are_rejected(tmp_path, content, match):
    f = tmp_path / "bad.txt"
    f.write_bytes(content)
    with pytest.raises(ValueError, match=match):
        read_text(f)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.txt"):
        prepare(tmp_path / "nope.txt", tmp_path)


def test_window_longer_than_split_is_rejected(tmp_path):
    src = tmp_path / "tiny.txt"
    src.write_text("abcdefghij" * 3)
    ds = TokenDataset.from_text_file(src, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="L"):
        ds.batch("val", 1, 50)
    with pytest.raises(ValueError, match="split"):
        ds.batch("test", 1, 2)


@pytest.mark.skipif(not default_corpus().is_file(), reason="Tiny Shakespeare not present")
def test_tiny_shakespeare_matches_nanogpt_vocabulary(tmp_path):
    ds = TokenDataset.from_text_file(cache_dir=tmp_path)
    assert ds.vocab_size == 65  # nanoGPT's shakespeare_char
    assert len(ds.splits["train"]) + len(ds.splits["val"]) == 1_115_394


def test_a_corpus_too_short_to_split_is_rejected(tmp_path):
    src = tmp_path / "short.txt"
    src.write_text("abc")
    with pytest.raises(ValueError, match="too few"):
        prepare(src, tmp_path / "c")


def test_an_empty_spikemar_data_is_unset(monkeypatch):
    from spikemar.data import default_corpus

    monkeypatch.delenv("SPIKEMAR_DATA", raising=False)
    shared = default_corpus()
    monkeypatch.setenv("SPIKEMAR_DATA", "")  # not Path(""), the current folder
    assert default_corpus() == shared
    monkeypatch.setenv("SPIKEMAR_DATA", "/corpus/x.txt")
    assert default_corpus() == Path("/corpus/x.txt")
