"""A fused step (:class:`spikemar.models.fused_step.FusedStep`, one C call per generated token)
equals ``model.step``: to the bit for models without an FFN (converted Hugging Face Mamba-2 and
their spiking students) up to ``MAX_FAST_ROWS`` sequences, to rounding beyond that and through an
FFN. Also ``generate(..., fused=True)``, the fallbacks that keep energy counts and spike rasters
right, what it reads at each call (in-place weight changes, replaced storage), and its errors.

Every comparison steps the module path (``model.step`` with its own in-place state, autograd
off: the path whose kernels the fused step runs) and the fused step side by side on the same
tokens.
"""

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_pretrained_parity import hf_config, perturb  # its tiny Mamba-2 (tests/ is on the path)
from torch import nn

from spikemar.convert import spiking_student
from spikemar.energy import EnergyCounter
from spikemar.models import MARLM, MARConfig, SpikeConfig, SpikePoint
from spikemar.models.fused_step import FusedStep, unsupported_reason
from spikemar.models.generation import generate
from spikemar.models.pretrained import config_from_hf, state_dict_from_hf
from spikemar.neurons import cpu_backend
from spikemar.ssm.linear import MAX_FAST_ROWS
from spikemar.ssm.mixer import MixerState

pytestmark = pytest.mark.skipif(not cpu_backend.usable(), reason="no C compiler for the kernels")

VOCAB = 61


def step_both(model: MARLM, batch: int, n_tokens: int = 5, seed: int = 0, fused=None):
    """Steps ``model.step`` (its own in-place state) and a FusedStep (its own) side by side on
    the same random tokens; returns [(fused logits, module logits)] and the two final states."""
    fused = FusedStep(model, batch) if fused is None else fused
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, model.config.vocab_size, (n_tokens, batch), generator=g)
    want_state = model.init_state(batch, in_place=True)
    state = fused.init_state()
    pairs = []
    with torch.no_grad():
        for t in tokens:
            want, want_state = model.step(t, want_state)
            got, returned = fused(t, state)
            assert returned is state  # updated in place, as generate keeps it
            assert got.shape == (batch, model.config.vocab_size) and got.dtype == want.dtype
            pairs.append((got, want))
    return pairs, state, want_state


def assert_bitwise(pairs, state, want_state) -> None:
    for t, (got, want) in enumerate(pairs):
        assert torch.equal(got, want), (t, (got - want).abs().max().item())
    for i, (s, w) in enumerate(zip(state, want_state, strict=True)):
        assert torch.equal(s.conv, w.conv) and torch.equal(s.ssm, w.ssm), i


def assert_close(pairs, dtype, rtol=None) -> None:
    """max |Δ| ≤ rtol · max |logits| (1e-5 in float32, 1e-12 in float64) at every token."""
    rtol = rtol if rtol is not None else (1e-5 if dtype == torch.float32 else 1e-12)
    for t, (got, want) in enumerate(pairs):
        assert torch.isfinite(want).all()
        err = (got.double() - want.double()).abs().max().item()
        assert err <= rtol * want.abs().max().item(), (t, err)


# -- converted Hugging Face Mamba-2 (no FFN) ----------------------------------------------------


def hf_pair(seed: int = 0, **overrides):
    """A random transformers Mamba2ForCausalLM (perturbed away from its init) and spikemar's
    conversion of it (float32, eval)."""
    transformers = pytest.importorskip("transformers")

    config = hf_config(**{"vocab_size": VOCAB, **overrides})
    torch.manual_seed(seed)
    hf = transformers.Mamba2ForCausalLM(config).eval()
    perturb(hf, seed)
    if config.tie_word_embeddings:
        hf.tie_weights()
    mar_config = config_from_hf(config.to_dict())
    assert mar_config.ffn is None
    model = MARLM(mar_config)
    model.load_state_dict(state_dict_from_hf(mar_config, hf.state_dict()), strict=True)
    return hf, model.eval()


HF_CASES = {
    "plain": {},  # residual_in_fp32 (HF's default)
    "tied": {"tie_word_embeddings": True},
    "biases": {"use_bias": True, "use_conv_bias": False},
    "dt-clamp": {"time_step_limit": (0.02, 0.3)},
    "groups": {"n_groups": 2, "state_size": 4},
    "no-fp32": {"residual_in_fp32": False, "layer_norm_epsilon": 1e-3, "use_bias": True},
}


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_converted_mamba2_fused_equals_step_to_the_bit(case, dtype, batch):
    _, model = hf_pair(seed=sorted(HF_CASES).index(case), **HF_CASES[case])
    model.to(dtype)
    assert model.config.residual_in_fp32 == HF_CASES[case].get("residual_in_fp32", True)
    if "tie_word_embeddings" in HF_CASES[case]:
        assert model.head.weight is model.embed.weight
    pairs, state, want_state = step_both(model, batch, seed=batch)
    assert_bitwise(pairs, state, want_state)


def test_residual_in_fp32_rounding_matters_in_float64():
    """The case above can fail: in float64 the stream's rounding to float32 before each mixer
    add changes the logits, so a fused step that left it out (or rounded always) would differ."""
    _, model = hf_pair(seed=3)
    model.to(torch.float64)
    fused_fp32 = FusedStep(model, 2)
    for layer in model.layers:
        layer.residual_in_fp32 = False
    fused_plain = FusedStep(model, 2)
    pairs_plain, _, _ = step_both(model, 2, fused=fused_plain)
    assert all(torch.equal(got, want) for got, want in pairs_plain)
    for layer in model.layers:
        layer.residual_in_fp32 = True
    pairs_fp32, _, _ = step_both(model, 2, fused=fused_fp32)
    assert all(torch.equal(got, want) for got, want in pairs_fp32)
    assert not torch.equal(pairs_plain[-1][1], pairs_fp32[-1][1])


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_spiking_student_of_converted_mamba2_fused_equals_step_to_the_bit(tau, dtype, batch):
    _, dense = hf_pair(seed=7, n_groups=2, state_size=4, time_step_limit=(0.01, 0.5))
    student = spiking_student(dense.to(dtype), SpikeConfig(T=4, tau=tau))
    assert len(list(student.spike_points())) == 4
    pairs, state, want_state = step_both(student, batch, seed=10 + batch)
    assert_bitwise(pairs, state, want_state)
    dense_pairs, _, _ = step_both(dense, batch, seed=10 + batch)  # the spikes did something
    assert not torch.equal(pairs[-1][1], dense_pairs[-1][1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_more_sequences_than_the_fast_rows_fused_is_close_to_step(dtype):
    batch = MAX_FAST_ROWS + 4
    _, dense = hf_pair(seed=2, use_bias=True, tie_word_embeddings=True)
    dense.to(dtype)
    assert_close(step_both(dense, batch, seed=1)[0], dtype)
    student = spiking_student(dense, SpikeConfig(T=4, tau=2.0))
    assert_close(step_both(student, batch, seed=2)[0], dtype)


# -- models with an FFN ---------------------------------------------------------------------


def mar_model(seed: int = 0, dtype=torch.float32, spikes="none", **overrides) -> MARLM:
    kwargs = dict(vocab_size=VOCAB, d_model=32, n_layers=2, d_state=8, head_dim=8,
                  chunk_size=8, spikes=None)  # fmt: skip
    if spikes != "none":
        kwargs["spikes"] = spikes
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = MARLM(MARConfig(**kwargs)).to(dtype).eval()
    perturb(model, seed)
    return model


FFN_CASES = {
    "swiglu": {},
    "swiglu-bias-groups": {"ffn_bias": True, "n_groups": 2, "bias": True, "norm_eps": 1e-5},
    "llamba": {"layers": "discrete-mamba2", "ffn": "llama", "n_groups": 2,
               "conv_activation": "silu", "ffn_hidden": 48, "tie_embeddings": True},
}  # fmt: skip
SPIKES = {
    "dense": "none",
    "channel": SpikeConfig(T=4, tau=2.0, threshold="channel"),
    "layer": SpikeConfig(T=3, tau=1.0, threshold="layer"),
    "first-layer": SpikeConfig(T=4, tau=1.0),  # spiking=[True, False]
}


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("spikes", sorted(SPIKES))
@pytest.mark.parametrize("case", sorted(FFN_CASES))
def test_models_with_an_ffn_fused_is_close_to_step(case, spikes, dtype, batch):
    overrides = dict(FFN_CASES[case])
    if spikes == "first-layer":
        overrides["spiking"] = [True, False]
    model = mar_model(sorted(FFN_CASES).index(case), dtype, SPIKES[spikes], **overrides)
    assert all(layer.ffn is not None for layer in model.layers)
    points = list(model.spike_points())
    if spikes == "channel":  # the thresholds differ per channel (perturb moved them)
        a = points[0].module.neuron.log_threshold
        assert a.dim() == 1 and a.numel() == 32 and a.std() > 0
    if spikes == "first-layer":
        assert points and all(p.name.startswith("layers.0.") for p in points)
        assert any(p.name.startswith("layers.0.ffn") for p in points)
    assert_close(step_both(model, batch, seed=batch)[0], dtype)


# -- random models (hypothesis) -------------------------------------------------------------


@st.composite
def small_models(draw):
    head_dim = draw(st.sampled_from([4, 8]))
    d_model = draw(st.sampled_from([16, 24, 32]))
    expand = draw(st.integers(1, 2))
    heads = expand * d_model // head_dim
    n_groups = draw(st.sampled_from([g for g in (1, 2, 3, 4) if heads % g == 0]))
    spikes = None
    if draw(st.booleans()):
        spikes = SpikeConfig(
            T=draw(st.integers(1, 4)),
            tau=draw(st.sampled_from([1.0, 2.0, math.inf])),
            threshold=draw(st.sampled_from(["channel", "layer"])),
            neuron=draw(st.sampled_from(["atmn", "binary", "ternary-single"])),
        )
    config = MARConfig(
        vocab_size=draw(st.integers(2, 50)), d_model=d_model, n_layers=draw(st.integers(1, 3)),
        head_dim=head_dim, d_state=draw(st.sampled_from([2, 4, 8])), expand=expand,
        n_groups=n_groups, chunk_size=8, ffn=draw(st.sampled_from([None, "swiglu"])),
        layers=draw(st.sampled_from(["ssm", "discrete-mamba2"])), spikes=spikes,
    )  # fmt: skip
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    return config, dtype, draw(st.integers(1, 4)), draw(st.integers(0, 2**16))


@settings(max_examples=15, deadline=None)
@given(small_models())
def test_random_models_fused_is_close_to_step(drawn):
    config, dtype, batch, seed = drawn
    torch.manual_seed(seed)
    model = MARLM(config).to(dtype).eval()
    perturb(model, seed)
    pairs, state, want_state = step_both(model, batch, n_tokens=3, seed=seed)
    assert_close(pairs, dtype)
    if config.ffn is None and batch <= MAX_FAST_ROWS:  # to the bit, as promised
        assert_bitwise(pairs, state, want_state)


# -- generate(..., fused=True) --------------------------------------------------------------


@pytest.mark.parametrize("spiking", [False, True])
def test_fused_generate_gives_the_same_tokens(spiking):
    model = mar_model(4, spikes=SpikeConfig(T=4) if spiking else "none")
    prompt = torch.randint(0, VOCAB, (3, 5), generator=torch.Generator().manual_seed(1))
    greedy = generate(model, prompt, 8, temperature=0)
    assert torch.equal(generate(model, prompt, 8, temperature=0, fused=True), greedy)
    assert torch.equal(model.generate(prompt[0], 8, temperature=0, fused=True), greedy[0])
    sampled = [
        generate(
            model,
            prompt,
            8,
            temperature=1.5,
            top_k=20,
            fused=fused,
            generator=torch.Generator().manual_seed(9),
        )
        for fused in (False, True)
    ]
    assert torch.equal(sampled[0], sampled[1])
    assert not torch.equal(sampled[0], greedy)  # sampling did sample
    assert model.training is False


def test_fused_greedy_generate_equals_transformers():
    hf, model = hf_pair(seed=11)
    prompt = torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        # no end-of-text stop: spikemar's generate has none, transformers' would pad after it
        want = hf.generate(
            prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False,
            attention_mask=torch.ones_like(prompt), eos_token_id=None,
        )  # fmt: skip
    assert torch.equal(model.generate(prompt, 12, temperature=0, fused=True), want)


# -- fallbacks: counts and rasters ----------------------------------------------------------


def test_fused_call_enters_no_module():
    """The fused path is one C call: no module's forward runs (their hooks do not fire)."""
    model = mar_model(5, spikes=SpikeConfig(T=2))
    fused = FusedStep(model, 2)
    state = fused.init_state()
    calls = []
    handle = nn.modules.module.register_module_forward_pre_hook(
        lambda module, args: calls.append(type(module).__name__)
    )
    try:
        with torch.no_grad():
            fused(torch.tensor([1, 2]), state)
            assert calls == []
            model.step(torch.tensor([1, 2]), model.init_state(2, in_place=True))
    finally:
        handle.remove()
    assert {"RMSNorm", "Linear", "SpikePoint"} <= set(calls)  # the hook sees the module path


def test_under_the_energy_counter_fused_counts_as_step():
    model = mar_model(6, spikes=SpikeConfig(T=3), spiking=[True, False])
    tokens = torch.randint(0, VOCAB, (4, 2), generator=torch.Generator().manual_seed(2))
    reports = []
    for fused in (False, True):
        step = FusedStep(model, 2) if fused else model.step
        state = model.init_state(2, in_place=True)
        counter = EnergyCounter(model)
        logits = []
        with torch.no_grad(), counter:
            for t in tokens:
                out, state = step(t, state)
                logits.append(out)
        reports.append((counter.report().to_dict(), logits))
    (want, want_logits), (got, got_logits) = reports
    assert want["rows"] and got == want
    assert all(torch.equal(g, w) for g, w in zip(got_logits, want_logits, strict=True))


def test_a_recording_spike_point_gets_its_spikes_through_a_fused_call():
    model = mar_model(7, spikes=SpikeConfig(T=4))
    point = model.layers[0].mixer.spike_in
    assert isinstance(point, SpikePoint)
    fused = FusedStep(model, 3)
    state = fused.init_state()
    want_state = model.init_state(3, in_place=True)
    tokens = torch.tensor([4, 5, 6])
    with torch.no_grad():
        fused(tokens, state)  # not recording: nothing kept
        model.step(tokens, want_state)
        assert point.spikes is None
        point.record = True
        model.step(tokens, want_state)
        want = point.spikes
        point.spikes = None
        fused(tokens, state)
    assert point.spikes is not None and point.spikes.shape == (4, 3, 32)
    assert torch.equal(point.spikes, want) and point.spikes.abs().sum() > 0
    point.record = False
    pairs, _, _ = step_both(model, 3, fused=fused)  # and back on the C path, as before
    assert_close(pairs, torch.float32)


# -- what it reads at each call -------------------------------------------------------------


@pytest.mark.parametrize("ffn", [None, "swiglu"])
def test_in_place_weight_changes_are_seen(ffn):
    model = mar_model(8, dtype=torch.float64, ffn=ffn, tie_embeddings=ffn is None)
    fused = FusedStep(model, 2)
    before, _, _ = step_both(model, 2, n_tokens=2, fused=fused)
    with torch.no_grad():
        model.head.weight.mul_(2)
        model.layers[0].norm1.weight.add_(0.5)
        mixer = model.layers[1].mixer
        mixer.in_proj.weight.mul_(-1.5)
        mixer.A_log.add_(0.3)
        mixer.conv.weight.mul_(0.5)
        mixer.D.add_(1.0)
        if ffn is not None:
            model.layers[0].ffn.up.weight.mul_(3)
    after, state, want_state = step_both(model, 2, n_tokens=3, fused=fused)
    assert not torch.equal(after[0][1], before[0][1])
    if ffn is None:
        assert_bitwise(after, state, want_state)
    else:
        assert_close(after, torch.float64)
    other = mar_model(9, dtype=torch.float64, ffn=ffn, tie_embeddings=ffn is None)
    model.load_state_dict(other.state_dict())  # copies into the same storage
    want = [w for _, w in step_both(other, 2, n_tokens=2)[0]]
    got = [g for g, _ in step_both(model, 2, n_tokens=2, fused=fused)[0]]
    if ffn is None:
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    assert_close(list(zip(got, want, strict=True)), torch.float64)


def test_replaced_storage_raises():
    model = mar_model(10, ffn=None)
    fused = FusedStep(model, 1)
    state = fused.init_state()
    fused(torch.tensor([3]), state)
    model.double()
    with pytest.raises(RuntimeError, match="storage"):
        fused(torch.tensor([3]), state)
    fused = FusedStep(model, 1)  # a new one serves the float64 model
    assert fused.dtype == torch.float64
    assert_bitwise(*step_both(model, 1, n_tokens=2, fused=fused))


# -- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [0, -1, True, "1", 1.0, None])
def test_bad_batch(batch):
    with pytest.raises(ValueError, match="batch"):
        FusedStep(mar_model(0, ffn=None, n_layers=1), batch)


@pytest.mark.parametrize("kind", ["attn", "lti"])
def test_attention_and_lti_models_are_refused(kind):
    model = mar_model(0, layers=kind, n_layers=1)
    with pytest.raises(ValueError, match=f"'{kind}'"):
        FusedStep(model)
    reason = unsupported_reason(model)
    assert isinstance(reason, str) and f"'{kind}'" in reason
    with pytest.raises(ValueError, match=kind):
        generate(model, torch.tensor([1, 2]), 2, fused=True)
    mixed = mar_model(0, layers=["ssm", kind])
    with pytest.raises(ValueError, match=f"'{kind}'"):
        FusedStep(mixed)


def test_other_unsupported_models_are_refused():
    sparse = mar_model(0, ffn_sparsity=("topk", 0.5))
    with pytest.raises(ValueError, match=r"layers\.0\.ffn"):
        FusedStep(sparse)
    assert "layers.0.ffn" in unsupported_reason(sparse)
    for module in (nn.Linear(4, 4), nn.Sequential(mar_model(0))):
        with pytest.raises(ValueError, match="MARLM"):
            FusedStep(module)
        assert "MARLM" in unsupported_reason(module)

    class OwnStep(MARLM):
        def step(self, tokens_t, state):
            return super().step(tokens_t, state)

    with pytest.raises(ValueError, match="MARLM"):
        FusedStep(OwnStep(mar_model(0).config))
    with pytest.raises(ValueError, match="float32/float64"):
        FusedStep(mar_model(0, ffn=None).to(torch.bfloat16))
    with pytest.raises(ValueError, match="backend"):
        FusedStep(mar_model(0, spikes=SpikeConfig(T=2, backend="torch")))


def test_unsupported_reason_is_none_for_supported_models():
    assert unsupported_reason(mar_model(0)) is None
    assert unsupported_reason(mar_model(0, spikes=SpikeConfig(T=2)), batch=20) is None
    assert unsupported_reason(mar_model(0, layers="discrete-mamba2", ffn="llama")) is None


def test_bad_tokens():
    model = mar_model(11, spikes=SpikeConfig(T=2))
    fused = FusedStep(model, 2)
    state = fused.init_state()
    for bad in (VOCAB, VOCAB + 7, -1, -300):
        with pytest.raises(ValueError, match=rf"tokens_t.*{bad}"):
            fused(torch.tensor([1, bad]), fused.init_state())
    for shape in ((3,), (1, 2), (2, 1), (), (0,)):
        with pytest.raises(ValueError, match=r"tokens_t.*\[2\]"):
            fused(torch.ones(shape, dtype=torch.int64), state)
    for bad in (torch.tensor([1.0, 2.0]), torch.tensor([True, False]), [1, 2], 3):
        with pytest.raises(TypeError, match="tokens_t"):
            fused(bad, state)
    # int64 and int32 ids are taken (what nn.Embedding takes), other integer types refused by
    # both paths alike, and the state was not spent by the errors
    for dtype in (torch.int16, torch.uint8):
        t = torch.tensor([3, 4], dtype=dtype)
        with pytest.raises(TypeError, match=r"tokens_t.*integer.*int64/int32"):
            fused(t, state)
        with pytest.raises(TypeError, match=r"tokens_t.*integer.*int64/int32"):
            model.step(t, model.init_state(2, in_place=True))
    pairs = []
    want_state = model.init_state(2, in_place=True)
    with torch.no_grad():
        for dtype in (torch.int64, torch.int32):
            t = torch.tensor([3, VOCAB - 1], dtype=dtype)
            pairs.append((fused(t, state)[0], model.step(t, want_state)[0]))
    assert_close(pairs, torch.float32)


def test_bad_states():
    model = mar_model(12, ffn=None)
    tokens = torch.tensor([1, 2])
    for ran_before in (False, True):
        fused = FusedStep(model, 2)
        if ran_before:  # its state pointers are kept, and checked again when the state changes
            fused(tokens, fused.init_state())
        with pytest.raises(ValueError, match="in_place"):
            fused(tokens, model.init_state(2))
        with pytest.raises(ValueError, match=r"state\[0\]"):
            fused(tokens, model.init_state(3, in_place=True))
        good = fused.init_state()
        wrong_length = [good[:1], [*good, good[0]]] + ([[]] if ran_before else [])  # see below
        for bad in [*wrong_length, tuple(good)]:
            with pytest.raises(ValueError, match="state: expected the list of 2"):
                fused(tokens, bad)
        with pytest.raises(ValueError, match=r"state\[1\]"):
            fused(tokens, [good[0], "x"])
        with pytest.raises(ValueError, match=r"state\[0\]\.ssm"):
            fused(tokens, [MixerState(good[0].conv, good[0].ssm[:1], True), good[1]])
        wrong_dtype = [MixerState(s.conv.double(), s.ssm.double(), True) for s in good]
        with pytest.raises(ValueError, match=r"state\[0\]\.conv"):
            fused(tokens, wrong_dtype)
        assert_bitwise(*step_both(model, 2, n_tokens=2, fused=fused))  # nothing was spent


def test_an_empty_state_list_before_any_call_raises():
    """Run in a child process: the failure is a crash."""
    code = textwrap.dedent("""
        import torch
        from spikemar.models import MARLM, MARConfig
        from spikemar.models.fused_step import FusedStep
        config = MARConfig(vocab_size=20, d_model=16, n_layers=1, d_state=4, head_dim=4,
                           ffn=None, spikes=None)
        fused = FusedStep(MARLM(config).eval(), 1)
        try:
            fused(torch.tensor([1]), [])
        except ValueError as err:
            print("ValueError:", err)
    """)
    done = run_child(code)
    assert done.returncode == 0, (done.returncode, done.stderr[-1000:])
    assert "ValueError: state" in done.stdout


def test_a_state_that_is_not_a_list_raises_value_error():
    model = mar_model(12, ffn=None)
    tokens = torch.tensor([1, 2])
    with pytest.raises(ValueError, match="state"):
        model.step(tokens, None)
    with pytest.raises(ValueError, match="state"):
        FusedStep(model, 2)(tokens, None)


def stepped_fused_state():
    """A FusedStep that has run with ``state`` once (its pointers kept), and a token."""
    model = mar_model(12, ffn=None)
    fused = FusedStep(model, 2)
    state = fused.init_state()
    tokens = torch.tensor([1, 2])
    fused(tokens, state)
    return model, fused, state, tokens


# The three below: after one call, FusedStep.__call__ checks a state by the identity of the list's
# objects and their tensors; a container or layer state that wraps the same tensors must still
# meet _state_pointers' checks, as the same input does before any call.


def test_a_state_entry_that_is_not_a_layer_state_raises_value_error_after_a_call():
    model, fused, state, tokens = stepped_fused_state()
    with pytest.raises(ValueError, match=r"state\[1\]"):
        model.step(tokens, [state[0], "x"])
    with pytest.raises(ValueError, match=r"state\[1\]"):
        fused(tokens, [state[0], "x"])


def test_a_tuple_of_states_is_refused_after_a_call():
    model, fused, state, tokens = stepped_fused_state()
    with pytest.raises(ValueError, match="state"):
        model.step(tokens, tuple(state))
    with pytest.raises(ValueError, match="state"):
        fused(tokens, tuple(state))


def test_a_state_not_made_in_place_is_refused_after_a_call():
    _, fused, state, tokens = stepped_fused_state()
    not_in_place = [MixerState(s.conv, s.ssm, False) for s in state]
    kept = [s.ssm.clone() for s in not_in_place]
    with pytest.raises(ValueError, match="in_place"):
        fused(tokens, not_in_place)
    assert all(torch.equal(k, s.ssm) for k, s in zip(kept, not_in_place, strict=True))


def test_bad_generate_fused():
    model = mar_model(0, ffn=None)
    for bad in ("yes", 1, None):
        with pytest.raises(ValueError, match="fused"):
            generate(model, torch.tensor([1, 2]), 2, fused=bad)


def test_nan_reaching_a_spike_point_raises_as_step_does():
    _, dense = hf_pair(seed=12)
    student = spiking_student(dense, SpikeConfig(T=4))
    fused = FusedStep(student, 2)
    with torch.no_grad():
        kept = student.embed.weight[5].clone()
        student.embed.weight[5] = math.nan
        tokens = torch.tensor([1, 5])
        with pytest.raises(ValueError) as want:
            student.step(tokens, student.init_state(2, in_place=True))
        with pytest.raises(ValueError, match="spike point") as got:
            fused(tokens, fused.init_state())
        assert "NaN" in str(got.value) and "NaN" in str(want.value)
        student.embed.weight[5] = kept
    assert_bitwise(*step_both(student, 2, fused=fused))  # usable again with a fresh state


@pytest.mark.parametrize(("name", "value"), [("A_log", math.inf), ("dt_bias", math.nan)])
def test_a_decay_that_is_not_finite_raises_as_step_does(name, value):
    _, model = hf_pair(seed=13)
    fused = FusedStep(model, 2)
    parameter = getattr(model.layers[1].mixer, name)
    kept = parameter.detach().clone()
    tokens = torch.tensor([1, 2])
    with torch.no_grad():
        parameter[3] = value
        with pytest.raises(ValueError, match="decay"):
            model.step(tokens, model.init_state(2, in_place=True))
        with pytest.raises(ValueError, match=r"layers\.1\.mixer.*decay"):
            fused(tokens, fused.init_state())
        parameter.copy_(kept)
    assert_bitwise(*step_both(model, 2, fused=fused))


# -- review: crashes, thread safety, parity ---------------------------------------------------


def run_child(code: str) -> subprocess.CompletedProcess:
    """``code`` in a child process (the failures these guard against are crashes)."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
        timeout=300, cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip


def test_two_threads_calling_one_fused_step_get_their_own_logits():
    """ctypes releases the GIL during the C call: two threads' calls shared the head's logits
    pointer and the scratch buffers (one thread's logits written into the other's freed tensor:
    a crash, or wrong logits). Calls are serialized."""
    done = run_child("""
        import threading, torch
        from spikemar.models import MARLM, MARConfig
        from spikemar.models.fused_step import FusedStep
        torch.manual_seed(0)
        config = MARConfig(vocab_size=4096, d_model=128, n_layers=2, d_state=16, head_dim=32,
                           spikes=None, ffn=None)
        fused = FusedStep(MARLM(config).eval(), 1)
        tokens = [torch.tensor([i]) for i in range(30)]
        def run(seq):
            state = fused.init_state()
            return [fused(t, state)[0].clone() for t in seq]
        want = [run(tokens), run(tokens[::-1])]
        got = [None, None]
        def work(k):
            got[k] = run(tokens if k == 0 else tokens[::-1])
        bad = 0
        for _ in range(10):
            threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
            [t.start() for t in threads]
            [t.join() for t in threads]
            bad += sum(not torch.equal(g, w) for k in range(2)
                       for g, w in zip(got[k], want[k], strict=True))
        print("mismatched", bad)
    """)
    assert done.returncode == 0, (done.returncode, done.stderr[-1000:])
    assert "mismatched 0" in done.stdout


def test_an_ffn_of_width_zero_runs_as_step():
    """ffn_hidden=0 (MARConfig takes it): the down projection has K = 0, and the GEMV's chunk
    size divided by K (SIGFPE)."""
    done = run_child("""
        import warnings, torch
        from spikemar.models import MARLM, MARConfig
        from spikemar.models.fused_step import FusedStep
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        config = MARConfig(vocab_size=20, d_model=16, n_layers=1, d_state=4, head_dim=4,
                           spikes=None, ffn_hidden=0)
        model = MARLM(config).eval()
        fused = FusedStep(model, 1)
        with torch.no_grad():
            want = model.step(torch.tensor([3]), model.init_state(1, in_place=True))[0]
        got = fused(torch.tensor([3]), fused.init_state())[0]
        print("close", torch.allclose(got, want, rtol=1e-5, atol=1e-6))
    """)
    assert done.returncode == 0, (done.returncode, done.stderr[-1000:])
    assert "close True" in done.stdout


def test_a_head_wider_than_the_config_vocabulary_gives_its_logits():
    """A head whose out_features is not config.vocab_size (a resized vocabulary): the logits
    were allocated [batch, vocab_size] and the head wrote out_features columns into them."""
    done = run_child("""
        import torch
        from spikemar.models import MARLM, MARConfig
        from spikemar.models.fused_step import FusedStep
        from spikemar.ssm.linear import Linear
        torch.manual_seed(0)
        config = MARConfig(vocab_size=20, d_model=16, n_layers=1, d_state=4, head_dim=4,
                           spikes=None, ffn=None)
        model = MARLM(config).eval()
        model.head = Linear(16, 1 << 16)
        fused = FusedStep(model, 1)
        state, want_state = fused.init_state(), model.init_state(1, in_place=True)
        with torch.no_grad():
            for t in range(30):
                token = torch.tensor([t % 20])
                got, want = fused(token, state)[0], model.step(token, want_state)[0]
                assert got.shape == want.shape and torch.equal(got, want), t
        print("equal")
    """)
    assert done.returncode == 0, (done.returncode, done.stderr[-1000:])
    assert "equal" in done.stdout


def test_modules_whose_widths_do_not_fit_are_refused():
    """What the C trusts (the widths of the buffers between operations) is checked at build:
    an in_proj replaced by one of another width, an embedding of another width."""
    from spikemar.ssm.linear import Linear

    model = mar_model(0, ffn=None, n_layers=1)
    mixer = model.layers[0].mixer
    mixer.in_proj = Linear(32, mixer.in_proj.out_features - 8)
    with pytest.raises(ValueError, match=r"layers\.0\.mixer"):
        FusedStep(model)
    model = mar_model(0, ffn=None, n_layers=1)
    model.embed = nn.Embedding(VOCAB, 48)
    with pytest.raises(ValueError, match="embed"):
        FusedStep(model)
    model = mar_model(0, ffn=None, n_layers=1)
    model.layers[0].mixer.out_proj = Linear(64, 48)  # out of the mixer: 48 wide, the stream 32
    with pytest.raises(ValueError, match=r"layers\.0"):
        FusedStep(model)


def test_a_head_that_is_not_a_plain_linear_is_refused():
    """The head was compiled as a projection whatever its class: a Linear subclass with its own
    forward had that forward silently skipped, another module raised AttributeError (which
    unsupported_reason, and so the CLI, did not catch)."""
    from spikemar.ssm.linear import Linear

    class Scaled(Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    model = mar_model(0, ffn=None, n_layers=1)
    model.head = Scaled(32, VOCAB)
    with pytest.raises(ValueError, match="head"):
        FusedStep(model)
    model.head = nn.Sequential(Linear(32, VOCAB))
    assert "head" in unsupported_reason(model)


def test_spike_thresholds_changed_in_place_are_seen():
    """load_state_dict or an optimizer step changes a (V = exp(a)) in place, as it changes the
    weights: the fused step had kept the V of its build."""
    model = mar_model(13, spikes=SpikeConfig(T=3, tau=2.0))
    fused = FusedStep(model, 2)
    step_both(model, 2, n_tokens=1, fused=fused)
    other = mar_model(14, spikes=SpikeConfig(T=3, tau=2.0))
    perturb(other, 15, scale=0.5)
    model.load_state_dict(other.state_dict())
    assert_close(step_both(model, 2, n_tokens=3, fused=fused)[0], torch.float32)
    with torch.no_grad():
        for p in model.spike_points():
            p.module.neuron.log_threshold.add_(0.3)
    assert_close(step_both(model, 2, n_tokens=3, fused=fused)[0], torch.float32)
    for p in model.spike_points():  # τ, read by the kernel as τ and 1/τ
        p.module.neuron.tau = 1.5
    assert_close(step_both(model, 2, n_tokens=3, fused=fused)[0], torch.float32)


def test_ids_beyond_the_config_vocabulary_are_refused_as_step_refuses_them():
    """An embedding with more rows than config.vocab_size: model.step checks the config's."""
    model = mar_model(0, ffn=None, n_layers=1)
    with torch.no_grad():
        model.embed = nn.Embedding(VOCAB + 5, 32)
    fused = FusedStep(model, 1)
    with pytest.raises(ValueError, match=rf"tokens_t.*{VOCAB}"):
        model.step(torch.tensor([VOCAB + 2]), model.init_state(1, in_place=True))
    with pytest.raises(ValueError, match=rf"tokens_t.*{VOCAB}"):
        fused(torch.tensor([VOCAB + 2]), fused.init_state())


def test_a_state_tensor_moved_to_other_storage_is_checked_again():
    """After one call, a state tensor given another storage in place (``set_``, a growing
    ``resize_``) is checked in full again: the C program would write the old size into it."""
    _, fused, state, tokens = stepped_fused_state()
    state[0].ssm.set_(torch.zeros(3))
    with pytest.raises(ValueError, match=r"state\[0\]\.ssm"):
        fused(tokens, state)
    _, fused, state, tokens = stepped_fused_state()
    state[1].conv.resize_(*state[1].conv.shape[:-1], 64)
    with pytest.raises(ValueError, match=r"state\[1\]\.conv"):
        fused(tokens, state)
