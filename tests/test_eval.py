"""spikemar.eval: scoring equals a direct float64 computation from the logits, rolling equals the
sum of per-token losses, greedy generation stops at stop sequences, the lm_eval model and the
``spikemar eval`` command (offline, local tasks), and clear errors for bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from spikemar.data import CharTokenizer
from spikemar.eval.local_tasks import LOCAL_TASKS, TASKS_DIR
from spikemar.eval.perplexity import text_perplexity
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
    requests = [(random_ids(g, 1, 7), random_ids(g, 1, 4)) for _ in range(11)]
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


@settings(max_examples=15, deadline=None)
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


@pytest.mark.parametrize("window", [None, 5, 16])
def test_rolling_equals_the_sum_of_per_token_losses(window):
    model = tiny_mar(4).double()  # float64 throughout: batching and padding change no rounding
    g = torch.Generator().manual_seed(5)
    docs = [random_ids(g, 1, 40) for _ in range(5)]
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
