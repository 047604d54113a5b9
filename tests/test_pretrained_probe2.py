"""Checkpoint directories as transformers and the Hub leave them, read by ``from_pretrained``
exactly as transformers reads them (a second acceptance probe of the pretrained path)."""

import json
import math
import re

import pytest
import torch
from references.hf_checkpoints import bpe_tokenizer

from spikemar.models import from_pretrained

transformers = pytest.importorskip("transformers")


def tiny_mamba2(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.Mamba2Config(
        vocab_size=300, hidden_size=32, num_hidden_layers=2, state_size=8, head_dim=8,
        num_heads=8, n_groups=1, chunk_size=16,
    )  # fmt: skip
    return transformers.Mamba2ForCausalLM(config).eval()


def test_a_single_file_saved_over_shards_is_read_as_transformers_reads_it(tmp_path):
    # save_pretrained removes the old shards but leaves their index beside the new single file;
    # transformers reads model.safetensors before an index, and so must spikemar
    model = tiny_mamba2()
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    bpe_tokenizer(300).save(tmp_path)
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = transformers.Mamba2ForCausalLM.from_pretrained(tmp_path).eval()(ids).logits
        assert torch.allclose(want, model(ids).logits)
        got = from_pretrained(tmp_path)(ids)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


@pytest.mark.parametrize("weight_map", [["model-00001-of-00001.safetensors"], {"a": 3}])
def test_an_index_whose_weight_map_is_not_names_to_files_is_one_error(tmp_path, weight_map):
    model = tiny_mamba2()
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    bpe_tokenizer(300).save(tmp_path)
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.raises(ValueError, match="not a weight index") as info:
        from_pretrained(tmp_path)
    assert "\n" not in str(info.value) and str(index) in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dtype": "float8_e4m3fn"}, r"^dtype: expected a floating .* got 'float8_e4m3fn'"),
        ({"torch_dtype": torch.float8_e5m2}, r"torch_dtype: .* got torch\.float8_e5m2"),
        ({"spikes": {"T": 2, "taus": 1.0}}, r"spikes: unknown keys \['taus'\]; SpikeConfig takes"),
    ],
)
def test_a_dtype_no_model_computes_in_and_unknown_spike_keys_are_named(tmp_path, kwargs, match):
    tiny_mamba2().save_pretrained(tmp_path)
    bpe_tokenizer(300).save(tmp_path)
    with pytest.raises(ValueError, match=match):
        from_pretrained(tmp_path, **kwargs)


def test_auto_dtype_of_a_float8_checkpoint_is_refused_by_name(tmp_path):
    from safetensors.torch import load_file, save_file

    tiny_mamba2().save_pretrained(tmp_path)
    bpe_tokenizer(300).save(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    save_file({k: v.to(torch.float8_e4m3fn) for k, v in weights.items()},
              tmp_path / "model.safetensors")  # fmt: skip
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("dtype", None), config.pop("torch_dtype", None)  # the weights say
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"dtype: 'auto' is the checkpoint's torch.float8_e4m3fn"):
        from_pretrained(tmp_path, dtype="auto")


@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_a_llamba_conv_activation_cartesia_refuses_is_refused(activation):
    from references.llamba import tiny_llamba_config

    from spikemar.models.pretrained import config_from_hf

    config = tiny_llamba_config()
    config["ssm_cfg"] = {**config["ssm_cfg"], "activation": activation}
    with pytest.raises(ValueError, match=f"ssm_cfg activation '{activation}': DiscreteMamba2"):
        config_from_hf(config)
    for accepted, kind in (("swish", "silu"), ("silu", "silu"), ("identity", "identity")):
        config["ssm_cfg"]["activation"] = accepted
        assert config_from_hf(config).conv_activation == kind


def test_a_student_of_another_shape_names_the_first_tensor_on_both_sides(corpus, tmp_path):
    from references.hf_checkpoints import write_mamba2_checkpoint

    from spikemar.checkpoint import save_checkpoint
    from spikemar.convert import spiking_student
    from spikemar.data import TokenDataset
    from spikemar.distill.trainer import Teacher, load_student
    from spikemar.models import SpikeConfig

    write_mamba2_checkpoint(tmp_path / "teacher", state_size=4)
    write_mamba2_checkpoint(tmp_path / "other")  # state_size 8
    other = from_pretrained(tmp_path / "other")
    student = save_checkpoint(tmp_path / "student.pt", spiking_student(other, SpikeConfig(T=2)),
                              other.tokenizer)  # fmt: skip
    teacher = Teacher.load(str(tmp_path / "teacher"))
    data = TokenDataset.from_text_file(corpus, tokenizer=teacher.tokenizer)
    first = "first difference: layers.0.mixer.conv.bias, student (80,), teacher (72,)"
    with pytest.raises(ValueError, match=re.escape(first)) as info:
        load_student(str(student), teacher, data, "cpu")
    assert "\n" not in str(info.value)


def test_a_convert_summary_says_more_energy_where_the_student_spends_more():
    from spikemar.convert import ConvertResult

    def summary(dense_pj: float, student_pj: float) -> str:
        return ConvertResult(None, None, None, {}, 5.0, 5.1, dense_pj, student_pj, 0.3,
                             "45nm-fp32", None, 0.0).summary()  # fmt: skip

    assert "(1.08× more, 45nm-fp32)" in summary(1.254e5, 1.359e5)  # T 16: more than dense
    assert "(1.95× less, 45nm-fp32)" in summary(1.254e5, 6.43e4)
    assert "less" not in summary(1.254e5, 1.359e5)


@pytest.mark.parametrize(
    "left_out",
    [
        ("n_groups", "conv_kernel", "expand", "use_conv_bias", "layer_norm_epsilon"),
        ("time_step_limit", "residual_in_fp32", "tie_word_embeddings", "use_bias", "rms_norm"),
        ("num_hidden_layers", "state_size", "vocab_size", "hidden_act", "dtype"),
    ],
)
def test_a_mamba2_config_json_without_some_keys_takes_transformers_defaults(left_out):
    from spikemar.models.pretrained import config_from_hf

    full = transformers.Mamba2Config(
        num_heads=8, head_dim=64, hidden_size=256, expand=2, vocab_size=300, state_size=16,
        num_hidden_layers=2, n_groups=2, conv_kernel=3, use_conv_bias=False,
        layer_norm_epsilon=1e-3, time_step_limit=(0.01, 0.5), residual_in_fp32=False,
        tie_word_embeddings=True, use_bias=True,
    ).to_dict()  # fmt: skip
    trimmed = {k: v for k, v in full.items() if k not in left_out}
    as_transformers_reads_it = transformers.Mamba2Config.from_dict(trimmed).to_dict()
    assert vars(config_from_hf(trimmed)) == vars(config_from_hf(as_transformers_reads_it))
    without_width = {k: v for k, v in full.items() if k != "hidden_size"}  # 4096·2 ≠ 8·64
    with pytest.raises(ValueError, match="Inconsistent configuration"):
        transformers.Mamba2Config.from_dict(without_width)
    with pytest.raises(ValueError, match=r"num_heads·head_dim = 8·64 must equal .* 8192"):
        config_from_hf(without_width)


def test_a_config_eos_id_past_the_tokenizer_does_not_block_loading(tmp_path):
    model = tiny_mamba2()
    model.config.eos_token_id = 303  # a padded row, not a token of the 300-id tokenizer
    model.save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text(bpe_tokenizer(300).to_dict()["json"])  # alone
    assert from_pretrained(tmp_path).tokenizer.eos_id is None
    config = json.loads((tmp_path / "config.json").read_text())
    config["eos_token_id"] = 0
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert from_pretrained(tmp_path).tokenizer.eos_id == 0


def test_convert_refuses_an_unknown_hardware_profile_before_loading(tmp_path, monkeypatch):
    import spikemar.convert as convert_module

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before --hardware was checked")

    monkeypatch.setattr(convert_module, "load_dense", never)
    with pytest.raises(ValueError, match="hardware: unknown profile 'loihi2'"):
        convert_module.convert(tmp_path / "m2", tmp_path / "s.pt", hardware="loihi2")
    assert not (tmp_path / "s.pt").exists()


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"ssm_cfg": {"n_v_heads": 0}}, "ssm_cfg.n_v_heads 0: only a whole number >= 1"),
        ({"pad_vocab_size_multiple": 0}, "pad_vocab_size_multiple 0: only a whole number >= 1"),
        ({"mamba_ssm": True, "pad_vocab_size_multiple": 0}, "pad_vocab_size_multiple 0"),
    ],
)
def test_a_zero_count_in_a_cartesia_or_mamba_ssm_config_is_named(config, match):
    from references.llamba import tiny_llamba_config

    from spikemar.models.pretrained import config_from_hf

    if config.pop("mamba_ssm", False):
        c = {"d_model": 32, "n_layer": 2, "vocab_size": 300, "ssm_cfg": {"layer": "Mamba2"}}
    else:
        c = tiny_llamba_config()
    c = {**c, **config, "ssm_cfg": {**c["ssm_cfg"], **config.get("ssm_cfg", {})}}
    with pytest.raises(ValueError, match=match):
        config_from_hf(c)


@pytest.mark.parametrize(
    ("layout", "change", "match"),
    [
        ("mamba2", {"hidden_size": None}, "hidden_size None: expected a whole number"),
        ("mamba2", {"time_step_limit": 5}, "time_step_limit 5: expected a pair of numbers"),
        ("mamba2", {"n_groups": True}, "n_groups True: expected a whole number"),
        ("llamba", {"vocab_size": None}, "vocab_size None: expected a whole number"),
        ("llamba", {"ssm_cfg": "x"}, "ssm_cfg 'x': expected an object"),
        ("llamba", {"mlp_cfg": {"intermediate_size": "48", "bias": False, "act_fn": "silu"}},
         "mlp_cfg.intermediate_size '48': expected a whole number"),
        ("mamba_ssm", {"ssm_cfg": {"layer": "Mamba2", "dt_limit": 3}},
         "ssm_cfg.dt_limit 3: expected a pair of numbers"),
        ("mamba_ssm", {"tie_embeddings": "yes"}, "tie_embeddings 'yes': expected true or false"),
    ],
)  # fmt: skip
def test_a_malformed_config_value_is_named_by_its_key(layout, change, match):
    from references.llamba import tiny_llamba_config

    from spikemar.models.pretrained import config_from_hf

    base = {
        "mamba2": {"model_type": "mamba2", "hidden_size": 32, "num_heads": 1, "head_dim": 64},
        "llamba": tiny_llamba_config(),
        "mamba_ssm": {"d_model": 32, "n_layer": 2, "vocab_size": 300,
                      "ssm_cfg": {"layer": "Mamba2"}},
    }[layout]  # fmt: skip
    config_from_hf(base)  # well formed as it is
    if layout == "mamba2":  # a null Δ limit is no clamp, as before
        assert config_from_hf({**base, "time_step_limit": None}).dt_limit == (0.0, math.inf)
    with pytest.raises(ValueError, match=f"^config: {re.escape(match)}$"):
        config_from_hf({**base, **change})


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
def test_a_git_lfs_pointer_in_place_of_the_weights_is_named(tmp_path, weights):
    tiny_mamba2().save_pretrained(tmp_path, safe_serialization=weights.endswith("safetensors"))
    bpe_tokenizer(300).save(tmp_path)
    (tmp_path / weights).write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64 + "\nsize 99\n"
    )
    with pytest.raises(ValueError, match="a Git LFS pointer, not the weights") as info:
        from_pretrained(tmp_path)
    assert "\n" not in str(info.value) and weights in str(info.value)
    (tmp_path / weights).write_bytes(b"\x80\x02garbage" * 10)  # other junk: one line too
    with pytest.raises(ValueError, match="unreadable weights") as info:
        from_pretrained(tmp_path)
    assert "\n" not in str(info.value)


def test_a_git_lfs_pointer_as_tokenizer_json_is_named(tmp_path):
    from spikemar.tokenizer import load_tokenizer

    (tmp_path / "tokenizer.json").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64 + "\nsize 9\n"
    )
    with pytest.raises(ValueError, match=r"tokenizer\.json \(a Git LFS pointer, not the file"):
        load_tokenizer(tmp_path)
