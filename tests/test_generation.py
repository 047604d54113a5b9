"""Sampling in ``generate``: temperature, top-k and top-p (nucleus) as transformers' logits
warpers compute them, the same sampled tokens as transformers' ``generate`` on the same weights
and seed, ``pad_token_id``, and a generator on another device than the model."""

from __future__ import annotations

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

from spikemar.models import MARLM, MARConfig
from spikemar.models.generation import filter_logits
from spikemar.models.pretrained import config_from_hf, state_dict_from_hf


def hf_warped(logits, temperature, top_k, top_p):
    """transformers' own warpers, in the order its ``generate`` applies them."""
    scores = logits.float()
    ids = torch.zeros(logits.shape[0], 1, dtype=torch.long)
    if temperature != 1.0:
        scores = transformers.TemperatureLogitsWarper(temperature)(ids, scores)
    if top_k is not None:
        scores = transformers.TopKLogitsWarper(top_k)(ids, scores)
    if top_p is not None and top_p < 1:
        scores = transformers.TopPLogitsWarper(top_p)(ids, scores)
    return scores


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    vocab=st.integers(2, 200),
    temperature=st.sampled_from([1.0, 0.7, 1.3]),
    top_k=st.one_of(st.none(), st.integers(1, 250)),
    top_p=st.one_of(st.none(), st.floats(0.01, 1.0)),
    ties=st.booleans(),
)
def test_filter_logits_equals_transformers_warpers(seed, vocab, temperature, top_k, top_p, ties):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, vocab, generator=g) * 3
    if ties:  # repeated values: the k-th and the nucleus's edge fall on ties
        logits = logits.round()
    got = filter_logits(logits, temperature, top_k, top_p)
    want = hf_warped(logits, temperature, top_k, top_p)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    assert torch.equal(got[~torch.isinf(got)], want[~torch.isinf(want)])
    assert bool((~torch.isinf(got)).any(-1).all())  # at least one token always stays


def test_filter_logits_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda p: (~torch.isinf(filter_logits(logits, 1.0, None, p))).sum().item()  # noqa: E731
    assert [kept(p) for p in (0.4, 0.5, 0.6, 0.8, 0.9, 0.96, 1.0)] == [1, 1, 2, 2, 3, 4, 4]


def _pair(seed: int = 0):
    """A random transformers Mamba2ForCausalLM in float64 and spikemar's conversion of it."""
    torch.manual_seed(seed)
    config = transformers.Mamba2Config(
        vocab_size=61, hidden_size=32, state_size=8, num_hidden_layers=2, head_dim=8,
        num_heads=8, expand=2, conv_kernel=4, n_groups=1, chunk_size=8,
        tie_word_embeddings=False, pad_token_id=0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    hf = transformers.Mamba2ForCausalLM(config).double().eval()
    with torch.no_grad():  # logits spread enough that sampling is not near-uniform
        hf.lm_head.weight.mul_(20)
    mar_config = config_from_hf(config.to_dict())
    model = MARLM(mar_config).double()
    model.load_state_dict(state_dict_from_hf(mar_config, hf.state_dict()), strict=True)
    return hf, model.eval()


@pytest.mark.parametrize(
    "sampling",
    [
        {"temperature": 1.0},
        {"temperature": 0.7, "top_k": 5},
        {"temperature": 1.2, "top_p": 0.8},
        {"temperature": 0.9, "top_k": 20, "top_p": 0.6},
    ],
)
def test_sampled_tokens_equal_transformers_generate(sampling):
    """The same seed, the same weights (float64), the same tokens: spikemar draws from the
    same filtered distribution with the same one multinomial call per token."""
    hf, model = _pair()
    prompt = torch.randint(1, 61, (3, 5), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(123)
    want = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True,
                       max_new_tokens=15, min_new_tokens=15, top_k=sampling.get("top_k", 0),
                       top_p=sampling.get("top_p", 1.0), temperature=sampling["temperature"],
                       eos_token_id=None, pad_token_id=0)  # fmt: skip
    got = model.generate(prompt, 15, generator=torch.Generator().manual_seed(123), **sampling)
    assert torch.equal(got, want)


def test_pad_token_id_pads_finished_rows_as_transformers():
    hf, model = _pair(seed=2)
    prompt = torch.randint(1, 61, (4, 3), generator=torch.Generator().manual_seed(4))
    greedy = model.generate(prompt, 12, temperature=0)
    eos = int(greedy[0, 5])  # a token the first row makes: that row ends early
    want = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                       max_new_tokens=12, eos_token_id=eos, pad_token_id=7)  # fmt: skip
    got = model.generate(prompt, 12, temperature=0, eos_token_id=eos, pad_token_id=7)
    assert torch.equal(got, want)
    assert (got[0, 6:] == 7).all() and got[0, 5] == eos
    without = model.generate(prompt, 12, temperature=0, eos_token_id=eos)
    assert (without[0, 6:] == eos).all()  # no pad_token_id: the end token pads


def test_generator_on_another_device_samples_where_it_lives():
    """A CPU generator with a CUDA model draws on the CPU: the same tokens as the CPU model
    (torch.multinomial alone refuses a generator on another device)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device: a CPU generator with a CUDA model")
    _, model = _pair()
    prompt = torch.randint(1, 61, (2, 4), generator=torch.Generator().manual_seed(1))
    on_cpu = model.generate(prompt, 10, generator=torch.Generator().manual_seed(5))
    on_gpu = model.cuda().generate(prompt.cuda(), 10, generator=torch.Generator().manual_seed(5))
    assert torch.equal(on_gpu.cpu(), on_cpu)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"top_p": 0.0}, "top_p: expected a number in \\(0, 1\\]"),
        ({"top_p": 1.5}, "top_p: expected a number in \\(0, 1\\]"),
        ({"top_p": True}, "top_p"),
        ({"pad_token_id": 3}, "pad_token_id: pads the sequences that made an eos_token_id"),
        ({"pad_token_id": 99, "eos_token_id": 1}, "pad_token_id: expected a token id"),
        ({"pad_token_id": [1, 2], "eos_token_id": 1}, "pad_token_id: expected one token id"),
    ],
)
def test_bad_sampling_arguments_name_themselves(kwargs, match):
    model = MARLM(MARConfig(vocab_size=20, d_model=16, n_layers=1, d_state=4)).eval()
    with pytest.raises(ValueError, match=match):
        model.generate(torch.tensor([[1, 2]]), 3, **kwargs)


def test_generator_must_be_a_generator():
    model = MARLM(MARConfig(vocab_size=20, d_model=16, n_layers=1, d_state=4)).eval()
    with pytest.raises(TypeError, match=r"generator: expected a torch\.Generator"):
        model.generate(torch.tensor([[1, 2]]), 3, generator=5)
