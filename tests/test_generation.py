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
        ({"pad_token_id": 20}, "pad_token_id: expected a token id"),
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


def _left_padded(rows: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


@pytest.mark.parametrize("fused", [False, True])
def test_left_padded_prompts_continue_as_alone_and_as_transformers(fused):
    """Prompts of three lengths, left-padded with an attention mask: each row's tokens are
    those it makes alone, and transformers' generate (which masks the padding inside its
    Mamba-2 mixer) makes the same ones."""
    hf, model = _pair(seed=3)
    g = torch.Generator().manual_seed(8)
    rows = [torch.randint(1, 61, (n,), generator=g).tolist() for n in (6, 2, 4)]
    ids, mask = _left_padded(rows)
    got = model.generate(ids, 10, temperature=0, attention_mask=mask, fused=fused)
    assert torch.equal(got[:, : ids.shape[1]], ids)  # the padded prompt kept, as transformers'
    for row, prompt in enumerate(rows):
        alone = model.generate(torch.tensor([prompt]), 10, temperature=0)
        assert torch.equal(got[row, ids.shape[1] :], alone[0, len(prompt) :]), row
    want = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=10,
                       eos_token_id=None, pad_token_id=0)  # fmt: skip
    assert torch.equal(got, want)
    # the same with sampling: each row draws from its own distribution
    sampled = model.generate(ids, 10, attention_mask=mask, top_k=5,
                             generator=torch.Generator().manual_seed(2))  # fmt: skip
    assert sampled.shape == got.shape


def test_attention_mask_of_all_ones_changes_nothing():
    _, model = _pair(seed=4)
    ids = torch.randint(1, 61, (2, 5), generator=torch.Generator().manual_seed(1))
    plain = model.generate(ids, 6, temperature=0)
    masked = model.generate(ids, 6, temperature=0, attention_mask=torch.ones_like(ids))
    assert torch.equal(plain, masked)


@pytest.mark.parametrize(
    "mask, match",
    [
        ([[1, 1, 0], [1, 1, 1]], "row 0 is not left-padded"),
        ([[0, 1, 0], [1, 1, 1]], "row 0 is not left-padded"),
        ([[0, 0, 0], [1, 1, 1]], "row 0 holds no prompt token"),
        ([[1, 1, 2], [1, 1, 1]], "expected 0 \\(padding\\) and 1"),
        ([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]], "expected 0 \\(padding\\) and 1"),
        ([[1, 1], [1, 1]], "expected a tensor of the prompt's shape \\(2, 3\\), got \\(2, 2\\)"),
    ],
)
def test_bad_attention_masks_name_the_problem(mask, match):
    model = MARLM(MARConfig(vocab_size=20, d_model=16, n_layers=1, d_state=4)).eval()
    with pytest.raises(ValueError, match=f"attention_mask: {match}"):
        model.generate(torch.tensor([[1, 2, 3], [4, 5, 6]]), 3, attention_mask=torch.tensor(mask))


def test_left_padding_needs_an_o1_state():
    from spikemar.models import TransformerConfig, TransformerLM

    teacher = TransformerLM(TransformerConfig(vocab_size=20, d_model=16, n_layers=1, n_heads=2,
                                              max_len=32)).eval()  # fmt: skip
    ids, mask = _left_padded([[1, 2, 3], [4]])
    with pytest.raises(ValueError, match="attention_mask: prompts of different lengths need"):
        teacher.generate(ids, 3, attention_mask=mask)
    # equal lengths need no stacking: the mask of ones is accepted
    out = teacher.generate(ids[:1], 3, temperature=0, attention_mask=mask[:1])
    assert out.shape == (1, 6)


def test_states_stack_and_select_rows():
    """Per-sequence states of a hybrid (SSM and attention layers) stack into one batch that
    steps as the sequences do alone, rows come back out; KV caches at other lengths do not
    stack (one clear error), a single state of any kind passes through."""
    from spikemar.models.states import select_states, stack_states, stackable

    model = MARLM(MARConfig(vocab_size=20, d_model=16, n_layers=2, d_state=4, max_len=16,
                            layers=["ssm", "attn"])).double().eval()  # fmt: skip
    a, b = torch.tensor([[1, 2, 3]]), torch.tensor([[4, 5, 6]])
    with torch.no_grad():
        _, sa = model.prefill(a, model.init_state(1))
        _, sb = model.prefill(b, model.init_state(1))
        assert stackable([sa, sb])
        both = stack_states([sa, sb])
        step, _ = model.step(torch.tensor([7, 8]), both)
        alone_a, _ = model.step(torch.tensor([7]), sa)
        torch.testing.assert_close(step[:1], alone_a)
        back = select_states(both, [1])
        again, _ = model.step(torch.tensor([8]), back)
        torch.testing.assert_close(again, step[1:])
        _, short = model.prefill(torch.tensor([[1, 2]]), model.init_state(1))
    assert not stackable([sa, short])
    with pytest.raises(ValueError, match="states: expected per-sequence states"):
        stack_states([sa, short])
    assert stack_states([("any",)]) == ("any",)


def test_text_prompts_in_a_batch_and_after_the_start_of_text_token(tmp_path):
    """A list of text prompts is one left-padded batch whose rows read as each prompt alone;
    a tokenizer that puts <|begin_of_text|> before a text has the model read it first (as
    tokenizer(prompt) feeds transformers' generate), and it is not in the returned text."""
    from references.hf_checkpoints import begin_of_text_tokenizer, write_mamba2_checkpoint

    from spikemar.models import from_pretrained
    from spikemar.tokenizer import generate_text

    write_mamba2_checkpoint(tmp_path, vocab_size=304, tokenizer=False)
    tok = begin_of_text_tokenizer()
    tok.save(tmp_path)
    model = from_pretrained(tmp_path)
    prompts = ["First Citizen:", "hear", "Before we proceed any further"]
    batch = model.generate(prompts, 8, temperature=0)
    assert isinstance(batch, list) and len(batch) == 3
    for prompt, text in zip(prompts, batch, strict=True):
        assert text == model.generate(prompt, 8, temperature=0)
        assert text.startswith(prompt) and "<|begin_of_text|>" not in text
        ids = torch.tensor([[300, *tok.encode(prompt)]])
        made = model.generate(ids, 8, temperature=0, eos_token_id=0)[0, ids.shape[1] :].tolist()
        made = made[: made.index(0)] if 0 in made else made
        assert text == tok.decode(ids[0, 1:].tolist() + made)
    assert generate_text(model, tok, prompts[:1], 4, temperature=0) == [
        generate_text(model, tok, prompts[0], 4, temperature=0)
    ]
    with pytest.raises(ValueError, match=r"prompt\[1\]: expected a non-empty string"):
        model.generate(["a", ""], 3)
    with pytest.raises(TypeError, match="prompt: expected token ids"):
        model.generate(["a", 3], 3)


def test_transformers_style_call_with_a_tokenizers_batch(tmp_path):
    """model.generate(**tokenizer(texts, return_tensors="pt", padding=True), max_new_tokens=N,
    do_sample=False), as a transformers user writes it, gives transformers' tokens."""
    from references.hf_checkpoints import write_mamba2_checkpoint
    from transformers import AutoTokenizer

    from spikemar.models import from_pretrained

    hf = write_mamba2_checkpoint(tmp_path)
    model = from_pretrained(tmp_path)
    auto = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True, padding_side="left")
    auto.pad_token = auto.eos_token
    for texts in (["First Citizen:"], ["First Citizen:", "hear", "Before we proceed"]):
        batch = auto(texts, return_tensors="pt", padding=True, return_token_type_ids=False)
        want = hf.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=0)
        got = model.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(got, want)
    # do_sample=False is greedy whatever the temperature; True samples as temperature > 0 does
    ids = batch["input_ids"][:1]
    greedy = model.generate(ids, 5, temperature=0)
    assert torch.equal(model.generate(input_ids=ids, max_new_tokens=5, do_sample=False,
                                      temperature=0.7, top_k=3), greedy)  # fmt: skip
    drawn = model.generate(ids, 5, do_sample=True, generator=torch.Generator().manual_seed(3))
    assert torch.equal(drawn, model.generate(ids, 5, generator=torch.Generator().manual_seed(3)))


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda m, x: m.generate(x, 3, input_ids=x), ValueError, "input_ids: transformers' name"),
        (lambda m, x: m.generate(max_new_tokens=3), TypeError, "prompt: expected token ids"),
        (lambda m, x: m.generate(input_ids=x), ValueError, "max_new_tokens: expected an int"),
        (lambda m, x: m.generate(x, 3, do_sample="yes"), ValueError, "do_sample: expected"),
        (lambda m, x: m.generate(x, 3, do_sample=True, temperature=0), ValueError,
         "temperature: 0 is greedy decoding; do_sample=True"),
    ],
)  # fmt: skip
def test_transformers_style_arguments_are_checked(call, error, match):
    model = MARLM(MARConfig(vocab_size=20, d_model=16, n_layers=1, d_state=4)).eval()
    with pytest.raises(error, match=match):
        call(model, torch.tensor([[1, 2]]))


def test_padding_a_kv_cache_model_can_take():
    """A Transformer (one KV cache for the batch) takes padding that is alike in every row
    (one row, or rows padded equally: the common padding is dropped), and a 1-d prompt its
    1-d mask; text prompts of different lengths it refuses by the prompts, not by a mask."""
    from spikemar.models import TransformerConfig, TransformerLM
    from spikemar.tokenizer import CharTokenizer, generate_text

    torch.manual_seed(0)
    model = TransformerLM(TransformerConfig(vocab_size=20, d_model=16, n_layers=1, n_heads=2,
                                            max_len=32)).eval()  # fmt: skip
    ids = torch.tensor([[0, 0, 5, 6], [0, 0, 7, 8]])
    mask = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1]])
    got = model.generate(ids, 4, temperature=0, attention_mask=mask)
    assert torch.equal(got[:, 4:], model.generate(ids[:, 2:], 4, temperature=0)[:, 2:])
    one = model.generate(ids[:1], 4, temperature=0, attention_mask=mask[:1])
    assert torch.equal(one, got[:1])
    flat = model.generate(ids[0], 4, temperature=0, attention_mask=mask[0])
    assert torch.equal(flat, got[0])
    model.tokenizer = CharTokenizer("abcdefghijklmnopqrst")
    with pytest.raises(ValueError, match=r"^prompt: prompts of different lengths need"):
        generate_text(model, model.tokenizer, ["abc", "a"], 2)
