"""The Llamba reference (tests/references/llamba.py) checked against itself and its invariants."""

import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from references.llamba import (
    LlambaReference,
    discrete_mamba2_scan,
    discrete_mamba2_scan_chunked,
    load_llamba_checkpoint,
    random_llamba_state_dict,
    read_checkpoint_tensors,
    resolve_config,
    tiny_llamba_config,
    write_llamba_checkpoint,
)


def _scan_inputs(b, L, H, G, P, N, seed):
    g = torch.Generator().manual_seed(seed)

    def r(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64)

    return r(b, L, H, P), 2 * r(b, L, H), r(b, L, G, N), r(b, L, G, N)


@given(
    L=st.integers(1, 20),
    groups=st.sampled_from([(4, 1), (4, 2), (4, 4), (6, 3)]),
    chunk=st.integers(1, 8),
    seed=st.integers(0, 2**16),
)
def test_scan_recurrence_equals_chunked_parallel_form(L, groups, chunk, seed):
    H, G = groups
    x, delta, B, C = _scan_inputs(2, L, H, G, 3, 5, seed)
    y_rec, s_rec = discrete_mamba2_scan(x, delta, B, C)
    y_par, s_par = discrete_mamba2_scan_chunked(x, delta, B, C, chunk)
    torch.testing.assert_close(y_par, y_rec, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s_par, s_rec, rtol=1e-10, atol=1e-10)


def test_scan_invariants():
    x, delta, B, C = _scan_inputs(2, 6, 4, 2, 3, 5, 1)
    # one token from a zero state: δ·(x/δ) cancels, y = (C·B) x whatever Δ is
    y0, _ = discrete_mamba2_scan(x[:, :1], delta[:, :1], B[:, :1], C[:, :1])
    group = torch.tensor([0, 0, 1, 1])  # v-head h reads group h // (H / G), not h % G
    cb = (C[:, 0, group] * B[:, 0, group]).sum(-1)
    torch.testing.assert_close(y0[:, 0], cb[..., None] * x[:, 0])
    # G groups equal H groups holding the repeated B/C
    y, _ = discrete_mamba2_scan(x, delta, B, C)
    y_rep, _ = discrete_mamba2_scan(x, delta, B[:, :, group], C[:, :, group])
    torch.testing.assert_close(y, y_rep)
    # with no input after the first token the state decays by exp(−Σ softplus(Δ))
    xs = x.clone()
    xs[:, 1:] = 0
    y, _ = discrete_mamba2_scan(xs, delta, B, C.clone().copy_(C[:, :1].expand_as(C)))
    decay = torch.exp(
        -torch.cumsum(torch.nn.functional.softplus(delta), 1)
        + torch.nn.functional.softplus(delta[:, :1])
    )
    torch.testing.assert_close(y, y[:, :1] * decay[..., None])


def _model(config, seed=0, dtype=torch.float64):
    model = LlambaReference(config)
    model.load_state_dict(random_llamba_state_dict(config, seed))
    return model.to(dtype).eval()


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"tie_embeddings": True},
        {
            "ssm_cfg": {
                "d_state": 4,
                "n_v_heads": 4,
                "n_qk_heads": 4,
                "activation": "silu",
                "bias": True,
            }
        },
        {
            "mlp_cfg": {"intermediate_size": 40, "bias": True, "act_fn": "gelu"},
            "lm_head_bias": True,
        },
    ],
)
def test_forward_equals_token_by_token_step(overrides):
    model = _model(tiny_llamba_config(**overrides))
    tokens = torch.randint(0, 61, (2, 11))
    with torch.no_grad():
        logits, hidden = model(tokens, return_hidden_states=True)
        state = model.init_state(2)
        stepped = []
        for t in range(tokens.shape[1]):
            out, state = model.step(tokens[:, t], state)
            stepped.append(out)
    torch.testing.assert_close(torch.stack(stepped, 1), logits, rtol=1e-10, atol=1e-10)
    assert logits.shape == (2, 11, 64)  # vocab 61 padded to a multiple of 8
    assert len(hidden) == 3  # embedding, then each layer's output (index j = layer j's input)
    torch.testing.assert_close(hidden[0], model.backbone.embedding(tokens))
    # the greedy generator steps the same model
    gen = model.generate_greedy(tokens[:, :4], 3)
    assert gen.shape == (2, 7) and torch.equal(gen[:, :4], tokens[:, :4])


def test_conv_is_causal_with_last_tap_on_current_token():
    model = _model(tiny_llamba_config(), dtype=torch.float64)
    mixer = model.backbone.layers[0].mixer
    u = torch.randn(1, 7, 32, dtype=torch.float64)
    base = mixer(u)
    u2 = u.clone()
    u2[:, 4] += 1.0  # changing token 4 leaves outputs 0..3 alone
    out = mixer(u2)
    torch.testing.assert_close(out[:, :4], base[:, :4])
    assert not torch.allclose(out[:, 4], base[:, 4])


def test_config_defaults_replace_wholesale():
    cfg = resolve_config({"vocab_size": 10, "d_model": 8, "ssm_cfg": {"n_v_heads": 2}})
    assert cfg["ssm_cfg"]["d_state"] == 64 and cfg["ssm_cfg"]["d_conv"] == 4  # argument defaults
    assert cfg["vocab_size_padded"] == 16 and cfg["tie_embeddings"] is False
    with pytest.raises(ValueError, match="intermediate_size"):
        resolve_config(
            {"vocab_size": 10, "d_model": 8, "mlp_cfg": {"bias": False, "act_fn": "silu"}}
        )
    # Hugging Face's tie_word_embeddings is not Llamba's switch
    assert (
        "lm_head.weight"
        in LlambaReference(tiny_llamba_config(tie_word_embeddings=True)).state_dict()
    )


@pytest.mark.parametrize(
    ("weights", "shards"), [("safetensors", 1), ("safetensors", 3), ("bin", 1), ("bin", 2)]
)
def test_checkpoint_round_trip(tmp_path, weights, shards):
    config = tiny_llamba_config(tie_embeddings=(shards == 3))
    write_llamba_checkpoint(tmp_path, config, seed=5, weights=weights, shards=shards)
    assert json.loads((tmp_path / "config.json").read_text())["vocab_size"] == 61  # as given
    tensors = read_checkpoint_tensors(tmp_path)
    expected = random_llamba_state_dict(config, seed=5)
    assert tensors.keys() == expected.keys()
    assert ("lm_head.weight" in tensors) == (shards != 3)
    assert tensors["backbone.embedding.weight"].shape == (64, 32)
    assert tensors["backbone.layers.0.mixer.in_proj.weight"].shape == (2 * 64 + 2 * 2 * 8 + 4, 32)
    assert tensors["backbone.layers.1.mixer.z_bias"].shape == (64,)
    for name, t in expected.items():
        assert torch.equal(tensors[name], t), name
    model = load_llamba_checkpoint(tmp_path, dtype=torch.float64)
    tokens = torch.randint(0, 61, (1, 5))
    torch.testing.assert_close(model(tokens), _model(config, seed=5)(tokens))
