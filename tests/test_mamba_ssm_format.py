"""mamba_ssm's own Mamba-2 checkpoints (the state-spaces/mamba2-* repositories, written by
``MambaLMHeadModel``: mamba_ssm's config keys, ``pytorch_model.bin``, ``backbone.embedding``):
read by ``from_pretrained`` and equal to transformers' ``Mamba2ForCausalLM`` with the same weights.

mamba_ssm itself needs CUDA and Triton, so the directories are written here from a random
transformers model: the mixer, block and norm names of the two layouts are the same
(mamba_ssm/models/mixer_seq_simple.py, modules/mamba2.py), only the embedding's name and the
config's keys differ, and that is what these tests pin."""

from __future__ import annotations

import json

import pytest
import torch

from spikemar.models import from_pretrained
from spikemar.models.pretrained import architecture_of, config_from_hf

transformers = pytest.importorskip("transformers")


def write_mamba_ssm_checkpoint(directory, *, vocab=300, multiple=8, tied=True, seed=0, **ssm):
    """A random Mamba-2 LM saved as mamba_ssm saves one; returns the transformers twin."""
    from references.hf_checkpoints import bpe_tokenizer
    from transformers import Mamba2Config, Mamba2ForCausalLM

    padded = vocab + (-vocab % multiple)
    args = {"d_state": 8, "headdim": 8, "expand": 2, "d_conv": 4, "ngroups": 1, "chunk_size": 16}
    args.update(ssm)
    torch.manual_seed(seed)
    twin = Mamba2ForCausalLM(
        Mamba2Config(
            vocab_size=padded,
            hidden_size=32,
            num_hidden_layers=2,
            state_size=args["d_state"],
            head_dim=args["headdim"],
            num_heads=2 * 32 // args["headdim"],
            expand=args["expand"],
            conv_kernel=args["d_conv"],
            n_groups=args["ngroups"],
            chunk_size=16,
            tie_word_embeddings=tied,
            layer_norm_epsilon=1e-5,
        )
    ).eval()
    with torch.no_grad():  # away from the initial values, so a dropped tensor would show
        for p in twin.parameters():
            p.add_(0.1 * torch.randn_like(p))
    state = {
        k.replace("backbone.embeddings.", "backbone.embedding."): v.clone()
        for k, v in twin.state_dict().items()
    }
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(state, directory / "pytorch_model.bin")
    config = {"d_model": 32, "d_intermediate": 0, "n_layer": 2, "vocab_size": vocab,
              "ssm_cfg": {"layer": "Mamba2", **args}, "attn_layer_idx": [], "attn_cfg": {},
              "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True,
              "pad_vocab_size_multiple": multiple, "tie_embeddings": tied}  # fmt: skip
    (directory / "config.json").write_text(json.dumps(config))
    bpe_tokenizer(vocab).save(directory)
    return twin


@pytest.mark.parametrize("tied", [True, False])
def test_a_mamba_ssm_directory_loads_and_equals_transformers(tmp_path, tied):
    twin = write_mamba_ssm_checkpoint(tmp_path / "m", tied=tied)
    model = from_pretrained(tmp_path / "m").eval()
    assert model.config.vocab_size == 304  # 300 padded to a multiple of 8, as the rows are
    assert model.config.norm_eps == 1e-5 and model.config.tie_embeddings is tied
    ids = torch.randint(0, 300, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = twin(ids).logits
        got = model(ids)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    state = model.init_state(2)
    with torch.no_grad():
        for t in range(ids.shape[1]):
            step, state = model.step(ids[:, t], state)
            assert (step - want[:, t]).abs().max() <= 1e-4 * want.abs().max()


def test_mamba_ssm_defaults_apply_where_ssm_cfg_is_silent():
    config = config_from_hf(
        {
            "d_model": 768,
            "n_layer": 24,
            "vocab_size": 50277,
            "ssm_cfg": {"layer": "Mamba2"},
            "pad_vocab_size_multiple": 16,
            "tie_embeddings": True,
        }
    )  # fmt: skip (state-spaces/mamba2-130m)
    assert (config.vocab_size, config.d_state, config.head_dim, config.expand) == (
        50288,
        128,
        64,
        2,
    )
    assert config.n_groups == 1 and config.tie_embeddings and config.ffn is None


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        ({"ssm_cfg": {}}, "ssm_cfg layer 'Mamba1'"),
        ({"ssm_cfg": {"layer": "Mamba3"}}, "ssm_cfg layer 'Mamba3'"),
        ({"attn_layer_idx": [1]}, "attn_layer_idx = \\[1\\]: attention layers"),
        ({"d_intermediate": 64}, "d_intermediate = 64: gated-MLP blocks"),
        ({"rms_norm": False}, "rms_norm = False: LayerNorm blocks"),
        ({"ssm_cfg": {"layer": "Mamba2", "D_has_hdim": True}}, "D_has_hdim"),
        ({"ssm_cfg": {"layer": "Mamba2", "norm_before_gate": True}}, "norm_before_gate"),
        ({"ssm_cfg": {"layer": "Mamba2", "d_ssm": 32}}, "d_ssm = 32: an SSM on part"),
        ({"ssm_cfg": {"layer": "Mamba2", "dstate": 8}}, "\\['dstate'\\] are not arguments"),
    ],
)
def test_what_mamba_ssm_can_hold_but_spikemar_cannot_is_one_clear_error(change, pattern):
    config = {"d_model": 32, "n_layer": 2, "vocab_size": 300, "ssm_cfg": {"layer": "Mamba2"}}
    config.update(change)
    with pytest.raises(ValueError, match=pattern):
        config_from_hf(config)


def test_the_family_of_each_layout():
    assert architecture_of({"d_model": 8, "ssm_cfg": {"layer": "Mamba2"}}) == "mamba2"
    assert architecture_of({"d_model": 8, "ssm_cfg": {}, "mlp_cfg": {}}) == "llamba"
    assert architecture_of({"d_model": 8, "ssm_cfg": {}}) is None  # Mamba-1: not read


def test_a_transformers_named_embedding_in_a_mamba_ssm_directory_is_named(tmp_path):
    write_mamba_ssm_checkpoint(tmp_path / "m")
    state = torch.load(tmp_path / "m" / "pytorch_model.bin", weights_only=True)
    state["backbone.embeddingz.weight"] = state.pop("backbone.embedding.weight")
    torch.save(state, tmp_path / "m" / "pytorch_model.bin")
    either = r"'backbone\.embeddings\.weight' or mamba_ssm's 'backbone\.embedding\.weight'"
    with pytest.raises(ValueError, match=f"missing {either}"):
        from_pretrained(tmp_path / "m")
