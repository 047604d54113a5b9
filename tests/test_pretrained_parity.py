"""Converted pretrained models equal their originals: Hugging Face ``Mamba2ForCausalLM`` (the real
transformers implementation) and Cartesia's Llamba (the plain-PyTorch reference written from its
published source, tests/references/llamba.py), on tiny random configs, with nothing downloaded.

For each: the parallel forward's logits, the token-by-token ``step`` logits and greedy generation
(transformers' own ``generate`` for Mamba-2). Tolerances: float32 ≤ 1e-4 relative (max |Δ| over
max |reference|); float64 ≤ 1e-6 where the reference computes in float64 (Llamba's does;
transformers' Mamba-2 casts its norms to float32, so it is compared in float32 only). Also the
strict mapping's errors, and MAR's spike points on converted models.
"""

import pytest
import torch
from torch import nn

from spikemar.models import MARLM, SpikeConfig, SpikePoint
from spikemar.models.pretrained import config_from_hf, state_dict_from_hf

transformers = pytest.importorskip("transformers")


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).abs().max() / want.double().abs().max())


def perturb(model: nn.Module, seed: int, scale: float = 0.2) -> None:
    """Move every parameter away from its initialisation (norm weights, biases, D, A and Δ all
    matter to the logits), reproducibly."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(
                torch.randn(p.shape, generator=g, dtype=p.dtype)
                * scale
                * p.abs().mean().clamp(min=0.1)
            )


# -- Hugging Face Mamba-2 --------------------------------------------------------------------


def hf_config(**overrides) -> "transformers.Mamba2Config":
    kwargs = dict(
        vocab_size=53, hidden_size=32, state_size=8, num_hidden_layers=2, head_dim=8,
        num_heads=8, expand=2, conv_kernel=4, n_groups=1, chunk_size=8,
        tie_word_embeddings=False, use_bias=False, use_conv_bias=True,
        residual_in_fp32=True, layer_norm_epsilon=1e-5, pad_token_id=0, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    kwargs.update(overrides)
    return transformers.Mamba2Config(**kwargs)


class PerGroupGatedNorm(nn.Module):
    """mamba_ssm's RMSNormGated with group_size = E / n_groups: what spikemar follows (and the
    checkpoints were trained with) where transformers' torch path normalises over all of E.
    Swapped into the transformers model as a submodule (a public attribute), nothing patched."""

    def __init__(self, weight: torch.Tensor, groups: int, eps: float) -> None:
        super().__init__()
        self.weight, self.groups, self.eps = weight, groups, eps

    def forward(
        self, hidden_states: torch.Tensor, gate: torch.Tensor | None = None
    ) -> torch.Tensor:
        dtype = hidden_states.dtype
        h = hidden_states.float()
        if gate is not None:
            h = h * nn.functional.silu(gate.float())
        h = h.unflatten(-1, (self.groups, -1))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.flatten(-2).to(dtype)


def hf_pair(seed: int = 0, **overrides):
    """A random transformers Mamba2ForCausalLM and spikemar's conversion of it (float32, eval)."""
    torch.manual_seed(seed)
    config = hf_config(**overrides)
    hf = transformers.Mamba2ForCausalLM(config).eval()
    perturb(hf, seed)
    if config.tie_word_embeddings:
        hf.tie_weights()
    if config.n_groups > 1:
        for layer in hf.backbone.layers:
            mixer = layer.mixer
            mixer.norm = PerGroupGatedNorm(
                mixer.norm.weight, config.n_groups, config.layer_norm_epsilon
            )
    mar_config = config_from_hf(config.to_dict())
    model = MARLM(mar_config)
    model.load_state_dict(state_dict_from_hf(mar_config, hf.state_dict()), strict=True)
    return hf, model.eval()


HF_CASES = {
    "plain": {},
    "tied": {"tie_word_embeddings": True},
    "biases": {"use_bias": True, "use_conv_bias": False},
    "dt-clamp": {"time_step_limit": (0.02, 0.3)},
    "groups": {"n_groups": 2, "state_size": 4},
    "eps": {"layer_norm_epsilon": 1e-3, "residual_in_fp32": False},
}


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_mamba2_forward_and_step_equal_transformers(case):
    hf, model = hf_pair(seed=sorted(HF_CASES).index(case), **HF_CASES[case])
    tokens = torch.randint(0, 53, (2, 21), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = hf(tokens).logits
        got = model(tokens)
    assert got.shape == want.shape
    assert relative_error(got, want) <= 1e-4
    state = model.init_state(2)
    for t in range(tokens.shape[1]):
        with torch.no_grad():  # the inference fast path (C kernels)
            step_logits, state = model.step(tokens[:, t], state)
        assert relative_error(step_logits, want[:, t]) <= 1e-4, t
    grad_state = model.init_state(2)
    for t in range(6):  # the reference operations (autograd on)
        step_logits, grad_state = model.step(tokens[:, t], grad_state)
        assert relative_error(step_logits.detach(), want[:, t]) <= 1e-4, t


@pytest.mark.parametrize("case", ["plain", "groups", "dt-clamp"])
def test_mamba2_greedy_generation_equals_transformers(case):
    hf, model = hf_pair(seed=11, **HF_CASES[case])
    prompt = torch.randint(1, 53, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = hf.generate(
            prompt, max_new_tokens=12, do_sample=False, output_logits=True,
            return_dict_in_generate=True, attention_mask=torch.ones_like(prompt),
        )  # fmt: skip
    ours = model.generate(prompt, 12, temperature=0)
    assert torch.equal(ours, out.sequences)
    # and transformers' cached step logits (its recurrent path) against spikemar's step
    state = model.init_state(2)
    with torch.no_grad():
        for t in range(out.sequences.shape[1] - 1):
            logits, state = model.step(out.sequences[:, t], state)
            if t >= prompt.shape[1] - 1:
                want = out.logits[t - prompt.shape[1] + 1]
                assert relative_error(logits, want) <= 1e-4, t


@pytest.mark.parametrize("residual_in_fp32", [True, False])
def test_mamba2_in_bfloat16_runs_as_transformers(residual_in_fp32):
    """A bfloat16 model with transformers' default float32 residual stream: each block's norm
    reads the stream cast to bfloat16, the head the final norm's output cast to bfloat16 (as
    Mamba2Block and Mamba2ForCausalLM cast); forward, step and prefill run and stay within
    bfloat16 rounding of transformers' bfloat16 model and of the float32 logits."""
    hf, model = hf_pair(seed=21, residual_in_fp32=residual_in_fp32)
    tokens = torch.randint(0, 53, (2, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(tokens)
        hf16, model16 = hf.to(torch.bfloat16), model.to(torch.bfloat16)
        want = hf16(tokens).logits
        got = model16(tokens)
        assert got.dtype == torch.bfloat16
        assert relative_error(got, want) <= 3e-2
        assert relative_error(got, full) <= 3e-2
        state = model16.init_state(2)
        for t in range(tokens.shape[1]):
            step_logits, state = model16.step(tokens[:, t], state)
        assert relative_error(step_logits, full[:, -1]) <= 3e-2
        last, _ = model16.prefill(tokens, model16.init_state(2))
        assert relative_error(last, full[:, -1]) <= 3e-2


def test_mamba2_transformers_n_groups_differs_from_mamba_ssm_per_group_norm():
    """The documented difference: transformers' torch path normalises the gate over all of E;
    spikemar follows mamba_ssm's per-group norm, so on transformers' own module the logits
    differ well beyond rounding."""
    torch.manual_seed(0)
    config = hf_config(n_groups=2, state_size=4)
    hf = transformers.Mamba2ForCausalLM(config).eval()
    perturb(hf, 0)
    mar_config = config_from_hf(config.to_dict())
    model = MARLM(mar_config).eval()
    model.load_state_dict(state_dict_from_hf(mar_config, hf.state_dict()))
    tokens = torch.randint(0, 53, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert relative_error(model(tokens), hf(tokens).logits) > 1e-3


def test_mamba2_config_maps_every_field():
    c = config_from_hf(hf_config(
        n_groups=2, use_bias=True, use_conv_bias=False, time_step_limit=(0.01, 0.5),
        layer_norm_epsilon=1e-3, tie_word_embeddings=True, residual_in_fp32=False,
    ).to_dict())  # fmt: skip
    assert (c.layers, c.ffn, c.spikes, c.n_groups, c.bias, c.conv_bias) == (
        "ssm",
        None,
        None,
        2,
        True,
        False,
    )
    assert c.dt_limit == (0.01, 0.5) and c.norm_eps == 1e-3 and c.final_norm_eps is None
    assert c.tie_embeddings and not c.residual_in_fp32
    assert (c.vocab_size, c.d_model, c.n_layers, c.d_state, c.head_dim, c.expand, c.d_conv) == (
        53, 32, 2, 8, 8, 2, 4,
    )  # fmt: skip


def test_mamba2_student_has_two_spike_points_per_block_and_approaches_its_teacher():
    """MAR's spike points in a converted Mamba-2: mixer-only blocks have the mixer's two, the
    student's step equals its forward, and a finer spike code (more micro-steps, smaller V)
    brings it closer to the dense model."""
    hf, dense = hf_pair(seed=4)
    tokens = torch.randint(0, 53, (2, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        dense_logits = dense(tokens)
    errors = []
    for T, v in ((4, 0.5), (32, 0.1)):
        config = config_from_hf(hf.config.to_dict())
        config.spikes = SpikeConfig(T=T, v_threshold=v)
        student = MARLM(config).eval()
        state = state_dict_from_hf(config, hf.state_dict())
        missing, unexpected = student.load_state_dict(state, strict=False)
        assert not unexpected and missing and all(k.endswith("neuron.a") for k in missing)
        sites = list(student.spike_points())
        assert [s.name for s in sites] == [
            f"layers.{i}.mixer.{p}" for i in range(2) for p in ("spike_in", "spike_out")
        ]
        assert all(isinstance(s.module, SpikePoint) for s in sites)
        with torch.no_grad():
            logits = student(tokens)
            state = student.init_state(2)
            for t in range(tokens.shape[1]):
                step_logits, state = student.step(tokens[:, t], state)
                torch.testing.assert_close(step_logits, logits[:, t], rtol=1e-4, atol=1e-4)
        errors.append(relative_error(logits, dense_logits))
    assert 0 < errors[1] < errors[0]


# -- the strict mapping's errors -------------------------------------------------------------


def test_unknown_architecture_is_one_clear_error():
    with pytest.raises(ValueError, match=r"unknown architecture.*'llama'"):
        config_from_hf({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    with pytest.raises(ValueError, match="must equal expand·hidden_size = 200"):
        config_from_hf({"model_type": "mamba2", "hidden_size": 100})  # transformers refuses it too
    with pytest.raises(ValueError, match="mlp_cfg lacks"):
        config_from_hf({"d_model": 8, "vocab_size": 8, "mlp_cfg": {"bias": False}})
    with pytest.raises(TypeError, match="config"):
        config_from_hf("config.json")


def test_state_dict_mapping_names_the_first_offending_tensor():
    hf, _ = hf_pair()
    config = config_from_hf(hf.config.to_dict())
    tensors = dict(hf.state_dict())
    missing = dict(tensors)
    del missing["backbone.layers.1.mixer.dt_bias"]
    with pytest.raises(
        ValueError, match=r"missing 'backbone\.layers\.1\.mixer\.dt_bias' \(expected shape \(8,\)"
    ):
        state_dict_from_hf(config, missing)
    wrong = dict(tensors)
    wrong["backbone.layers.0.mixer.D"] = torch.ones(7)
    with pytest.raises(
        ValueError, match=r"'backbone\.layers\.0\.mixer\.D' has shape \(7,\), expected \(8,\)"
    ):
        state_dict_from_hf(config, wrong)
    extra = {**tensors, "backbone.layers.0.mixer.bogus": torch.ones(3)}
    with pytest.raises(
        ValueError, match=r"unexpected 'backbone\.layers\.0\.mixer\.bogus' \(shape \(3,\)\)"
    ):
        state_dict_from_hf(config, extra)


def test_tied_head_must_equal_the_embedding():
    hf, _ = hf_pair(tie_word_embeddings=True)
    config = config_from_hf(hf.config.to_dict())
    tensors = {k: v.clone() for k, v in hf.state_dict().items()}
    assert "lm_head.weight" in tensors
    state = state_dict_from_hf(config, tensors)
    assert state["head.weight"] is state["embed.weight"]
    without = {k: v for k, v in tensors.items() if k != "lm_head.weight"}  # safetensors drops it
    assert torch.equal(
        state_dict_from_hf(config, without)["head.weight"], tensors["lm_head.weight"]
    )
    tensors["lm_head.weight"] += 1
    with pytest.raises(ValueError, match="differs from the embedding"):
        state_dict_from_hf(config, tensors)


# -- Llamba ----------------------------------------------------------------------------------

from references.llamba import (  # noqa: E402 (the Llamba half of this file)
    load_llamba_checkpoint,
    read_checkpoint_tensors,
    tiny_llamba_config,
    write_llamba_checkpoint,
)

LLAMBA_CASES = {
    "plain": {},
    "tied": {"tie_embeddings": True},
    "biases": {"ssm_bias": True, "mlp_bias": True, "lm_head_bias": True},
    "silu-conv": {"activation": "silu", "norm_epsilon": 1e-3},
    "one-group": {"n_qk_heads": 1},
}


def llamba_config(case: str) -> dict:
    o = dict(LLAMBA_CASES[case])
    config = tiny_llamba_config()
    ssm, mlp = dict(config["ssm_cfg"]), dict(config["mlp_cfg"])
    ssm["bias"] = o.pop("ssm_bias", ssm["bias"])
    mlp["bias"] = o.pop("mlp_bias", mlp["bias"])
    ssm["activation"] = o.pop("activation", ssm["activation"])
    ssm["n_qk_heads"] = o.pop("n_qk_heads", ssm["n_qk_heads"])
    return {**config, **o, "ssm_cfg": ssm, "mlp_cfg": mlp}


def llamba_pair(tmp_path, case: str, dtype: torch.dtype):
    directory = write_llamba_checkpoint(tmp_path / case, llamba_config(case), seed=len(case))
    reference = load_llamba_checkpoint(directory, dtype)
    import json

    config = config_from_hf(json.loads((directory / "config.json").read_text()))
    model = MARLM(config)
    model.load_state_dict(
        state_dict_from_hf(config, read_checkpoint_tensors(directory)), strict=True
    )
    return reference, model.to(dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", sorted(LLAMBA_CASES))
def test_llamba_forward_step_and_generation_equal_the_reference(tmp_path, case, dtype):
    reference, model = llamba_pair(tmp_path, case, dtype)
    tol = 1e-4 if dtype == torch.float32 else 1e-6
    vocab = model.config.vocab_size
    tokens = torch.randint(0, 61, (2, 19), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = reference(tokens)
        got = model(tokens)
        assert got.shape == want.shape == (2, 19, vocab)
        assert relative_error(got, want) <= tol
        state, ref_state = model.init_state(2), reference.init_state(2)
        for t in range(tokens.shape[1]):
            step_logits, state = model.step(tokens[:, t], state)
            ref_logits, ref_state = reference.step(tokens[:, t], ref_state)
            assert relative_error(step_logits, ref_logits) <= tol, t
            assert relative_error(step_logits, want[:, t]) <= tol, t
        prompt = tokens[:, :5]
        assert torch.equal(
            model.generate(prompt, 10, temperature=0), reference.generate_greedy(prompt, 10)
        )


def test_llamba_config_maps_cartesias_keys():
    c = config_from_hf(llamba_config("biases") | {"norm_epsilon": 1e-4})
    assert (c.layers, c.ffn, c.spikes, c.vocab_size) == ("discrete-mamba2", "llama", None, 64)
    assert (c.d_model, c.n_layers, c.d_state, c.expand, c.n_groups, c.head_dim) == (
        32,
        2,
        8,
        2,
        2,
        16,
    )
    assert c.norm_eps == 1e-5 and c.final_norm_eps == 1e-4  # block norms: Cartesia's hard-coded ε
    assert c.bias and c.ffn_bias and c.head_bias and c.ffn_hidden == 48 and not c.tie_embeddings
    # Hugging Face's tie_word_embeddings is never read; tie_embeddings decides
    assert not config_from_hf(tiny_llamba_config(tie_word_embeddings=True)).tie_embeddings
    assert config_from_hf(tiny_llamba_config(tie_embeddings=True)).tie_embeddings


def test_llamba_student_has_four_spike_points_per_layer(tmp_path):
    directory = write_llamba_checkpoint(tmp_path / "s", tiny_llamba_config(), seed=1)
    import json

    config = config_from_hf(json.loads((directory / "config.json").read_text()))
    config.spikes = SpikeConfig(T=4)
    student = MARLM(config).eval()
    missing, unexpected = student.load_state_dict(
        state_dict_from_hf(config, read_checkpoint_tensors(directory)), strict=False
    )
    assert not unexpected and all(k.endswith("neuron.a") for k in missing)
    sites = {s.name: list(s.projections) for s in student.spike_points()}
    assert sites["layers.0.mixer.spike_in"] == ["layers.0.mixer.in_proj"]
    assert sites["layers.0.mixer.spike_out"] == ["layers.0.mixer.out_proj"]
    assert sites["layers.0.ffn.spike_in"] == ["layers.0.ffn.gate_proj", "layers.0.ffn.up_proj"]
    assert sites["layers.0.ffn.spike_hidden"] == ["layers.0.ffn.down_proj"]
    assert len(sites) == 8
    tokens = torch.randint(0, 61, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, state = student(tokens), student.init_state(1)
        for t in range(9):
            step_logits, state = student.step(tokens[:, t], state)
            torch.testing.assert_close(step_logits, logits[:, t], rtol=1e-4, atol=1e-4)


def test_llamba_mapping_names_the_first_offending_tensor(tmp_path):
    directory = write_llamba_checkpoint(tmp_path / "m", tiny_llamba_config(), seed=2)
    import json

    config = config_from_hf(json.loads((directory / "config.json").read_text()))
    tensors = read_checkpoint_tensors(directory)
    bad = {**tensors, "backbone.layers.0.mixer.z_bias": torch.zeros(3)}
    with pytest.raises(
        ValueError, match=r"'backbone\.layers\.0\.mixer\.z_bias' has shape \(3,\), expected \(64,\)"
    ):
        state_dict_from_hf(config, bad)
    unpadded = {**tensors, "backbone.embedding.weight": tensors["backbone.embedding.weight"][:61]}
    with pytest.raises(
        ValueError, match=r"embedding\.weight' has shape \(61, 32\), expected \(64, 32\)"
    ):
        state_dict_from_hf(config, unpadded)
