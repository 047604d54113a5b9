"""Language models: parallel forward == recurrent step, generation, spike points, bad input."""

import pytest
import torch

from spikemar import energy
from spikemar.models import (
    FeedForward,
    SpikeConfig,
    SpikePoint,
    TransformerConfig,
    TransformerLM,
    generate,
)


def tiny_transformer(**kw):
    cfg = TransformerConfig(vocab_size=23, d_model=32, n_layers=2, n_heads=4, max_len=48, **kw)
    return TransformerLM(cfg).double().eval()


def test_transformer_step_equals_forward_on_the_same_prefix():
    model = tiny_transformer()
    tokens = torch.randint(0, 23, (3, 30))
    logits = model(tokens)
    state = model.init_state(3)
    for t in range(30):
        step_logits, state = model.step(tokens[:, t], state)
        torch.testing.assert_close(step_logits, logits[:, t], rtol=1e-10, atol=1e-10)


def test_forward_returns_the_pre_norm_hidden_state_of_every_layer():
    model = tiny_transformer()
    tokens = torch.randint(0, 23, (2, 9))
    logits, hidden = model(tokens, return_hidden=True)
    assert len(hidden) == 2 and all(h.shape == (2, 9, 32) for h in hidden)
    torch.testing.assert_close(logits, model(tokens))
    # layer 1 receives what layer 0 made of layer 0's input
    torch.testing.assert_close(hidden[1], model.blocks[0](hidden[0]))


def test_greedy_generation_follows_the_argmax_of_the_parallel_forward():
    model = tiny_transformer()
    prompt = torch.randint(0, 23, (2, 5))
    out = generate(model, prompt, 6, temperature=0)
    assert out.shape == (2, 11) and torch.equal(out[:, :5], prompt)
    for t in range(5, 11):
        assert torch.equal(out[:, t], model(out[:, :t])[:, -1].argmax(-1))


def test_sampling_respects_top_k_and_is_reproducible():
    model = tiny_transformer()
    prompt = torch.randint(0, 23, (1, 4))
    a = model.generate(
        prompt, 8, temperature=1.0, top_k=3, generator=torch.Generator().manual_seed(1)
    )
    b = model.generate(
        prompt, 8, temperature=1.0, top_k=3, generator=torch.Generator().manual_seed(1)
    )
    assert torch.equal(a, b)
    state = model.init_state(1)
    for t in range(a.shape[1] - 1):
        logits, state = model.step(a[:, t], state)
        if t >= 3:
            top3 = logits.topk(3).indices[0].tolist()
            assert a[0, t + 1].item() in top3


@pytest.mark.parametrize(
    ("tokens", "error", "match"),
    [
        (torch.tensor([[1, 2, 23]]), ValueError, r"\[0, 23\)"),
        (torch.tensor([[-1, 2]]), ValueError, r"\[0, 23\)"),
        (torch.zeros(1, 0, dtype=torch.int64), ValueError, "non-empty"),
        (torch.ones(2, 3), TypeError, "integer"),
        (torch.ones(2, dtype=torch.int64), ValueError, r"\[batch, L\]"),
        (torch.zeros(1, 49, dtype=torch.int64), ValueError, "max_len"),
    ],
)
def test_bad_tokens_are_rejected(tokens, error, match):
    with pytest.raises(error, match=match):
        tiny_transformer()(tokens)


def test_bad_generation_arguments_are_rejected():
    model = tiny_transformer()
    with pytest.raises(ValueError, match="prompt"):
        generate(model, torch.zeros(1, 0, dtype=torch.int64), 3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, torch.zeros(1, 2, dtype=torch.int64), -1)
    with pytest.raises(ValueError, match="top_k"):
        generate(model, torch.zeros(1, 2, dtype=torch.int64), 2, top_k=0)
    assert generate(model, torch.zeros(1, 40, dtype=torch.int64), 9).shape == (1, 49)  # 48 fed
    with pytest.raises(
        ValueError,
        match="max_new_tokens: a prompt of 40 tokens and 10 new ones "
        "need 49 places in the KV cache; the model has 48",
    ):
        generate(model, torch.zeros(1, 40, dtype=torch.int64), 10)  # said before any work
    with pytest.raises(ValueError, match="need 49 places"):
        generate(model, torch.zeros(1, 49, dtype=torch.int64), 1)


@pytest.mark.parametrize(
    ("kw", "match"), [({"n_heads": 5}, "n_heads"), ({"d_model": 0}, "d_model")]
)
def test_bad_transformer_config(kw, match):
    with pytest.raises(ValueError, match=match):
        TransformerConfig(**kw)


# -- spike points ---------------------------------------------------------------------------------


def test_spike_point_decodes_the_atmn_spike_train_and_records_it():
    sp = SpikePoint(8, SpikeConfig(T=4, tau=1.0, v_threshold=0.25))
    x = torch.randn(3, 5, 8)
    sp.record = True
    y = sp(x)
    assert sp.spikes.shape == (4, 3, 5, 8)
    torch.testing.assert_close(y, sp.neuron.decode(sp.spikes))
    in_range = x.abs() < (4 + 1) * 0.25  # τ = 1: |I − decode| < V while |I| < (T+1)·V
    assert in_range.any() and ((x - y).abs()[in_range] < 0.25 + 1e-6).all()


def test_spike_point_passes_gradients_and_trains_its_threshold():
    sp = SpikePoint(6, SpikeConfig(T=4))
    x = torch.randn(10, 6, requires_grad=True)
    sp(x).pow(2).sum().backward()
    assert x.grad.abs().sum() > 0 and sp.neuron.a.grad.shape == (6,)


def test_dense_ffn_has_no_spike_points_and_the_spiking_one_has_two():
    dense, spiking = FeedForward(16, 40), FeedForward(16, 40, SpikeConfig())
    assert not any(isinstance(m, SpikePoint) for m in dense.modules())
    assert sum(isinstance(m, SpikePoint) for m in spiking.modules()) == 2


def test_spiking_ffn_projections_count_accumulates_not_macs():
    torch.manual_seed(0)
    ffn = FeedForward(16, 40, SpikeConfig(T=4, v_threshold=0.3))
    x = torch.randn(2, 7, 16)
    report = energy.profile(ffn, x)
    rows = {r.name: r for r in report.rows}
    for name in ("gate", "up", "down"):
        assert rows[name].macs == 0 and rows[name].acs > 0
    sp_in, sp_hidden = ffn.spike_in, ffn.spike_hidden
    sp_in.record = sp_hidden.record = True
    ffn(x)
    # ACs of a projection = Σ_t nnz(s_t) × fan-out, exactly
    assert rows["gate"].acs == int((sp_in.spikes != 0).sum()) * 40
    assert rows["down"].acs == int((sp_hidden.spikes != 0).sum()) * 16


def test_bad_spike_config():
    with pytest.raises(ValueError, match="T"):
        SpikeConfig(T=0)
    with pytest.raises(ValueError, match="threshold"):
        SpikeConfig(threshold="neuron")
    with pytest.raises(ValueError, match="neuron"):
        SpikeConfig(neuron="lif")


def test_pretrained_benchmark_prints_the_whole_table(load_script, capsys):
    """benchmarks/bench_pretrained.py's quick configuration (a tiny Mamba-2) runs in-process
    and prints two Markdown rows per batch (model.step, the fused step) and the prefill row,
    every cell filled. No timing assertions: speed lives in benchmarks/."""
    bench = load_script("benchmarks/bench_pretrained.py")
    args = ["--quick", "--batches", "1", "2", "--rounds", "1", "--tokens", "2", "--hf-tokens",
            "1", "--prefill", "8", "--threads", "1"]  # fmt: skip
    assert bench.main(args) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    assert [r.split(" | ")[0:2] for r in rows[1:]] == [
        ["| generation (model.step), ms/token", "1"],
        ["| generation (fused step), ms/token", "1"],
        ["| generation (model.step), ms/token", "2"],
        ["| generation (fused step), ms/token", "2"],
        ["| prefill 8 tokens, s", "1"],
    ]
    for row in rows[1:]:
        cells = [c.strip() for c in row.strip("| ").split(" | ")]
        assert len(cells) == 9
        numbers = [c for c in cells[2:] if c != "–"]
        assert len(numbers) == (7 if "generation" in row else 5)
        assert all(float(c) > 0 for c in numbers)
    assert "max |Δlogit| spikemar dense vs transformers" in out


def test_prefill_benchmark_prints_the_whole_table(load_script, capsys):
    """benchmarks/bench_prefill.py's quick configuration: per prompt length, the three ways to
    the first token and the two greedy-evaluation paths, every cell filled."""
    bench = load_script("benchmarks/bench_prefill.py")
    args = ["--quick", "--prompts", "3", "9", "--new", "2", "--repeats", "1", "--threads", "1"]
    assert bench.main(args) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    names = [r.split(" | ")[0].lstrip("| ") for r in rows[1:]]
    per_prompt = ["time to first token, prefill", "time to first token, step per token",
                  "time to first token, fused step per token",
                  "greedy evaluation, 2 new tokens, prefill + steps",
                  "greedy evaluation, 2 new tokens, forward per new token",
                  "greedy evaluation, 8 requests × 2 new tokens, batch 1",
                  "greedy evaluation, 8 requests × 2 new tokens, batch 8"]  # fmt: skip
    assert names == per_prompt * 2
    assert [r.split(" | ")[1] for r in rows[1:]] == ["3"] * 7 + ["9"] * 7
    first = [c.strip() for c in rows[1].strip("| ").split(" | ")]
    assert first[2].endswith(" ms") and first[4].endswith(" ms")  # transformers' prefill too


@pytest.mark.parametrize("kind", ["mar", "transformer"])
def test_gradient_checkpointing_keeps_only_layer_inputs_and_the_same_gradients(kind):
    """gradient_checkpointing_enable(): the same gradients (bit for bit: the layers run the
    same operations again), and far fewer bytes kept between forward and backward."""
    from torch.autograd.graph import saved_tensors_hooks

    from spikemar.models import MARLM, MARConfig, SpikeConfig, TransformerConfig, TransformerLM

    torch.manual_seed(0)
    if kind == "mar":
        model = MARLM(MARConfig(vocab_size=50, d_model=32, n_layers=3, d_state=8,
                                spikes=SpikeConfig(T=4)))  # fmt: skip
    else:
        model = TransformerLM(TransformerConfig(vocab_size=50, d_model=32, n_layers=3,
                                                n_heads=4, max_len=64))  # fmt: skip
    model = model.double().train()
    x = torch.randint(0, 50, (2, 40), generator=torch.Generator().manual_seed(1))

    def gradients_and_kept_bytes():
        model.zero_grad()
        kept = []

        def pack(t):
            kept.append(t.numel() * t.element_size())
            return t

        with saved_tensors_hooks(pack, lambda t: t):
            loss = model(x).logsumexp(-1).mean()
        loss.backward()
        return [p.grad.clone() for p in model.parameters()], sum(kept)

    plain, plain_bytes = gradients_and_kept_bytes()
    model.gradient_checkpointing_enable()
    assert model.gradient_checkpointing
    again, kept_bytes = gradients_and_kept_bytes()
    assert all(torch.equal(a, b) for a, b in zip(plain, again, strict=True))
    assert kept_bytes < plain_bytes / 4
    model.gradient_checkpointing_disable()
    assert gradients_and_kept_bytes()[1] == plain_bytes


def test_gradient_checkpointing_speaks_transformers_names():
    from spikemar.models import MARLM, MARConfig

    model = MARLM(MARConfig(vocab_size=20, d_model=16, n_layers=1, d_state=4))
    assert model.supports_gradient_checkpointing and not model.is_gradient_checkpointing
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.is_gradient_checkpointing
    with pytest.raises(ValueError, match="gradient_checkpointing_kwargs: spikemar checkpoints"):
        model.gradient_checkpointing_enable({"use_reentrant": True})
