"""load_checkpoint builds the model on the meta device and assigns the file's tensors: the same
model as building it and copying the weights in (every tensor bit for bit, dtype, strides,
requires_grad, the tie, the logits), holding the payload's tensors themselves (no second copy),
for every kind of model build_model makes; and about 4 B per float32 parameter at the peak
instead of ~12."""

import pytest
import torch
from references.peak_memory import needs_peak_reset, peak_growth

from spikemar.checkpoint import build_model, load_checkpoint, nonfinite_parameters, save_checkpoint
from spikemar.data import CharTokenizer

TOKENIZER = CharTokenizer("abcdefghijklmnopqrstuvwxyz .,")
V = TOKENIZER.vocab_size
SMALL = {"vocab_size": V, "d_model": 16, "n_layers": 2, "d_state": 4, "head_dim": 8}

KINDS = {
    "mar": ("mar", SMALL),
    "mar-tied-layer-threshold": (
        "mar", {**SMALL, "tie_embeddings": True, "spikes": {"T": 2, "threshold": "layer"}}
    ),
    "mar-binary-llama-biases": (
        "mar", {**SMALL, "ffn": "llama", "ffn_bias": True, "bias": True, "head_bias": True,
                "spikes": {"neuron": "binary", "T": 3}},
    ),
    "mar-ternary-single-no-ffn": (
        "mar", {**SMALL, "ffn": None, "spikes": {"neuron": "ternary-single"}}
    ),
    "mar-hybrid": (
        "mar", {**SMALL, "n_layers": 4, "layers": ["ssm", "attn", "lti", "discrete-mamba2"],
                "spiking": [True, True, False, True], "ffn_sparsity": ["topk", 0.5]},
    ),
    "mar-points": (
        "mar", {**SMALL, "points": {"layers.0.ffn.*": "dense", "layers.1.ffn.spike_hidden":
                                    {"T": 2, "v_threshold": 0.3},
                                    "layers.1.mixer.*": {"sparsify": "threshold", "amount": 0.1}}},
    ),
    "mar-dense": ("mar-dense", {**SMALL, "tie_embeddings": True, "residual_in_fp32": True}),
    "mar-dense-sparse-ffn": ("mar-dense", {**SMALL, "ffn_sparsity": ["threshold", 0.05]}),
    "transformer": ("transformer", {"vocab_size": V, "d_model": 16, "n_layers": 2, "n_heads": 2,
                                    "max_len": 32}),
}  # fmt: skip


def _saved(tmp_path, kind, config, seed=0, dtype=None, train_state=None):
    torch.manual_seed(seed)
    model = build_model(kind, config)
    with torch.no_grad():  # thresholds off their initial value, so that a rebuild cannot pass
        for name, p in model.named_parameters():
            if name.endswith("neuron.a"):
                p.add_(torch.randn(p.shape) * 0.1)
    if dtype is not None:
        model.to(dtype)
    path = tmp_path / "m.pt"
    save_checkpoint(path, model, TOKENIZER, train_state)
    return path


def _the_old_way(path):
    """What load_checkpoint did before: the model built with its random initial weights, the
    payload's tensors copied in."""
    payload = torch.load(path, weights_only=True)
    model = build_model(payload["kind"], payload["model_config"])
    model.load_state_dict(payload["model"])
    return model.eval()


def _tensors(model):
    yield from model.named_parameters(remove_duplicate=False)
    yield from model.named_buffers(remove_duplicate=False)


def _assert_same_model(model, expected):
    for prefix, module in model.named_modules():  # nothing left on the meta device
        for key, value in vars(module).items():
            assert not (isinstance(value, torch.Tensor) and value.is_meta), f"{prefix}.{key}"
    got, want = dict(_tensors(model)), dict(_tensors(expected))
    assert list(got) == list(want)
    for key, t in want.items():
        g = got[key]
        assert not g.is_meta and g.dtype == t.dtype and g.stride() == t.stride(), key
        assert g.requires_grad == t.requires_grad, key
        assert type(g) is type(t), key  # a Parameter stays a Parameter, a buffer a tensor
        assert torch.equal(g, t), key
    assert len(list(model.parameters())) == len(list(expected.parameters()))  # ties kept
    if getattr(model.config, "tie_embeddings", False):
        assert model.head.weight is model.embed.weight
    assert not model.training
    x = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x), expected(x))


@pytest.mark.parametrize("name", list(KINDS))
def test_the_model_is_the_built_one_with_the_payloads_own_tensors(tmp_path, name):
    kind, config = KINDS[name]
    path = _saved(tmp_path, kind, config)
    model, tokenizer, payload = load_checkpoint(path)
    _assert_same_model(model, _the_old_way(path))
    assert tokenizer == TOKENIZER and model.tokenizer is tokenizer
    # no second copy: each tensor of the model is the payload's, its memory included
    state = model.state_dict()
    for key, t in payload["model"].items():
        assert state[key].data_ptr() == t.data_ptr(), key


def test_a_bfloat16_checkpoint_loads_in_float32_as_before(tmp_path):
    """A model saved in bfloat16 is rebuilt as build_model builds it, in float32 (the values
    cast as load_state_dict's copy casts them), its tie one Parameter."""
    kind, config = KINDS["mar-tied-layer-threshold"]
    path = _saved(tmp_path, kind, config, dtype=torch.bfloat16)
    model, _, payload = load_checkpoint(path)
    assert payload["model"]["embed.weight"].dtype == torch.bfloat16
    assert {t.dtype for _, t in _tensors(model)} == {torch.float32}
    _assert_same_model(model, _the_old_way(path))


def test_the_tie_stays_one_parameter_while_it_learns(tmp_path):
    kind, config = KINDS["mar-tied-layer-threshold"]
    model, _, _ = load_checkpoint(_saved(tmp_path, kind, config))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(0))
    model.train()(x).square().mean().backward()
    optimizer.step()
    assert model.head.weight is model.embed.weight


def test_weights_that_do_not_fit_are_one_error(tmp_path):
    kind, config = KINDS["mar-tied-layer-threshold"]
    path = _saved(tmp_path, kind, config)
    payload = torch.load(path, weights_only=True)
    cases = {
        "missing": lambda s: s.pop("norm.weight"),
        "unexpected": lambda s: s.update(extra=torch.zeros(2)),
        "size mismatch": lambda s: s.update({"norm.weight": torch.zeros(3)}),
        "different values": lambda s: s.update({"head.weight": s["head.weight"] + 1}),
    }
    for what, change in cases.items():
        state = dict(payload["model"])
        change(state)
        torch.save({**payload, "model": state}, path)
        with pytest.raises(ValueError, match=f"checkpoint: {path} does not rebuild its model") as e:
            load_checkpoint(path)
        assert what in str(e.value), str(e.value)


def test_old_spike_point_names_are_renamed_and_cast(tmp_path):
    """The pre-hook that renames an attention layer's old spike point ('spike_attn') still
    runs: the renamed tensor is assigned, in the model's dtype."""
    kind, config = KINDS["mar-hybrid"]
    path = _saved(tmp_path, kind, config, dtype=torch.float64)
    payload = torch.load(path, weights_only=True)
    state = {k.replace("layers.1.mixer.spike_in.", "layers.1.spike_attn."): v
             for k, v in payload["model"].items()}  # fmt: skip
    assert "layers.1.spike_attn.neuron.a" in state
    torch.save({**payload, "model": state}, path)
    model, _, _ = load_checkpoint(path)
    _assert_same_model(model, _the_old_way(path))


@needs_peak_reset
def test_peak_memory_is_the_weights_once(tmp_path):
    # ~4 M float32 parameters, most in the embedding and the head as in a real LM
    config = {**SMALL, "vocab_size": 16000, "d_model": 128, "n_layers": 1}
    torch.manual_seed(0)
    model = build_model("mar", config)
    path = tmp_path / "m.pt"
    save_checkpoint(path, model, CharTokenizer("".join(chr(0x4E00 + i) for i in range(16000))))
    n = sum(p.numel() for p in model.parameters())
    del model
    first = load_checkpoint(path)  # the imports, and kept so the next cannot reuse its memory
    growth, loaded = peak_growth(lambda: load_checkpoint(path))
    del first
    # the file's tensors (4 B/param) and the allocator's slack; building the model and copying
    # the weights in took 8 (the payload and the random initial weights)
    assert growth < 5.0 * n, (growth / n, n)
    assert sum(p.numel() for p in loaded[0].parameters()) == n


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_nonfinite_weights_are_found_in_every_float_dtype(dtype):
    gen = torch.Generator().manual_seed(0)
    state = {"ints": torch.arange(5), "empty": torch.zeros(0, 3, dtype=dtype),
             "fine": torch.randn(4, 5, generator=gen).to(dtype)}  # fmt: skip
    for i, bad in enumerate([float("nan"), float("inf"), -float("inf")]):
        t = torch.randn(257, 3, generator=gen).to(dtype)
        t.view(-1)[int(torch.randint(0, t.numel(), (), generator=gen))] = bad
        state[f"bad{i}"] = t
        state[f"scalar{i}"] = torch.tensor(bad, dtype=dtype)
    assert sorted(nonfinite_parameters(state)) == [f"{k}{i}" for k in ("bad", "scalar")
                                                   for i in range(3)]  # fmt: skip


@needs_peak_reset
def test_the_finiteness_check_needs_no_copy_of_the_weights():
    """torch.isfinite(t).all() made |t| and two masks: 1.75 times a float32 tensor's bytes at
    the peak here."""
    t = torch.randn(1 << 22, generator=torch.Generator().manual_seed(0))
    growth, bad = peak_growth(lambda: nonfinite_parameters({"w": t}))
    assert bad == [] and growth < 0.1 * t.numel() * 4, growth / (t.numel() * 4)


def test_a_tensor_no_checkpoint_holds_is_refused_not_left_on_meta(tmp_path, monkeypatch):
    """A module that computes a tensor in its constructor (a non-persistent buffer, a plain
    tensor attribute) is not filled by the file: load_checkpoint says so instead of returning
    a model that fails later (no model of build_model's has one; this one is made to)."""
    import spikemar.checkpoint as checkpoint

    path = _saved(tmp_path, *KINDS["mar"])
    built = checkpoint.build_model

    def with_a_computed_tensor(kind, config):
        model = built(kind, config)
        model.norm.register_buffer("scale", torch.ones(3), persistent=False)
        model.layers[0].table = torch.arange(4.0)
        return model

    monkeypatch.setattr(checkpoint, "build_model", with_a_computed_tensor)
    with pytest.raises(RuntimeError, match=r"\['norm.scale', 'layers.0.table'\] left without"):
        load_checkpoint(path)
