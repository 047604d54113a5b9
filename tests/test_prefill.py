"""``prefill``: a run of tokens continuing a state in one parallel pass, equal to as many calls
of ``step``; generation and greedy evaluation read a prompt through it."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spikemar.eval.scoring import Scorer
from spikemar.models import MARLM, MARConfig, SpikeConfig
from spikemar.models.transformer import TransformerConfig, TransformerLM

VOCAB = 29
KINDS = ["ssm", "discrete-mamba2", ["ssm", "lti", "attn"]]


def model_of(layers, spikes: bool, seed: int = 0, **kw) -> MARLM:
    torch.manual_seed(seed)
    settings = dict(vocab_size=VOCAB, d_model=32, n_layers=len(layers) if isinstance(layers,
                    list) else 2, d_state=8, head_dim=8, layers=layers, max_len=64,
                    spikes=SpikeConfig(T=3, v_threshold=0.05) if spikes else None)  # fmt: skip
    c = MARConfig(**{**settings, **kw})
    return MARLM(c).double().eval()


def stepped(model, tokens, state):
    logits = None
    for t in range(tokens.shape[1]):
        logits, state = model.step(tokens[:, t], state)
    return logits, state


def tensors(state) -> list[torch.Tensor]:
    out = []
    for s in state:
        for f in dataclasses.fields(s):
            v = getattr(s, f.name)
            if isinstance(v, torch.Tensor):
                out.append(v)
    return out


@pytest.mark.parametrize("layers", KINDS, ids=str)
@pytest.mark.parametrize("spikes", [False, True], ids=["dense", "spiking"])
@pytest.mark.parametrize(("before", "length"), [(0, 1), (0, 2), (3, 1), (5, 9), (0, 21)])
def test_prefill_equals_steps(layers, spikes, before, length):
    model = model_of(layers, spikes)
    g = torch.Generator().manual_seed(before * 31 + length)
    tokens = torch.randint(0, VOCAB, (2, before + length), generator=g)
    with torch.no_grad():
        _, state = stepped(model, tokens[:, :before], model.init_state(2))
        twin = [dataclasses.replace(s) for s in state]
        want, want_state = stepped(model, tokens[:, before:], twin)
        got, got_state = model.prefill(tokens[:, before:], state)
        whole = model(tokens)[:, -1]
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got, whole, rtol=1e-10, atol=1e-10)
    for a, b in zip(tensors(got_state), tensors(want_state), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    # and the state goes on: one more step from each gives the same logits
    nxt = torch.randint(0, VOCAB, (2,), generator=g)
    with torch.no_grad():
        a, _ = model.step(nxt, got_state)
        b, _ = model.step(nxt, want_state)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("layers", ["ssm", "discrete-mamba2"])
def test_prefill_in_place_writes_over_the_state_and_otherwise_leaves_it(layers):
    model = model_of(layers, spikes=True, seed=3)
    tokens = torch.randint(0, VOCAB, (3, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        own = model.init_state(3, in_place=True)
        ptrs = [t.data_ptr() for t in tensors(own)]
        _, after = model.prefill(tokens, own)
        assert all(a is b for a, b in zip(after, own, strict=True))
        assert [t.data_ptr() for t in tensors(after)] == ptrs
        assert any(t.abs().sum() > 0 for t in tensors(own))  # written
        pure = model.init_state(3)
        _, after = model.prefill(tokens, pure)
        assert all(t.abs().sum() == 0 for t in tensors(pure))  # untouched
        for a, b in zip(tensors(after), tensors(own), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_prefill_with_autograd_reaches_the_initial_state():
    model = model_of("ssm", spikes=False, seed=4)
    tokens = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(2))
    state = model.init_state(2, in_place=True)  # in_place is ignored under autograd
    for s in state:
        s.ssm.normal_()
        s.ssm.requires_grad_(True)
    logits, after = model.prefill(tokens, state)
    (logits.sum() + sum(s.ssm.sum() for s in after)).backward()
    assert all(s.ssm.grad is not None and s.ssm.grad.abs().sum() > 0 for s in state)
    assert model.layers[0].mixer.in_proj.weight.grad is not None


@settings(max_examples=25, deadline=None)
@given(
    layers=st.sampled_from(KINDS),
    cuts=st.lists(st.integers(1, 9), min_size=1, max_size=4),
    batch=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_prefill_in_pieces_equals_one_forward(layers, cuts, batch, seed):
    """Any split of a sequence into prefills (each continuing the last's state) ends where one
    parallel forward over the whole sequence does; with ``all_logits`` the pieces' logits are
    the forward's, position by position (how a long document is scored chunk by chunk)."""
    model = model_of(layers, spikes=False, seed=seed % 7)
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (batch, sum(cuts)), generator=g)
    with torch.no_grad():
        state = model.init_state(batch, in_place=bool(seed % 2))
        pieces, at = [], 0
        for n in cuts:
            # on a copy: an in_place state is written over
            last, _ = model.prefill(tokens[:, at : at + n], copy.deepcopy(state))
            logits, state = model.prefill(tokens[:, at : at + n], state, all_logits=True)
            assert logits.shape == (batch, n, VOCAB)
            torch.testing.assert_close(last, logits[:, -1], rtol=1e-12, atol=1e-12)
            pieces.append(logits)
            at += n
        whole = model(tokens)
    torch.testing.assert_close(torch.cat(pieces, dim=1), whole, rtol=1e-9, atol=1e-9)


def transformer(seed: int = 0) -> TransformerLM:
    torch.manual_seed(seed)
    return TransformerLM(TransformerConfig(vocab_size=VOCAB, d_model=32, n_layers=2,
                                           n_heads=4, max_len=32)).double().eval()  # fmt: skip


@pytest.mark.parametrize("before", [0, 1, 5])
def test_transformer_prefill_equals_steps(before):
    model = transformer()
    tokens = torch.randint(0, VOCAB, (2, before + 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        state = model.init_state(2)
        for t in range(before):
            _, state = model.step(tokens[:, t], state)
        got, state = model.prefill(tokens[:, before:], state)
        assert state.length == before + 9
        torch.testing.assert_close(got, model(tokens)[:, -1], rtol=1e-10, atol=1e-10)
        nxt = torch.tensor([1, 2])
        a, _ = model.step(nxt, state)
        b = model(torch.cat([tokens, nxt[:, None]], dim=1))[:, -1]
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("which", ["hybrid", "attention only", "transformer"])
def test_prefill_through_attention_is_differentiable(which):
    """Gradients of prefill's logits equal the forward pass's (the KV cache is written in
    place, but what attention reads enters the graph as a copy)."""
    if which == "transformer":
        model = transformer(1)
    else:
        model = model_of(["ssm", "attn"] if which == "hybrid" else ["attn"], spikes=False, seed=2)
    tokens = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(4))
    params = [p for p in model.parameters() if p.requires_grad]
    state = model.init_state(2)
    _, state = model.prefill(tokens[:, :4], state)  # a continuation: the cache is read too
    logits, _ = model.prefill(tokens[:, 4:], state)
    got = torch.autograd.grad(logits.square().sum(), params, allow_unused=True)
    want = torch.autograd.grad(model(tokens)[:, -1].square().sum(), params, allow_unused=True)
    for g, w in zip(got, want, strict=True):
        if w is None:
            assert g is None or g.abs().max() == 0
        else:
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)


def test_a_prompt_past_the_kv_cache_is_refused_before_any_state_is_written():
    model = model_of(["ssm", "attn"], spikes=False)  # max_len 64
    with torch.no_grad():
        state = model.init_state(1, in_place=True)
        with pytest.raises(ValueError, match=r"tokens: 70 tokens after the 0 in layer 1's "
                                             r"attention KV cache exceed its 64"):  # fmt: skip
            model.prefill(torch.zeros(1, 70, dtype=torch.long), state)
        assert state[0].ssm.abs().sum() == 0 and state[1].length == 0
        _, state = model.prefill(torch.zeros(1, 60, dtype=torch.long), state)
        with pytest.raises(ValueError, match="tokens: 5 tokens after the 60"):
            model.prefill(torch.zeros(1, 5, dtype=torch.long), state)
    with pytest.raises(ValueError, match="tokens: 33 tokens after the 0 in the KV cache"):
        transformer().prefill(torch.zeros(1, 33, dtype=torch.long))


def test_energy_counts_each_prefill_and_step_as_a_pass():
    from spikemar.energy import EnergyCounter

    model = model_of("ssm", spikes=True, seed=8)
    tokens = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(8))
    with torch.no_grad(), EnergyCounter(model.float()) as counter:
        _, state = model.prefill(tokens, model.init_state(1))
        model.step(tokens[:, 0], state)
    assert counter.passes == 2
    report = counter.report("45nm-fp32", tokens=7)
    assert report.per_pass()["energy_pj"] > 0 and report.per_token()["energy_pj"] > 0
    scorer = Scorer(model, VOCAB, count_energy=True)
    scorer.greedy_until([[1, 2, 3, 4]], decode=str, max_new_tokens=4)
    assert scorer.energy_report().passes == 4  # the prefill and a step per token but the last


@pytest.mark.parametrize("layers", KINDS, ids=str)
def test_generate_reads_the_prompt_through_prefill(layers):
    model = model_of(layers, spikes=True, seed=5)
    prompt = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(5))
    calls = []
    model.embed.register_forward_hook(lambda m, args, out: calls.append(tuple(args[0].shape)))
    out = model.generate(prompt, 6, temperature=0.0)
    # the prompt in one pass, then a step per new token but the last (whose logits are unused)
    assert calls[0] == (2, 11) and all(c == (2,) for c in calls[1:]) and len(calls) == 6
    with torch.no_grad():  # greedy tokens as the step-by-step loop makes them
        logits, state = stepped(model, prompt, model.init_state(2))
        want = [prompt]
        for _ in range(6):
            nxt = logits.argmax(-1)
            want.append(nxt[:, None])
            logits, state = model.step(nxt, state)
    assert torch.equal(out, torch.cat(want, dim=1))


def test_greedy_until_reads_each_context_once():
    """An SSM model generates for evaluation by prefill + one step per token (each position
    through the model once), and makes the tokens the re-forward path makes."""
    model = model_of("ssm", spikes=False, seed=6)
    with torch.no_grad():
        model.head.weight.mul_(40)  # clear argmax
    decode = lambda ids: "".join(chr(97 + i % 26) for i in ids)  # noqa: E731
    contexts = [[1, 2, 3, 4, 5], [7], [9, 8, 7, 6, 5, 4, 3, 2, 1]]
    seen = []
    hook = model.embed.register_forward_hook(lambda m, a, o: seen.append(a[0].numel()))
    scorer = Scorer(model, VOCAB, count_energy=True)
    got = scorer.greedy_until(contexts, decode=decode, max_new_tokens=8)
    assert sum(seen) == scorer.positions == sum(len(c) + 8 - 1 for c in contexts)
    assert scorer.energy_report().tokens == scorer.positions
    hook.remove()
    again = Scorer(model, VOCAB, max_length=10_000)  # a limit: the re-forward path
    assert not again._recurrent()
    assert again.greedy_until(contexts, decode=decode, max_new_tokens=8) == got
    stop = got[0][2:4]
    cut = Scorer(model, VOCAB).greedy_until(contexts[:1], decode=decode, stop=[stop],
                                             max_new_tokens=8)  # fmt: skip
    assert cut == [got[0][: got[0].find(stop)]]


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda m: m.prefill(torch.zeros(2, 0, dtype=torch.long)), ValueError, "tokens"),
        (lambda m: m.prefill(torch.zeros(2, 3)), TypeError, "tokens: expected integer"),
        (lambda m: m.prefill(torch.full((1, 2), VOCAB)), ValueError, "tokens"),
        (
            lambda m: m.prefill(torch.zeros(2, 3, dtype=torch.long), m.init_state(3)),
            ValueError,
            r"state\[0\]\.conv: made for batch 3",
        ),
        (
            lambda m: m.prefill(torch.zeros(2, 3, dtype=torch.long), m.init_state(2)[:1]),
            ValueError,
            "state: expected the list of 2 layer states",
        ),
    ],
)
def test_prefill_bad_input_is_named(call, error, match):
    with pytest.raises(error, match=match):
        call(model_of("ssm", spikes=False))


def test_prefill_names_a_state_of_another_layer_or_model():
    model = model_of(["attn", "ssm"], spikes=False)
    tokens = torch.zeros(2, 3, dtype=torch.long)
    state = model.init_state(2)
    with pytest.raises(ValueError, match=r"state\[0\]: expected the AttentionState"):
        model.prefill(tokens, [state[1], state[0]])
    other = model_of("ssm", spikes=False, d_model=48).init_state(2)  # another width
    with pytest.raises(
        ValueError, match=r"state\[0\]\.conv: expected \(2, 80, 3\).*got \(2, 112, 3\)"
    ):
        model_of("ssm", spikes=False).prefill(tokens, other)
    t = transformer()
    with pytest.raises(ValueError, match="state: expected the KVCache"):
        t.prefill(tokens, state)
    with pytest.raises(ValueError, match="state: made for batch 3, but tokens has batch 2"):
        t.prefill(tokens, t.init_state(3))
    lti = model_of("lti", spikes=False).layers[0].mixer
    with pytest.raises(ValueError, match=r"u: expected \[batch, L, channels\]"):
        lti.prefill(torch.zeros(2, 32), lti.init_state(2))
    attn = model.layers[0].mixer
    with pytest.raises(ValueError, match=r"u: expected \[batch, L, d_model\] with L >= 1"):
        attn.prefill(torch.zeros(2, 0, 32), attn.init_state(2, 8))


class _TupleState(torch.nn.Module):
    """A model whose state is a tuple (not stackable): greedy evaluation runs it request by
    request."""

    def __init__(self, inner: MARLM) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, tokens):
        return self.inner(tokens)

    def init_state(self, batch, *, in_place=False):
        return tuple(self.inner.init_state(batch, in_place=in_place))

    def prefill(self, tokens, state):
        logits, state = self.inner.prefill(tokens, list(state))
        return logits, tuple(state)

    def step(self, tokens_t, state):
        assert tokens_t.shape[0] == 1  # never batched
        logits, state = self.inner.step(tokens_t, list(state))
        return logits, tuple(state)


def test_greedy_until_steps_a_batch_of_requests_together():
    model = model_of("ssm", spikes=True, seed=9)
    with torch.no_grad():
        model.head.weight.mul_(40)
    decode = lambda ids: "".join(chr(97 + i % 26) for i in ids)  # noqa: E731
    g = torch.Generator().manual_seed(9)
    contexts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (3, 11, 1, 7, 5)]
    alone = [Scorer(model, VOCAB, batch_size=1).greedy_until([c], decode=decode,
                                                             max_new_tokens=9)[0]
             for c in contexts]  # fmt: skip
    stop = alone[1][3:5]  # one request stops early, the others run to the limit (or stop too)
    want = [Scorer(model, VOCAB, batch_size=1).greedy_until([c], decode=decode, stop=[stop],
                                                            max_new_tokens=9)[0]
            for c in contexts]  # fmt: skip
    batches = []
    model.embed.register_forward_hook(lambda m, a, o: batches.append(tuple(a[0].shape)))
    scorer = Scorer(model, VOCAB, batch_size=4)
    got = scorer.greedy_until(contexts, decode=decode, stop=[stop], max_new_tokens=9)
    assert got == want
    assert (4,) in batches  # steps of four requests at once
    assert scorer.positions == sum(batch[0] * (batch[1] if len(batch) == 2 else 1)
                                   for batch in batches)  # fmt: skip
    wrapped = Scorer(_TupleState(model), VOCAB, batch_size=4)
    assert wrapped.greedy_until(contexts, decode=decode, stop=[stop], max_new_tokens=9) == want


def test_generate_refuses_more_tokens_than_a_kv_cache_holds_before_any_work():
    model = model_of(["ssm", "attn"], spikes=False)  # max_len 64
    calls = []
    model.embed.register_forward_hook(lambda m, a, o: calls.append(1))
    prompt = torch.zeros(1, 60, dtype=torch.long)
    with pytest.raises(
        ValueError,
        match="max_new_tokens: a prompt of 60 tokens and 6 new ones "
        "need 65 places in the KV cache; the model has 64",
    ):
        model.generate(prompt, 6)
    assert calls == []
    assert model.generate(prompt, 5).shape == (1, 65)
    assert model_of("ssm", spikes=False).generate(prompt, 30).shape == (1, 90)  # no limit
