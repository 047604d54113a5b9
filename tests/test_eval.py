"""spikemar.eval: scoring equals a direct float64 computation from the logits, rolling equals the
sum of per-token losses, greedy generation stops at stop sequences, the lm_eval model and the
``spikemar eval`` command (offline, local tasks), and clear errors for bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from spikemar import energy
from spikemar.data import CharTokenizer
from spikemar.eval.local_tasks import LOCAL_TASKS, TASKS_DIR, build_shakespeare_tasks
from spikemar.eval.perplexity import start_token, text_perplexity
from spikemar.eval.scoring import Scorer
from spikemar.models import MARLM, MARConfig, SpikeConfig, TransformerConfig, TransformerLM

VOCAB = 23


def tiny_mar(seed: int = 0, spikes: bool = True) -> MARLM:
    torch.manual_seed(seed)
    config = MARConfig(
        vocab_size=VOCAB, d_model=32, n_layers=2, d_state=8, head_dim=8,
        spikes=SpikeConfig(T=3, v_threshold=0.05) if spikes else None,
    )  # fmt: skip
    model = MARLM(config).eval()
    with torch.no_grad():  # larger logits than the 0.02 init, so argmax is not a coin toss
        model.head.weight.mul_(40)
    return model


def tiny_transformer(seed: int = 0, max_len: int = 12) -> TransformerLM:
    torch.manual_seed(seed)
    return TransformerLM(TransformerConfig(VOCAB, 32, 2, 4, max_len)).eval()


def direct_logprob(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """log p(continuation | context) from one unbatched forward pass, in float64."""
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logits = model(ids[:, :-1])[0].double()
    logp = F.log_softmax(logits, -1)[len(context) - 1 :]
    target = torch.tensor(continuation)
    total = logp.gather(-1, target[:, None]).sum().item()
    return total, bool((logp.argmax(-1) == target).all())


def random_ids(g: torch.Generator, lo: int, hi: int) -> list[int]:
    n = int(torch.randint(lo, hi + 1, (1,), generator=g))
    return torch.randint(0, VOCAB, (n,), generator=g).tolist()


# -- Scorer ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("make", [tiny_mar, lambda: tiny_mar(1, spikes=False), tiny_transformer])
def test_loglikelihood_equals_direct_float64_computation(make, dtype):
    model = make().to(dtype)
    g = torch.Generator().manual_seed(3)
    requests = [(random_ids(g, 1, 7), random_ids(g, 1, 4)) for _ in range(7)]
    # unbatched, the passes are the direct computation's own: equal to rounding of the sum
    alone = Scorer(model, VOCAB, batch_size=1).loglikelihood(requests)
    # batched, mixed lengths are right-padded: the model's own rounding differs with L
    rel = 1e-9 if dtype == torch.float64 else 1e-5
    batched = Scorer(model, VOCAB, batch_size=4).loglikelihood(requests)
    for (ctx, cont), a, b in zip(requests, alone, batched, strict=True):
        want, greedy = direct_logprob(model, ctx, cont)
        assert a.logprob == pytest.approx(want, rel=1e-12, abs=1e-12)
        assert b.logprob == pytest.approx(want, rel=rel, abs=rel)
        assert a.greedy == b.greedy == greedy
        assert a.tokens == len(cont)


@settings(max_examples=10, deadline=None)
@given(
    lengths=st.lists(st.tuples(st.integers(1, 9), st.integers(1, 5)), min_size=1, max_size=8),
    batch_size=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)
def test_scores_do_not_depend_on_batching(lengths, batch_size, seed):
    model = MODEL_FOR_PROPERTIES
    g = torch.Generator().manual_seed(seed)
    requests = [
        (torch.randint(0, VOCAB, (a,), generator=g).tolist(),
         torch.randint(0, VOCAB, (b,), generator=g).tolist())
        for a, b in lengths
    ]  # fmt: skip
    one = Scorer(model, VOCAB, batch_size=1).loglikelihood(requests)
    many = Scorer(model, VOCAB, batch_size=batch_size).loglikelihood(requests)
    for a, b in zip(one, many, strict=True):
        assert b.logprob == pytest.approx(a.logprob, rel=1e-5, abs=1e-5)


MODEL_FOR_PROPERTIES = tiny_mar(7)


def test_greedy_flag_is_true_for_the_models_own_greedy_continuation():
    model = tiny_mar(2)
    ctx = [1, 2, 3, 4]
    out = model.generate(torch.tensor(ctx), 5, temperature=0.0).tolist()
    s = Scorer(model, VOCAB).loglikelihood([(ctx, out[4:]), (ctx, [(out[4] + 1) % VOCAB])])
    assert s[0].greedy and not s[1].greedy


def test_token_ids_are_integers_or_one_error():
    """A token id given as True or 2.7 was int()-ed into token 1 or 2 and scored silently;
    NumPy and 0-d tensor ids, integer tensors and arrays score as the same Python ints."""
    model = tiny_mar(2)
    scorer = Scorer(model, VOCAB)
    want = scorer.loglikelihood([([1, 2, 3], [4, 5])])
    for ctx, cont in (
        ([np.int64(1), 2, torch.tensor(3)], [np.int32(4), 5]),
        (torch.tensor([1, 2, 3]), np.array([4, 5])),
    ):
        assert scorer.loglikelihood([(ctx, cont)]) == want
    for cont, shown in (([True], "True"), ([2.7], "2.7"), (["3"], "'3'")):
        with pytest.raises(
            ValueError,
            match=rf"^requests\[0\] continuation: expected integer token ids, got {shown}$",
        ):
            scorer.loglikelihood([([1, 2], cont)])
    # a column [n, 1] scores as its ids (int() took each row), a wider one is refused
    assert scorer.loglikelihood([([1, 2, 3], np.array([[4], [5]]))]) == want
    for cont in (torch.tensor([1.0]), np.array([[1, 2]]), torch.tensor([True])):
        with pytest.raises(
            ValueError, match=r"^requests\[0\] continuation: expected a 1-d sequence of integer"
        ):
            scorer.loglikelihood([([1, 2], cont)])


@pytest.mark.parametrize("window", [None, 5, 16])
def test_rolling_equals_the_sum_of_per_token_losses(window):
    model = tiny_mar(4).double()  # float64 throughout: batching and padding change no rounding
    g = torch.Generator().manual_seed(5)
    docs = [random_ids(g, 1, 30) for _ in range(4)]
    prefix = 0
    scorer = Scorer(model, VOCAB, batch_size=2)
    rolled = scorer.loglikelihood_rolling(docs, prefix, window)
    per_token = scorer.token_logprobs(docs, prefix, window)
    for doc, total, lp in zip(docs, rolled, per_token, strict=True):
        want = 0.0
        step = window or len(doc)
        for off in range(0, len(doc), step):  # each window afresh from the prefix
            seg = torch.tensor([[prefix, *doc[off : off + step]]])
            with torch.no_grad():
                logits = model(seg[:, :-1])[0].double()
            want += -F.cross_entropy(logits, seg[0, 1:], reduction="sum").item()
        assert total == pytest.approx(want, rel=1e-9, abs=1e-9)
        assert lp.shape == (len(doc),) and lp.dtype == torch.float64
        assert float(lp.sum()) == pytest.approx(total, rel=1e-12)


def test_rolling_one_pass_sees_the_whole_document():
    """A single pass conditions late tokens on the whole document; windows do not."""
    model = tiny_mar(6)
    doc = torch.randint(0, VOCAB, (30,), generator=torch.Generator().manual_seed(1)).tolist()
    scorer = Scorer(model, VOCAB)
    one = scorer.token_logprobs([doc], 0)[0]
    win = scorer.token_logprobs([doc], 0, window=10)[0]
    assert torch.allclose(one[:10], win[:10], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(one[10:], win[10:], rtol=1e-3, atol=1e-4)


def test_attention_limit_truncates_context_and_windows_documents():
    model = tiny_transformer(max_len=12)
    scorer = Scorer(model, VOCAB)
    assert scorer.max_length == 12
    ctx, cont = list(range(20)), [3, 4]
    (s,) = scorer.loglikelihood([(ctx, cont)])
    whole = (ctx + cont)[-13:]  # the oldest context dropped to fit 12 inputs
    want, _ = direct_logprob(model, whole[:-2], cont)
    assert s.logprob == pytest.approx(want, rel=1e-9)
    doc = list(range(VOCAB)) * 2
    assert len(scorer.token_logprobs([doc], 0)[0]) == len(doc)


class _Chars:
    """A character tokenizer over the first VOCAB letters (for decode in generation)."""

    tokenizer = CharTokenizer("\nabcdefghijklmnopqrstuv")


def test_greedy_until_stops_at_the_first_stop_sequence():
    model = tiny_mar(8)
    tok = _Chars.tokenizer
    assert tok.vocab_size == VOCAB
    ctx = tok.encode("abc")
    full = tok.decode(model.generate(torch.tensor(ctx), 12, temperature=0.0)[3:])
    stop = full[5:7]
    first = full.find(stop)
    scorer = Scorer(model, VOCAB, batch_size=2)
    got = scorer.greedy_until(
        [ctx, ctx, tok.encode("ba")], decode=tok.decode, stop=[stop], max_new_tokens=12
    )
    assert got[0] == got[1] == full[:first]
    assert stop not in got[2]
    assert scorer.greedy_until([ctx], decode=tok.decode, max_new_tokens=12) == [full]
    assert scorer.greedy_until([ctx], decode=tok.decode, max_new_tokens=4) == [full[:4]]


def test_scorer_counts_energy_on_the_scored_passes():
    model = tiny_mar(9)
    scorer = Scorer(model, VOCAB, batch_size=3, count_energy=True)
    scorer.loglikelihood([([1, 2, 3], [4]), ([5], [6, 7])])
    assert scorer.positions == 2 * 3  # two requests in one pass, padded to 3 positions
    report = scorer.energy_report("45nm-fp32")
    assert report.tokens == 6 and report.passes == 1
    assert report.total_acs > 0 and report.per_token()["energy_pj"] > 0


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda s: s.loglikelihood([([], [1])]), "context: expected at least one"),
        (lambda s: s.loglikelihood([([1], [VOCAB])]), r"continuation: token ids \[23\]"),
        (lambda s: s.token_logprobs([[1]], VOCAB + 1), "prefix"),
        (lambda s: s.token_logprobs([[1]], 0, window=0), "window: expected an int >= 1"),
        (lambda s: s.energy_report(), "count_energy"),
        (lambda s: s.greedy_until([[1]], decode=str, max_new_tokens=-1), "max_new_tokens"),
    ],
)
def test_scorer_rejects_bad_input_clearly(call, match):
    with pytest.raises(ValueError, match=match):
        call(Scorer(tiny_mar(), VOCAB))


def test_scorer_rejects_bad_arguments():
    with pytest.raises(ValueError, match="batch_size"):
        Scorer(tiny_mar(), VOCAB, batch_size=0)
    with pytest.raises(ValueError, match="max_length: 99 exceeds the model's max_len 12"):
        Scorer(tiny_transformer(), VOCAB, max_length=99)


# -- perplexity of a text ---------------------------------------------------------------------


def test_text_perplexity_stream_and_windows():
    model = tiny_mar(10, spikes=False)
    tok = _Chars.tokenizer
    text = "abacabad\nbadcab\n" * 5
    stream = text_perplexity(model, tok, text)
    win = text_perplexity(model, tok, text, window=16)
    ids = tok.encode(text)
    want = -sum(Scorer(model, VOCAB).loglikelihood_rolling([ids], 0)) / len(ids)
    assert stream.nats_per_token == pytest.approx(want, rel=1e-9)
    assert stream.bits_per_byte == pytest.approx(want * len(ids) / len(text) / math.log(2))
    assert stream.mode == "stream" and win.mode == "window" and win.window == 16
    # the curve covers every token once
    assert sum(stream.curve_count) == len(ids) == sum(win.curve_count)
    assert win.curve_start == list(range(16))
    mean = sum(n * c for n, c in zip(win.curve_nats, win.curve_count, strict=True)) / len(ids)
    assert mean == pytest.approx(win.nats_per_token, rel=1e-9)
    json.dumps(stream.to_dict())  # JSON-ready


# -- local tasks --------------------------------------------------------------------------------


def test_local_task_files_are_packaged():
    for task in LOCAL_TASKS:
        assert (TASKS_DIR / f"{task}.yaml").is_file()
        rows = (TASKS_DIR / f"{task}.jsonl").read_text(encoding="utf-8").splitlines()
        assert len(rows) >= 50
        doc = json.loads(rows[0])
        if task == "shakespeare_rolling":
            assert len(doc["text"]) >= 2000
        else:
            assert len(doc["choices"]) == 4 and 0 <= doc["label"] < 4
            assert doc["choices"][doc["label"]] not in doc["choices"][: doc["label"]]


def test_packaged_tasks_rebuild_from_the_corpus(tmp_path):
    corpus = Path(__file__).resolve().parents[1].parent / "shared/data/tinyshakespeare/input.txt"
    if not corpus.is_file():
        pytest.skip(f"Tiny Shakespeare is not at {corpus} (the shared data folder)")
    written = build_shakespeare_tasks(corpus, tmp_path)
    for task, path in written.items():
        assert path.read_bytes() == (TASKS_DIR / f"{task}.jsonl").read_bytes(), task


# -- lm-evaluation-harness -----------------------------------------------------------------------

SHAKESPEARE_CHARS = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


@pytest.fixture(scope="module")
def harness():
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness (the 'eval' extra) is missing")
    from spikemar.eval import harness

    return harness


@pytest.fixture(scope="module")
def char_model():
    torch.manual_seed(11)
    config = MARConfig(vocab_size=len(SHAKESPEARE_CHARS), d_model=16, n_layers=1, d_state=8,
                       head_dim=8, spikes=SpikeConfig(T=2, v_threshold=0.05))  # fmt: skip
    model = MARLM(config).eval()
    with torch.no_grad():
        model.head.weight.mul_(40)
    return model, CharTokenizer(SHAKESPEARE_CHARS)


@pytest.fixture(scope="module")
def tiny_checkpoint(char_model, tmp_path_factory):
    from spikemar.checkpoint import save_checkpoint

    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(path, char_model[0], char_model[1])
    return path


def instances(request_type: str, args: list[tuple]):
    from lm_eval.api.instance import Instance

    return [
        Instance(request_type=request_type, doc={}, arguments=a, idx=i) for i, a in enumerate(args)
    ]


def test_lm_eval_finds_the_model_beside_its_own(harness):
    from lm_eval.api.registry import get_model, model_registry

    assert get_model("spikemar") is harness.SpikemarLM
    assert "hf" in model_registry  # registering spikemar keeps lm_eval's own models


def test_harness_loglikelihood_equals_direct_computation(harness, char_model):
    model, tok = char_model
    lm = harness.SpikemarLM(model=model, tokenizer=tok, batch_size=3, count_energy=False)
    requests = [("Good morrow", ", Kate"), ("ROMEO: ", "away"), ("", "Hark"), ("a", "b")]
    got = lm.loglikelihood(instances("loglikelihood", requests))
    for (ctx, cont), (logprob, greedy) in zip(requests, got, strict=True):
        if ctx:  # lm_eval moves the context's trailing spaces to the continuation
            n = len(ctx) - len(ctx.rstrip())
            ctx, cont = ctx[: len(ctx) - n], ctx[len(ctx) - n :] + cont
            want = direct_logprob(model, tok.encode(ctx), tok.encode(cont))
        else:  # an empty context is the start token, "\n"
            want = direct_logprob(model, tok.encode("\n"), tok.encode(cont))
        assert logprob == pytest.approx(want[0], rel=1e-5)
        assert greedy == want[1]


def test_harness_rolling_is_the_sum_of_per_token_losses(harness, char_model):
    model, tok = char_model
    lm = harness.SpikemarLM(model=model, tokenizer=tok, count_energy=False)
    docs = ["To be, or not to be: that is the question.", "Ay me!", ""]
    got = lm.loglikelihood_rolling(instances("loglikelihood_rolling", [(d,) for d in docs]))
    for doc, value in zip(docs, got, strict=True):
        if not doc:
            assert value == 0.0
            continue
        ids = torch.tensor([tok.encode("\n" + doc)])
        with torch.no_grad():
            logits = model(ids[:, :-1])[0].double()
        want = -F.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        assert value == pytest.approx(want, rel=1e-5)


def test_harness_generate_until_stops_at_stop_sequences(harness, char_model):
    model, tok = char_model
    lm = harness.SpikemarLM(model=model, tokenizer=tok, count_energy=False)
    ctx = "KING:\n"
    full = tok.decode(model.generate(torch.tensor(tok.encode(ctx)), 16, temperature=0.0)[6:])
    stop = full[6:8]
    got = lm.generate_until(
        instances(
            "generate_until",
            [(ctx, {"until": [stop], "max_gen_toks": 16}), (ctx, {"until": [], "max_gen_toks": 9})],
        )
    )
    assert got == [full[: full.find(stop)], full[:9]]
    with pytest.raises(ValueError, match="greedily"):
        lm.generate_until(instances("generate_until", [(ctx, {"do_sample": True,
                                                              "temperature": 1.0})]))  # fmt: skip


@pytest.mark.parametrize("begin_of_text", [False, True], ids=["gpt-neox-like", "llama-3-like"])
def test_harness_equals_lm_evals_own_hf_model_on_the_same_mamba2(harness, tmp_path, begin_of_text):
    # the real peer: lm_eval's HFLM on transformers' Mamba2ForCausalLM, and spikemar's model on
    # the same directory, given the same requests (a tokenizer with or without a start-of-text
    # token, which HFLM puts before an empty context and a rolling document as spikemar does)
    from lm_eval.models.huggingface import HFLM
    from references.hf_checkpoints import begin_of_text_tokenizer, write_mamba2_checkpoint

    write_mamba2_checkpoint(tmp_path, vocab_size=301, tokenizer=not begin_of_text)
    if begin_of_text:
        begin_of_text_tokenizer().save(tmp_path)
    peer = HFLM(pretrained=str(tmp_path), device="cpu", dtype="float32", batch_size=2)
    ours = harness.SpikemarLM(pretrained=str(tmp_path), batch_size=3, count_energy=False)
    assert ours.prefix_token_id == peer.prefix_token_id == (300 if begin_of_text else 0)
    pairs = [("First Citizen:", " Before we"), ("hear me", " speak."), ("", "Citizen"),
             ("a b ", "c"), ("proceed any further,", " hear me speak.")]  # fmt: skip
    want = peer.loglikelihood(instances("loglikelihood", pairs))
    got = ours.loglikelihood(instances("loglikelihood", pairs))
    for (w, w_greedy), (g, g_greedy) in zip(want, got, strict=True):
        assert g == pytest.approx(w, rel=1e-5, abs=1e-4) and g_greedy == w_greedy
    docs = [("First Citizen: Before we proceed any further, hear me speak.",), ("Citizen",)]
    if begin_of_text:  # lm_eval's hf also scores the document's own leading <|begin_of_text|>
        # after its prefix (lm-evaluation-harness#3333); spikemar scores the document after one
        # prefix: HFLM's scores when it encodes documents without their special tokens
        rolling = HFLM(pretrained=str(tmp_path), device="cpu", dtype="float32", batch_size=2,
                       add_bos_token=False)  # fmt: skip
    else:
        rolling = peer
    want = rolling.loglikelihood_rolling(instances("loglikelihood_rolling", docs))
    got = ours.loglikelihood_rolling(instances("loglikelihood_rolling", docs))
    assert got == pytest.approx(want, rel=1e-5, abs=1e-4)
    until = [("First Citizen:", {"until": ["\n"], "max_gen_toks": 8, "do_sample": False}),
             ("hear", {"until": ["me"], "max_gen_toks": 6})]  # fmt: skip
    assert ours.generate_until(instances("generate_until", until)) == peer.generate_until(
        instances("generate_until", until)
    )


def test_harness_takes_lm_evals_hf_argument_names(harness, tmp_path):
    from lm_eval.api.registry import get_model
    from references.hf_checkpoints import write_mamba2_checkpoint

    write_mamba2_checkpoint(tmp_path)
    lm = get_model("spikemar").create_from_arg_string(
        f"pretrained={tmp_path},dtype=bfloat16", {"batch_size": 2, "device": "cpu"}
    )
    assert {p.dtype for p in lm.scorer.model.parameters()} == {torch.bfloat16}
    [(logprob, _)] = lm.loglikelihood(instances("loglikelihood", [("hear me", " speak")]))
    assert math.isfinite(logprob) and logprob < 0
    with pytest.raises(ValueError, match="pretrained: the same argument as checkpoint"):
        harness.SpikemarLM(checkpoint=str(tmp_path), pretrained=str(tmp_path))
    with pytest.raises(ValueError, match=r"dtype: expected .*got 'int8'"):
        harness.SpikemarLM(pretrained=str(tmp_path), dtype="int8")


def test_harness_errors_are_clear(harness, char_model, tmp_path):
    model, tok = char_model
    with pytest.raises(
        FileNotFoundError, match=r"checkpoint: no file or directory at .*missing\.pt"
    ):
        harness.SpikemarLM.create_from_arg_string(f"checkpoint={tmp_path / 'missing.pt'}")
    with pytest.raises(ValueError, match=r"model_args: unknown argument\(s\) \['temprature'\]"):
        harness.SpikemarLM(model=model, tokenizer=tok, temprature=1)
    with pytest.raises(ValueError, match="device: 'gpu' is not a device"):
        harness.SpikemarLM(model=model, tokenizer=tok, device="gpu")
    with pytest.raises(ValueError, match="unk: expected one character"):
        harness.SpikemarLM(model=model, tokenizer=tok, unk="#")
    lm = harness.SpikemarLM(model=model, tokenizer=tok, count_energy=False)
    with pytest.raises(ValueError, match=r"characters \['1', '2'\].*unk=' '"):
        lm.loglikelihood(instances("loglikelihood", [("Act 1", " scene 2")]))
    lm = harness.SpikemarLM(model=model, tokenizer=tok, unk=" ", count_energy=False)
    (a,) = lm.loglikelihood(instances("loglikelihood", [("Act 1", " scene 2")]))
    want = direct_logprob(model, tok.encode("Act  "), tok.encode(" scene  "))
    assert a[0] == pytest.approx(want[0], rel=1e-5)
    assert lm.replaced_chars == {"1", "2"}


def test_harness_counts_energy_of_its_passes(harness, char_model):
    model, tok = char_model
    lm = harness.SpikemarLM(model=model, tokenizer=tok)
    lm.loglikelihood(instances("loglikelihood", [("Good", " night")]))
    report = lm.energy_report("45nm-fp32")
    assert report.tokens == lm.scorer.positions == len("Good night") - 1
    assert report.total_acs > 0


# -- spikemar eval ---------------------------------------------------------------------------------


def test_eval_command_two_local_tasks_offline(harness, tiny_checkpoint, tmp_path, capsys):
    """The CI run of the command: two local tasks, two checkpoints, JSON + Markdown + PNG."""
    from spikemar import cli

    out = tmp_path / "eval"
    argv = ["eval", "--checkpoint", str(tiny_checkpoint), "--checkpoint", str(tiny_checkpoint),
            "--label", "a", "--label", "b", "--tasks", "shakespeare_nextline,shakespeare_rolling",
            "--limit", "3", "--batch-size", "8", "--out", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "| a |" in printed and "| b |" in printed
    data = json.loads((out / "eval.json").read_text())
    a, b = data["rows"]
    assert set(a["tasks"]) == {"shakespeare_nextline", "shakespeare_rolling"}
    assert 0 <= a["tasks"]["shakespeare_nextline"]["acc"] <= 1
    assert "acc_stderr" in a["tasks"]["shakespeare_nextline"]
    assert a["tasks"]["shakespeare_rolling"]["bits_per_byte"] > 0
    assert a["samples"] == {"shakespeare_nextline": 3, "shakespeare_rolling": 3}
    assert a["tasks"] == b["tasks"]  # the same checkpoint twice scores the same
    energy = a["energy"]
    assert energy["energy_pj_per_token"]["45nm-fp32"] > 0 and 0 < energy["firing_rate"] < 1
    rows = [ln for ln in (out / "eval.md").read_text().splitlines() if ln.startswith("| ")]
    assert len(rows) == 3  # header + 2 rows
    assert (out / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_command_text_perplexity(tiny_checkpoint, char_model, tmp_path, capsys):
    from spikemar import cli

    text = tmp_path / "t.txt"
    text.write_text("Now is the winter of our discontent\nMade glorious summer.\n" * 3)
    out = tmp_path / "ppl"
    argv = ["eval", "--checkpoint", str(tiny_checkpoint), "--text", str(text), "--window", "16",
            "--train-length", "16", "--out", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    data = json.loads((out / "perplexity.json").read_text())
    stream, windows = data["results"]
    want = text_perplexity(*char_model, text.read_text())
    assert stream["mode"] == "stream" and windows["window"] == 16
    assert stream["nats_per_token"] == pytest.approx(want.nats_per_token, rel=1e-6)
    assert (out / "perplexity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "nats/token" in capsys.readouterr().out
    # the energy of the passes that produced each score beside it (the --text table had none):
    # the stream's is one pass over the start token and the text but its last token
    model, tokenizer = char_model
    ids = torch.tensor([[start_token(tokenizer), *tokenizer.encode(text.read_text())[:-1]]])
    counted = energy.profile(model, ids)
    assert stream["energy"]["positions"] == ids.numel()
    assert stream["energy"]["energy_pj_per_token"]["45nm-fp32"] == pytest.approx(
        counted.per_token()["energy_pj"], rel=1e-9
    )
    assert windows["energy"]["firing_rate"] is not None
    table = (out / "perplexity.md").read_text()
    assert "| E/token 45nm-fp32 |" in table and "firing rate" in table
    argv += ["--no-energy", "--out", str(tmp_path / "plain")]
    assert cli.main(argv) == 0
    # --dtype: the checkpoint's weights in bfloat16 score within bfloat16's rounding
    assert cli.main([*argv, "--dtype", "bfloat16", "--out", str(tmp_path / "bf16")]) == 0
    bf16 = json.loads((tmp_path / "bf16" / "perplexity.json").read_text())["results"][0]
    assert bf16["nats_per_token"] == pytest.approx(want.nats_per_token, rel=3e-2)
    assert bf16["nats_per_token"] != stream["nats_per_token"]
    assert (
        json.loads((tmp_path / "plain" / "perplexity.json").read_text())["results"][0]["energy"]
        is None
    )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--checkpoint", "missing.pt"], "--checkpoint: no file or directory at missing.pt"),
        (["--label", "x", "--label", "y"], "--label: 2 labels for 1 checkpoints"),
        (["--tasks", ","], "--tasks: expected at least one task name"),
        (["--include-path", "no/such/dir"], "--include-path: no folder at no/such/dir"),
        (["--text", "no/such.txt"], "--text: no text file at no/such.txt"),
        (["--hardware", "tpu"], "--hardware: unknown profile 'tpu'"),
    ],
)
def test_eval_command_bad_input_is_one_line(harness, tiny_checkpoint, capsys, extra, message):
    from spikemar import cli

    argv = ["eval", *(["--checkpoint", str(tiny_checkpoint)] if "--checkpoint" not in extra
                      else []), *extra]  # fmt: skip
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("spikemar eval: error:") and message in err and "\n" not in err


def test_eval_command_unknown_task_names_it(harness, tiny_checkpoint, capsys):
    from spikemar import cli

    argv = ["eval", "--checkpoint", str(tiny_checkpoint), "--tasks", "shakespeare_nextlin"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "--tasks: unknown task(s) ['shakespeare_nextlin']" in err and "\n" not in err


def test_png_has_a_panel_per_kind_of_score(tmp_path):
    """Accuracy where there are accuracy tasks, bits per byte where there are rolling ones; a
    table with neither (or no energy) has nothing to plot."""
    from matplotlib.image import imread

    from spikemar.eval.report import EvalRow, EvalTable

    energy = {"energy_pj_per_token": {"45nm-fp32": 1e6}}
    acc = {"nextline": {"acc": 0.3, "acc_stderr": 0.05}}
    bpb = {"rolling": {"bits_per_byte": 2.2}}
    widths = {}
    for name, tasks in {"acc": acc, "bpb": bpb, "both": {**acc, **bpb}}.items():
        rows = [EvalRow("a", "a.pt", tasks, energy), EvalRow("b", "b.pt", tasks, energy)]
        table = EvalTable(rows)
        if "rolling" in tasks:
            assert table.bits_per_byte(rows[0]) == pytest.approx(2.2)
        widths[name] = imread(table.save_png(tmp_path / f"{name}.png")).shape[1]
    assert widths["acc"] == widths["bpb"] and widths["both"] == 2 * widths["acc"]
    with pytest.raises(ValueError, match="no row has both a scored task and an energy figure"):
        EvalTable([EvalRow("a", "a.pt", {"x": {"word_perplexity": 3.0}}, energy)]).save_png(
            tmp_path / "none.png"
        )
    with pytest.raises(ValueError, match="no energy was counted"):
        EvalTable([EvalRow("a", "a.pt", acc, None)]).save_png(tmp_path / "none.png")


def test_png_energy_axis_is_labelled_within_a_decade(saved_figures, tmp_path):
    """A student beside its teacher spans less than a decade of energy: the axis showed one
    label (10^5) or none, so no point's energy could be read off. Labels now at 1, 2, 5 × 10^k
    in pJ/nJ/µJ."""
    from spikemar.eval.report import EvalRow, EvalTable

    figures = saved_figures
    acc = {"nextline": {"acc": 0.3, "acc_stderr": 0.05}}
    rows = [EvalRow(label, f"{label}.pt", acc, {"energy_pj_per_token": {"45nm-fp32": pj}})
            for label, pj in (("student", 7.25e4), ("teacher", 1.254e5))]  # fmt: skip
    EvalTable(rows).save_png(tmp_path / "e.png")
    (fig,) = figures
    (ax,) = fig.axes
    lo, hi = ax.get_xlim()
    shown = [t.get_text() for t in ax.get_xticklabels(which="both")
             if t.get_text() and lo <= t.get_position()[0] <= hi]  # fmt: skip
    assert len(shown) >= 3 and "100 nJ" in shown, shown


def test_harness_rolling_windows_equal_lm_evals_hf_at_a_max_length(harness, tmp_path):
    # a document longer than max_length: hf's windows (each predicting the next max_length
    # tokens from the token before them, the last from as many earlier tokens as fit), not
    # windows restarting from the prefix token (-301.86 against hf's -300.62 before)
    from lm_eval.models.huggingface import HFLM
    from references.hf_checkpoints import write_mamba2_checkpoint

    write_mamba2_checkpoint(tmp_path, vocab_size=301)
    peer = HFLM(pretrained=str(tmp_path), device="cpu", dtype="float32", batch_size=2,
                max_length=16)  # fmt: skip
    ours = harness.SpikemarLM(pretrained=str(tmp_path), batch_size=3, max_length=16,
                              count_energy=False)  # fmt: skip
    docs = [("First Citizen: Before we proceed any further, hear me speak. All: Speak, "
             "speak. First Citizen: You are all resolved rather to die than to famish?",),
            ("Citizen",)]  # fmt: skip
    assert len(ours.tok_encode(docs[0][0])) > 3 * 16  # three windows and a part
    want = peer.loglikelihood_rolling(instances("loglikelihood_rolling", docs))
    got = ours.loglikelihood_rolling(instances("loglikelihood_rolling", docs))
    assert got == pytest.approx(want, rel=1e-5, abs=1e-4)
