"""Tokenizers (character and Hugging Face BPE), corpora of files and folders, text generation."""

import json

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from references.hf_checkpoints import begin_of_text_tokenizer, bpe_tokenizer

from spikemar.checkpoint import load_checkpoint, save_checkpoint
from spikemar.data import TokenDataset, corpus_files, prepare, read_documents
from spikemar.models import MARLM, MARConfig
from spikemar.tokenizer import (
    CharTokenizer,
    HFTokenizer,
    Tokenizer,
    generate_text,
    load_tokenizer,
    tokenizer_from_dict,
)

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 40


def bpe(vocab_size: int = 300, text: str = TEXT) -> HFTokenizer:
    """A byte-level BPE trained here, with an <|endoftext|> special token (id 0)."""
    return bpe_tokenizer(vocab_size, text)


@pytest.fixture(scope="module")
def tok():
    return bpe()


def test_both_kinds_speak_the_interface(tok):
    char = CharTokenizer.from_text(TEXT)
    for t in (char, tok):
        assert isinstance(t, Tokenizer)
        ids = t.encode("hear me speak")
        assert t.decode(ids) == "hear me speak" and t.decode(torch.tensor(ids)) == "hear me speak"
        assert tokenizer_from_dict(t.to_dict()) == t
    assert tok.vocab_size == 300 and tok.eos_id == 0
    assert len(tok.encode("hear me speak")) < len("hear me speak")  # merges happened


@given(st.text(max_size=80))
def test_byte_level_bpe_round_trips_any_text(text):
    t = _TOK
    assert t.decode(t.encode(text)) == text


_TOK = bpe()


def test_save_and_load_directories(tmp_path, tok):
    tok.save(tmp_path / "bpe")
    assert tok.eos_id is not None
    assert load_tokenizer(tmp_path / "bpe") == tok  # the end-of-text token comes back too
    from transformers import AutoTokenizer  # and transformers reads the directory as its own

    auto = AutoTokenizer.from_pretrained(tmp_path / "bpe", local_files_only=True)
    assert auto.eos_token_id == tok.eos_id and auto.encode("me") == tok.encode("me")
    (tmp_path / "plain").mkdir()  # an existing tokenizer_config.json keeps its other keys
    (tmp_path / "plain" / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 7}))
    tok.save(tmp_path / "plain")
    kept = json.loads((tmp_path / "plain" / "tokenizer_config.json").read_text())
    assert kept["model_max_length"] == 7 and kept["eos_token"] == "<|endoftext|>"
    HFTokenizer(tok._tokenizer).save(tmp_path / "no_eos")
    assert load_tokenizer(tmp_path / "no_eos") == HFTokenizer(tok._tokenizer)
    assert not (tmp_path / "no_eos" / "tokenizer_config.json").exists()
    assert load_tokenizer(tmp_path / "bpe" / "tokenizer.json").encode("me") == tok.encode("me")
    char = CharTokenizer.from_text("abc")
    char.save(tmp_path / "char")
    assert load_tokenizer(tmp_path / "char") == char


def test_a_start_of_text_token_is_saved_as_the_bos_token(tmp_path):
    # Llama-3's tokenizer_config.json names <|begin_of_text|> bos_token: transformers' (and so
    # lm_eval's) bos_token_id comes from it, not from the post-processor
    from transformers import AutoTokenizer

    tok = begin_of_text_tokenizer()
    tok.save(tmp_path)
    auto = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert auto.bos_token_id == 300 == tok.prefix_ids[0] and auto.eos_token_id == 0
    assert auto("me").input_ids == [300, *tok.encode("me")]
    assert load_tokenizer(tmp_path) == tok


def test_transformers_only_formats_go_through_auto_tokenizer(tmp_path, tok):
    # a GPT-2-style directory: vocab.json + merges.txt, no tokenizer.json
    tok._tokenizer.model.save(str(tmp_path))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "GPT2Tokenizer", "eos_token": "<|endoftext|>"})
    )
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, HFTokenizer) and loaded.eos_id == 0
    for text in ("hear me speak", TEXT[:50], "unseen: Zebra 42!"):
        assert loaded.encode(text) == tok.encode(text)


def test_missing_and_bad_tokenizers_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no tokenizer"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"not a readable tokenizer\.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="no file or directory"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(ValueError, match="unknown kind 'sentencepiece'"):
        tokenizer_from_dict({"kind": "sentencepiece"})


def test_folder_of_txt_and_jsonl_is_packed_with_eos(tmp_path, tok):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "a.txt").write_text(TEXT)
    lines = [json.dumps({"text": "hear me speak."}), "", json.dumps({"text": "Citizen"})]
    (corpus / "sub" / "b.jsonl").write_text("\n".join(lines))
    (corpus / "ignored.md").write_text("not read")
    assert read_documents(corpus) == [TEXT, "hear me speak.", "Citizen"]
    ds = TokenDataset.from_text_file(corpus, cache_dir=tmp_path / "c", tokenizer=tok)
    stream = np.concatenate([ds.splits["train"], ds.splits["val"]]).tolist()
    expected = [*tok.encode(TEXT), 0, *tok.encode("hear me speak."), 0, *tok.encode("Citizen")]
    assert stream == expected
    assert ds.tokenizer == tok and ds.vocab_size == 300 and ds.splits["train"].dtype == np.uint16
    w = ds.windows("train", 8, max_windows=3)
    assert w.shape == (3, 9) and w[1, 0] == w[0, 8] and w[0].tolist() == stream[:9]


def test_hidden_files_and_folders_are_not_part_of_a_corpus(tmp_path, tok):
    # a notebook's checkpoints, a repository's .git, an editor's lock file: not documents
    corpus = tmp_path / "corpus"
    for hidden in (".ipynb_checkpoints/a-checkpoint.txt", ".git/notes.txt", "sub/.#a.txt"):
        (corpus / hidden).parent.mkdir(parents=True, exist_ok=True)
        (corpus / hidden).write_text("stale copy")
    (corpus / "sub" / "a.txt").write_text(TEXT)
    assert corpus_files(corpus) == [corpus / "sub" / "a.txt"]
    assert read_documents(corpus) == [TEXT]
    ds = TokenDataset.from_text_file(corpus, cache_dir=tmp_path / "c", tokenizer=tok)
    assert ds.meta["documents"] == 1
    # a corpus folder that is itself under a hidden folder is still read
    nested = tmp_path / ".data" / "corpus"
    nested.mkdir(parents=True)
    (nested / "a.txt").write_text(TEXT)
    assert read_documents(nested) == [TEXT]
    (corpus / "sub" / "a.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"holds no \.txt or \.jsonl file"):
        corpus_files(corpus)


def test_a_cached_corpus_is_found_without_decoding_it(tmp_path, tok, monkeypatch):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text(TEXT)
    (corpus / "b.jsonl").write_text(json.dumps({"text": "hear me"}))
    folders = {prepare(corpus, tmp_path / "c", tok), prepare(corpus, tmp_path / "c")}
    import spikemar.data as data

    def unread(path):
        raise AssertionError(f"{path} decoded again")

    monkeypatch.setattr(data, "read_text", unread)
    assert {prepare(corpus, tmp_path / "c", tok), prepare(corpus, tmp_path / "c")} == folders
    monkeypatch.undo()
    # a renamed file is another corpus (documents are packed in sorted order of their names)
    (corpus / "a.txt").rename(corpus / "c.txt")
    assert prepare(corpus, tmp_path / "c", tok) not in folders


def test_documents_are_tokenized_a_file_at_a_time_as_one_stream(tmp_path, tok):
    # the streamed packing equals encoding the documents read as a whole
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(3):
        lines = [json.dumps({"text": f"{TEXT[: 20 + 7 * j]} {i}"}) for j in range(1500)]
        (corpus / f"{i}.jsonl").write_text("\n".join(lines))
    docs = read_documents(corpus)
    ds = TokenDataset.from_text_file(corpus, cache_dir=tmp_path / "c", tokenizer=tok)
    stream = np.concatenate([ds.splits["train"], ds.splits["val"]]).tolist()
    expected = []
    for d in docs:
        expected += [*([0] if expected else []), *tok.encode(d)]
    assert stream == expected and ds.meta["documents"] == 4500
    char = TokenDataset.from_text_file(corpus, cache_dir=tmp_path / "c")
    assert char.tokenizer == CharTokenizer.from_text("\n".join(docs))
    stream = np.concatenate([char.splits["train"], char.splits["val"]]).tolist()
    assert stream == char.tokenizer.encode("\n".join(docs))


def test_tokenizing_a_large_corpus_shows_progress(tmp_path, tok, capsys, monkeypatch):
    import spikemar.data as data

    (tmp_path / "t.txt").write_text(TEXT)
    prepare(tmp_path / "t.txt", tmp_path / "small", tok)
    assert capsys.readouterr().err == ""  # below PROGRESS_BYTES: silent
    monkeypatch.setattr(data, "PROGRESS_BYTES", 1)
    folder = prepare(tmp_path / "t.txt", tmp_path / "c", tok)
    err = capsys.readouterr().err.splitlines()
    tokens = TokenDataset(folder).meta["train_tokens"] + TokenDataset(folder).meta["val_tokens"]
    assert err[0].startswith(f"spikemar: tokenizing {tmp_path / 't.txt'} (0 MiB, 1 file)")
    assert err[1] == f"spikemar: tokenized {tmp_path / 't.txt'}: 1 document, {tokens} tokens"
    prepare(tmp_path / "t.txt", tmp_path / "c", tok)  # cached: nothing to show
    prepare(tmp_path / "t.txt", tmp_path / "quiet", tok, progress=False)
    assert capsys.readouterr().err == ""


def test_a_tokenizer_id_outside_the_token_files_dtype_is_refused(tmp_path):
    class Liar(CharTokenizer):  # says 65 ids, encodes one past uint16
        def encode(self, text):
            return [70000 for _ in text]

    (tmp_path / "t.txt").write_text(TEXT)
    with pytest.raises(ValueError, match=r"tokenizer: encoded an id outside 0\.\.65535"):
        prepare(tmp_path / "t.txt", tmp_path / "c", Liar.from_text(TEXT))
    assert not list((tmp_path / "c").rglob("*.bin"))


def test_a_jsonl_of_empty_texts_holds_no_text(tmp_path, tok):
    (tmp_path / "e.jsonl").write_text('{"text": ""}\n{"text": ""}\n')
    for tokenizer in (tok, None):
        with pytest.raises(ValueError, match="holds no text"):
            prepare(tmp_path / "e.jsonl", tmp_path / "c", tokenizer)


def test_documents_start_with_the_tokenizers_begin_of_text_token(tmp_path):
    """A tokenizer that puts a token before every text (Llama-3's <|begin_of_text|>, so
    Llamba's) has it before every packed document, as ``tokenizer(text)`` gives each document
    in training; the others' streams are unchanged (their caches too)."""
    tok = begin_of_text_tokenizer()
    assert tok.prefix_ids == (300,) and bpe_tokenizer(300).prefix_ids == ()
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": t}) for t in (TEXT, "hear me", "Citizen")))
    ds = TokenDataset.from_text_file(corpus, cache_dir=tmp_path / "c", tokenizer=tok)
    stream = np.concatenate([ds.splits["train"], ds.splits["val"]]).tolist()
    assert stream == [300, *tok.encode(TEXT), 0, 300, *tok.encode("hear me"), 0, 300,
                      *tok.encode("Citizen")]  # fmt: skip


def test_cache_is_keyed_by_tokenizer_and_content(tmp_path, tok):
    src = tmp_path / "t.txt"
    src.write_text(TEXT)
    char = prepare(src, tmp_path / "c")
    other = bpe(280)
    a, b = prepare(src, tmp_path / "c", tok), prepare(src, tmp_path / "c", other)
    assert len({char, a, b}) == 3 and prepare(src, tmp_path / "c", tok) == a
    assert TokenDataset(b).tokenizer == other


class WideTokenizer(CharTokenizer):
    """A character tokenizer claiming Llama-3's vocabulary size: ids must be stored in uint32."""

    @property
    def vocab_size(self) -> int:
        return 128256

    def encode(self, text):
        return [128255 - i for i in super().encode(text)]

    def to_dict(self):
        return {"kind": "char", "chars": self.chars, "wide": True}


def test_vocabularies_past_uint16_are_stored_as_uint32(tmp_path):
    src = tmp_path / "t.txt"
    src.write_text(TEXT)
    folder = prepare(src, tmp_path / "c", WideTokenizer.from_text(TEXT))
    train = np.memmap(folder / "train.bin", dtype=np.uint32, mode="r")
    assert json.loads((folder / "meta.json").read_text())["dtype"] == "uint32"
    assert int(train.max()) == 128255


@pytest.mark.parametrize(
    ("lines", "match"),
    [(["{bad"], "line 1 is not JSON"), (['{"txt": "a"}'], "string 'text'")],
)
def test_bad_jsonl_is_named(tmp_path, lines, match):
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(lines))
    with pytest.raises(ValueError, match=match):
        read_documents(f)


def test_jsonl_lines_end_at_newlines_only(tmp_path):
    """A JSON string may hold U+2028, U+2029 and U+0085 unescaped (json.dumps with
    ensure_ascii=False writes them so): they are text, not line ends; CRLF files read too."""
    texts = ["line\u2028separator", "paragraph\u2029separator and NEL\x85here", "plain"]
    lines = [json.dumps({"text": t, "id": i}, ensure_ascii=False) for i, t in enumerate(texts)]
    (tmp_path / "d.jsonl").write_text("\r\n".join(lines) + "\r\n", newline="")
    assert read_documents(tmp_path / "d.jsonl") == texts


def test_suffixes_are_matched_in_any_case(tmp_path):
    (tmp_path / "A.TXT").write_text("hear me")
    (tmp_path / "b.JSONL").write_text('{"text": "speak"}\n')
    (tmp_path / "c.md").write_text("not read")
    assert read_documents(tmp_path) == ["hear me", "speak"]
    assert read_documents(tmp_path / "b.JSONL") == ["speak"]  # a .JSONL file is JSON lines


def test_empty_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no \.txt or \.jsonl"):
        read_documents(tmp_path)


def test_checkpoints_carry_a_bpe_tokenizer_and_generate_text(tmp_path, tok):
    model = MARLM(MARConfig(vocab_size=tok.vocab_size, d_model=16, n_layers=1, d_state=4,
                            head_dim=8))  # fmt: skip
    save_checkpoint(tmp_path / "m.pt", model, tok)
    loaded, loaded_tok, _ = load_checkpoint(tmp_path / "m.pt")
    assert loaded_tok == tok
    text = generate_text(loaded, loaded_tok, "hear me", 5, temperature=0)
    ids = tok.encode("hear me")
    expected = loaded.generate(torch.tensor(ids), 5, temperature=0)
    assert text.startswith("hear me") and text == tok.decode(expected)
    with pytest.raises(ValueError, match="prompt"):
        generate_text(loaded, tok, "", 5)
    small = MARLM(MARConfig(vocab_size=10, d_model=16, n_layers=1, d_state=4, head_dim=8))
    with pytest.raises(ValueError, match="do not belong together"):
        generate_text(small, tok, "hear me speak", 2)


def test_generate_command_speaks_the_checkpoints_bpe(tmp_path, tok, capsys):
    from spikemar.cli import main

    model = MARLM(MARConfig(vocab_size=tok.vocab_size, d_model=16, n_layers=1, d_state=4,
                            head_dim=8))  # fmt: skip
    save_checkpoint(tmp_path / "m.pt", model, tok)
    code = main(["generate", "--checkpoint", str(tmp_path / "m.pt"), "--prompt", "hear me",
                 "--max-new-tokens", "4", "--temperature", "0"])  # fmt: skip
    printed = capsys.readouterr().out
    expected = generate_text(load_checkpoint(tmp_path / "m.pt")[0], tok, "hear me", 4,
                             temperature=0)  # fmt: skip
    assert code == 0 and printed.rstrip("\n") == expected.rstrip("\n")


def test_generate_command_reads_a_hugging_face_directory(tmp_path, capsys):
    # spikemar generate --checkpoint DIR: the transformers Mamba-2 with its own tokenizer, greedy
    # tokens as transformers' generate gives them; a directory without one needs --tokenizer
    from references.hf_checkpoints import write_mamba2_checkpoint

    from spikemar.cli import main

    hf = write_mamba2_checkpoint(tmp_path / "m")
    capsys.readouterr()
    argv = ["generate", "--checkpoint", str(tmp_path / "m"), "--prompt", "hear me",
            "--max-new-tokens", "5", "--temperature", "0"]  # fmt: skip
    assert main(argv) == 0
    tok = bpe(300)
    ids = torch.tensor([tok.encode("hear me")])
    want = hf.generate(ids, max_new_tokens=5, do_sample=False, eos_token_id=0, pad_token_id=0)
    made = want[0, ids.shape[1] :].tolist()
    made = made[: made.index(0)] if 0 in made else made
    assert capsys.readouterr().out.rstrip("\n") == tok.decode(ids[0].tolist() + made)
    write_mamba2_checkpoint(tmp_path / "bare", tokenizer=False)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main([*argv[:2], str(tmp_path / "bare"), *argv[3:]])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err.startswith("spikemar generate: error: --checkpoint: ") and "--tokenizer" in err
    assert main([*argv[:2], str(tmp_path / "bare"), *argv[3:], "--tokenizer",
                 str(tmp_path / "m")]) == 0  # fmt: skip


def test_char_tokenizer_refuses_a_repeated_character():
    with pytest.raises(ValueError, match="chars: expected each character once"):
        CharTokenizer("abca")
    assert CharTokenizer.from_text("abca").chars == "abc"


def test_a_byte_order_mark_is_not_text(tmp_path, tok):
    # Windows editors start UTF-8 files with one: a .jsonl's first line is still JSON
    (tmp_path / "a.jsonl").write_text('{"text": "hear me"}\n{"text": "speak"}\n', "utf-8-sig")
    (tmp_path / "b.txt").write_text("hear me speak", "utf-8-sig")
    assert read_documents(tmp_path) == ["hear me", "speak", "hear me speak"]


@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_a_damaged_token_cache_is_tokenized_again(tmp_path, tok, damage):
    (tmp_path / "t.txt").write_text(TEXT)
    folder = prepare(tmp_path / "t.txt", tmp_path / "c", tok)
    expected = np.fromfile(folder / "train.bin", dtype=np.uint16)
    if damage == "delete":
        (folder / "train.bin").unlink()
    else:
        (folder / "val.bin").write_bytes((folder / "val.bin").read_bytes()[:3])
    assert prepare(tmp_path / "t.txt", tmp_path / "c", tok) == folder
    ds = TokenDataset(folder)
    assert np.array_equal(ds.splits["train"], expected)
    assert len(ds.splits["val"]) == ds.meta["val_tokens"]


def test_a_pretrained_model_saves_and_loads_with_its_bpe(tmp_path, tok):
    from references.hf_checkpoints import write_mamba2_checkpoint

    from spikemar.models import from_pretrained

    write_mamba2_checkpoint(tmp_path / "m2")
    model = from_pretrained(tmp_path / "m2")
    save_checkpoint(tmp_path / "m.pt", model, model.tokenizer)
    loaded, tokenizer, _ = load_checkpoint(tmp_path / "m.pt")
    assert tokenizer == model.tokenizer and isinstance(tokenizer, HFTokenizer)
    assert generate_text(loaded, tokenizer, "hear me", 5, temperature=0) == generate_text(
        model, model.tokenizer, "hear me", 5, temperature=0
    )
    with pytest.raises(TypeError, match=r"\(CharTokenizer or HFTokenizer\), got NoneType"):
        save_checkpoint(tmp_path / "n.pt", model, None)


def _bpe_model(tok, seed: int = 0) -> MARLM:
    torch.manual_seed(seed)
    return MARLM(MARConfig(vocab_size=tok.vocab_size, d_model=16, n_layers=1, d_state=4,
                           head_dim=8)).eval()  # fmt: skip


def test_generate_takes_and_returns_text_with_the_models_tokenizer(tmp_path, tok):
    model = _bpe_model(tok)
    with pytest.raises(ValueError, match="prompt: a text prompt needs the model's tokenizer"):
        model.generate("hear me", 3)
    with pytest.raises(TypeError, match="prompt: expected token ids"):
        model.generate([1, 2], 3)
    save_checkpoint(tmp_path / "m.pt", model, tok)
    loaded, _, _ = load_checkpoint(tmp_path / "m.pt")
    assert loaded.tokenizer == tok  # load_checkpoint hands the model its tokenizer
    text = loaded.generate("hear me", 6, temperature=0)
    assert isinstance(text, str) and text.startswith("hear me")
    assert text == generate_text(loaded, tok, "hear me", 6, temperature=0)


def test_generation_stops_at_the_end_of_text_token(tok):
    model = _bpe_model(tok, seed=1)
    prompt = torch.tensor([tok.encode("hear me")[:3], tok.encode("speak ye")[:3]])
    free = model.generate(prompt, 8, temperature=0)
    new = free[:, prompt.shape[1] :]
    eos = int(new[0, 2])  # the token row 0 makes third: take it for the end of text
    first = [int((row == eos).nonzero()[0]) if (row == eos).any() else None for row in new]
    out = model.generate(prompt, 8, temperature=0, eos_token_id=eos)
    assert out.shape[1] == prompt.shape[1] + max(8 if f is None else f + 1 for f in first)
    for r, f in enumerate(first):
        got = out[r, prompt.shape[1] :]
        if f is None:
            assert torch.equal(got, new[r, : got.shape[0]])
        else:  # the same tokens up to the end of text, then padding with it
            assert torch.equal(got[: f + 1], new[r, : f + 1]) and bool((got[f:] == eos).all())
    fused = model.generate(prompt, 8, temperature=0, eos_token_id=eos, fused=True)
    assert torch.equal(fused, out)
    assert torch.equal(model.generate(prompt, 8, temperature=0, eos_token_id=np.int64(eos)), out)
    # a list of end tokens (Llama-3's generation config has three): any of them ends a row
    never = next(i for i in range(tok.vocab_size) if not bool((free == i).any()))
    assert torch.equal(model.generate(prompt, 8, temperature=0, eos_token_id=[eos, never]), out)
    padded = model.generate(prompt, 8, temperature=0, eos_token_id=(never, eos))
    assert padded.shape == out.shape  # the same ends; the padding is the list's first token
    for r, f in enumerate(first):
        got = padded[r, prompt.shape[1] :]
        if f is not None:
            assert int(got[f]) == eos and bool((got[f + 1 :] == never).all())
    for bad in (-1, tok.vocab_size, 1.0, True, [], [eos, -1]):
        with pytest.raises(ValueError, match="eos_token_id"):
            model.generate(prompt, 2, eos_token_id=bad)
    # text stops before the tokenizer's end-of-text token, which is not in the text
    eos_tok = HFTokenizer(tok._tokenizer, eos_id=eos)
    text = generate_text(model, eos_tok, tok.decode(prompt[0]), 8, temperature=0)
    assert text == tok.decode(free[0, : prompt.shape[1] + first[0]])


def test_saving_a_tokenizer_refuses_a_config_that_is_not_an_object(tmp_path, tok):
    for text in ("[]", "null", "{broken"):
        d = tmp_path / f"d{len(text)}"
        d.mkdir()
        (d / "tokenizer_config.json").write_text(text)
        with pytest.raises(ValueError, match=r"tokenizer_config\.json"):
            tok.save(d)
        assert not (d / "tokenizer.json").exists()  # nothing written
    HFTokenizer(tok._tokenizer, 5).save(tmp_path / "e")
    HFTokenizer(tok._tokenizer).save(tmp_path / "e")  # no end-of-text token now: none named
    assert load_tokenizer(tmp_path / "e").eos_id is None


def test_a_text_prompt_stops_at_the_eos_token_it_is_given(tok):
    model = _bpe_model(tok, seed=2)
    model.tokenizer = tok
    prompt = tok.encode("hear me")
    free = model.generate(torch.tensor(prompt), 12, temperature=0).tolist()
    eos = free[len(prompt) + 2]
    cut = free.index(eos, len(prompt))
    assert model.generate("hear me", 12, temperature=0, eos_token_id=eos) == tok.decode(free[:cut])


@pytest.mark.parametrize(
    ("tokenizer_class", "flags"),
    [("LlamaTokenizerFast", {"add_bos_token": False}), ("LlamaTokenizerFast", {}),
     ("LlamaTokenizerFast", {"add_bos_token": False, "add_eos_token": True}),
     ("PreTrainedTokenizerFast", {"add_bos_token": False})],
)  # fmt: skip
def test_a_directory_encodes_with_special_tokens_as_autotokenizer_does(
    tmp_path, tokenizer_class, flags
):
    """A tokenizer.json whose post-processor puts a BOS first, beside a tokenizer_config.json:
    a class that builds its template from add_bos_token/add_eos_token (LlamaTokenizerFast:
    add_bos_token false, no BOS) replaces the file's in transformers, and in spikemar, which
    kept the file's BOS; PreTrainedTokenizerFast (Llama-3's) keeps it in both."""
    from transformers import AutoTokenizer

    begin_of_text_tokenizer().save(tmp_path)
    config = {"tokenizer_class": tokenizer_class, "bos_token": "<|begin_of_text|>",
              "eos_token": "<|endoftext|>", **flags}  # fmt: skip
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    auto = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True, legacy=True)
    tok = HFTokenizer.from_directory(tmp_path)
    text = "hear me speak"
    assert tok._tokenizer.encode(text).ids == auto(text)["input_ids"]
    dropped = tokenizer_class == "LlamaTokenizerFast" and flags.get("add_bos_token") is False
    assert tok.prefix_ids == (() if dropped else (300,))  # what the data and eval put first
    assert tok.encode(text) == auto(text, add_special_tokens=False)["input_ids"]


def test_a_directory_transformers_cannot_build_keeps_the_files_template(tmp_path):
    """LlamaTokenizerFast with add_prefix_space makes transformers rebuild from a
    tokenizer.model the directory lacks (it cannot load it at all): spikemar reads
    tokenizer.json as it did before, the file's BOS first, instead of failing."""
    begin_of_text_tokenizer().save(tmp_path)
    config = {"tokenizer_class": "LlamaTokenizerFast", "bos_token": "<|begin_of_text|>",
              "eos_token": "<|endoftext|>", "add_prefix_space": False}  # fmt: skip
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = HFTokenizer.from_directory(tmp_path)
    assert tok == HFTokenizer.from_file(tmp_path / "tokenizer.json").with_eos_id(tok.eos_id)
    assert tok.prefix_ids == (300,)


def test_a_template_that_changes_no_ids_leaves_the_tokenizer_as_saved(tmp_path):
    """GPT-NeoX's class also rebuilds its template in transformers (no BOS, no EOS), which
    encodes as the file's does: the tokenizer stays equal to the saved one (checkpoints
    written with it still match)."""
    from transformers import AutoTokenizer

    tok = bpe_tokenizer(300)
    tok.save(tmp_path)
    config = {"tokenizer_class": "GPTNeoXTokenizer", "bos_token": "<|endoftext|>",
              "eos_token": "<|endoftext|>"}  # fmt: skip
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    auto = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert type(auto).__name__ == "GPTNeoXTokenizerFast"
    assert HFTokenizer.from_directory(tmp_path) == tok
