"""from_pretrained: Hugging Face Mamba-2 and Llamba checkpoint directories (made here, never
downloaded), their tokenizers, and one clear error for each way a directory can be wrong."""

import json

import pytest
import torch
from references.hf_checkpoints import bpe_tokenizer, write_mamba2_checkpoint
from references.llamba import load_llamba_checkpoint, tiny_llamba_config, write_llamba_checkpoint

from spikemar.models import MARLM, SpikeConfig, from_pretrained
from spikemar.models.hub import read_pretrained_tensors
from spikemar.tokenizer import HFTokenizer


def mamba2_dir(path, **kwargs):
    return write_mamba2_checkpoint(path, **kwargs)


def bpe(vocab_size: int) -> HFTokenizer:
    return bpe_tokenizer(vocab_size)


def tokens(vocab: int, L: int = 12) -> torch.Tensor:
    return torch.randint(0, vocab, (2, L), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("tied", [False, True])
def test_mamba2_directory_loads_with_the_same_logits(tmp_path, tied):
    hf = mamba2_dir(tmp_path, tied=tied)
    model = from_pretrained(tmp_path)
    assert isinstance(model, MARLM) and model.config.spikes is None and not model.training
    assert model.tokenizer == HFTokenizer.from_directory(tmp_path)
    x = tokens(300)
    with torch.no_grad():
        expected = hf(x).logits
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("weights", "shards"), [("safetensors", 1), ("safetensors", 3),
                                                 ("bin", 2)])  # fmt: skip
def test_llamba_directory_loads_with_the_reference_logits(tmp_path, weights, shards):
    config = tiny_llamba_config(tie_embeddings=shards == 3)
    write_llamba_checkpoint(tmp_path, config, seed=2, weights=weights, shards=shards)
    bpe(61).save(tmp_path)
    model = from_pretrained(tmp_path)
    reference = load_llamba_checkpoint(tmp_path)
    x = tokens(61)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-4, atol=1e-4)
    assert model.config.vocab_size == 64  # padded as Cartesia pads the embedding


def test_spikes_and_dtype(tmp_path):
    mamba2_dir(tmp_path)
    dense = from_pretrained(tmp_path)
    student = from_pretrained(tmp_path, spikes={"T": 4, "tau": 1.0}, dtype="bfloat16")
    assert student.config.spikes is not None and student.config.spikes.T == 4
    assert next(student.parameters()).dtype == torch.bfloat16
    for name, t in dense.state_dict().items():
        assert torch.equal(student.state_dict()[name], t.to(torch.bfloat16)), name
    with pytest.raises(ValueError, match="dtype"):
        from_pretrained(tmp_path, dtype="int8")


def test_dtype_auto_and_torch_dtype_as_transformers_take_them(tmp_path):
    """dtype='auto' loads the checkpoint's own dtype (config.json's ``dtype``, older
    transformers' ``torch_dtype``, else the weights'); ``torch_dtype`` is dtype's older name;
    an unknown name is named in the error (it said 'got None')."""
    hf = mamba2_dir(tmp_path, tokenizer=False)
    hf.to(torch.bfloat16).save_pretrained(tmp_path)

    def dtype_of(**kwargs):
        return next(from_pretrained(tmp_path, tokenizer=False, **kwargs).parameters()).dtype

    assert dtype_of() == torch.float32  # transformers' default too
    assert dtype_of(dtype="auto") == torch.bfloat16
    assert dtype_of(torch_dtype="auto") == torch.bfloat16
    assert dtype_of(torch_dtype=torch.float64) == torch.float64
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("dtype", None)
    config["torch_dtype"] = "float16"  # as transformers before 4.56 wrote it
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert dtype_of(dtype="auto") == torch.float16
    config.pop("torch_dtype")  # no dtype named: the weights'
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert dtype_of(dtype="auto") == torch.bfloat16
    with pytest.raises(ValueError, match=r"dtype: expected .* got 'bogus'"):
        from_pretrained(tmp_path, tokenizer=False, dtype="bogus")
    with pytest.raises(ValueError, match=r"torch_dtype: expected .* got torch\.int8"):
        from_pretrained(tmp_path, tokenizer=False, torch_dtype=torch.int8)
    with pytest.raises(ValueError, match="give one"):
        from_pretrained(tmp_path, tokenizer=False, dtype="auto", torch_dtype=torch.float32)


def _rewrite_safetensors(path, change):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))


def _break_config(d):
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))


def _break_json(d):
    (d / "config.json").write_text("{not json")


def _drop_tensor(d):
    _rewrite_safetensors(d / "model.safetensors",
                         lambda t: t.pop("backbone.layers.1.mixer.D"))  # fmt: skip


def _reshape_tensor(d):
    def change(t):
        t["backbone.layers.0.mixer.A_log"] = torch.zeros(7)

    _rewrite_safetensors(d / "model.safetensors", change)


def _extra_tensor(d):
    def change(t):
        t["backbone.layers.0.mixer.surprise"] = torch.zeros(3)

    _rewrite_safetensors(d / "model.safetensors", change)


def _fractional_expand(d):  # transformers builds int(1.5·32) = 48 channels; spikemar cannot
    config = json.loads((d / "config.json").read_text())
    config.update(expand=1.5, num_heads=6)
    (d / "config.json").write_text(json.dumps(config))


def _missing_shard(d):  # the index alone: a single model.safetensors would be read first
    (d / "model.safetensors").unlink()
    index = {"weight_map": {"backbone.embeddings.weight": "model-00002-of-00002.safetensors"}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize(
    ("damage", "error", "match"),
    [
        (lambda d: (d / "config.json").unlink(), FileNotFoundError, "no config.json"),
        (_break_json, ValueError, "not JSON"),
        (_break_config, ValueError, "unknown architecture.*'llama'"),
        (lambda d: (d / "model.safetensors").unlink(), FileNotFoundError, "no weights"),
        (_missing_shard, FileNotFoundError, "missing model-00002-of-00002"),
        (_drop_tensor, ValueError, r"missing 'backbone\.layers\.1\.mixer\.D'"),
        (_reshape_tensor, ValueError, r"A_log' has shape \(7,\), expected \(8,\)"),
        (_extra_tensor, ValueError, "unexpected 'backbone.layers.0.mixer.surprise'"),
        (_fractional_expand, ValueError, "config: expand 1.5: only a whole number"),
        (lambda d: (d / "tokenizer.json").unlink(), FileNotFoundError,
         "no tokenizer.*tokenizer=False"),
    ],
)  # fmt: skip
def test_bad_directories_give_one_clear_error(tmp_path, damage, error, match):
    mamba2_dir(tmp_path)
    damage(tmp_path)
    with pytest.raises(error, match=match) as info:
        from_pretrained(tmp_path)
    assert "\n" not in str(info.value)
    assert str(tmp_path) in str(info.value)


def test_weights_alone_without_a_tokenizer(tmp_path):
    mamba2_dir(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    assert from_pretrained(tmp_path, tokenizer=False).tokenizer is None


def test_a_tokenizer_from_elsewhere(tmp_path, monkeypatch):
    """A checkpoint without a tokenizer (state-spaces/mamba2-130m ships none) takes one from a
    directory, a tokenizer.json or a Hub id; the end-of-text id comes from that source, else
    from the checkpoint's config.json."""
    mamba2_dir(tmp_path / "m2", tokenizer=False)
    tok = bpe(300)
    tok.save(tmp_path / "tok")  # with its tokenizer_config.json: <|endoftext|> is id 0
    model = from_pretrained(tmp_path / "m2", tokenizer=tmp_path / "tok")
    assert model.tokenizer == tok and model.generate("hear me", 3, temperature=0)
    bare = from_pretrained(tmp_path / "m2", tokenizer=str(tmp_path / "tok" / "tokenizer.json"))
    eos = json.loads((tmp_path / "m2" / "config.json").read_text())["eos_token_id"]
    assert bare.tokenizer.encode("hear me") == tok.encode("hear me")
    assert bare.tokenizer.eos_id == eos  # the file alone names none: the checkpoint's config
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    with pytest.raises(ConnectionError, match="tokenizer: 'EleutherAI/gpt-neox-20b' is not"):
        from_pretrained(tmp_path / "m2", tokenizer="EleutherAI/gpt-neox-20b")
    with pytest.raises(FileNotFoundError, match="tokenizer: no directory at nowhere"):
        from_pretrained(tmp_path / "m2", tokenizer="nowhere")
    with pytest.raises(TypeError, match="tokenizer: expected True, False, a path"):
        from_pretrained(tmp_path / "m2", tokenizer=3)
    with pytest.raises(ValueError, match=r"tokenizer: expected a directory, a tokenizer\.json"):
        from_pretrained(tmp_path / "m2", tokenizer="")
    from spikemar.checkpoint import dense_twin
    from spikemar.convert import spiking_student

    student = spiking_student(model, SpikeConfig(T=2))  # derived models keep the tokenizer
    assert student.tokenizer == tok and dense_twin(student).tokenizer == tok


def test_unreadable_weights_are_named(tmp_path):
    mamba2_dir(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="unreadable weights"):
        read_pretrained_tensors(tmp_path)


def test_hub_ids_offline_say_so_in_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    with pytest.raises(ConnectionError, match="HF_HUB_OFFLINE is set") as info:
        from_pretrained("state-spaces/mamba2-130m")
    assert "\n" not in str(info.value)
    with pytest.raises(FileNotFoundError, match="not a Hub id"):
        from_pretrained(str(tmp_path / "no" / "such" / "dir"))
    (tmp_path / "file.bin").write_bytes(b"")
    with pytest.raises(NotADirectoryError, match="is a file"):
        from_pretrained(tmp_path / "file.bin")


def test_state_dict_from_hf_with_a_spiking_config_and_a_spiking_model_on_meta(tmp_path):
    # the threshold check defers on meta tensors (no values there) instead of failing on them
    from spikemar.models import MARConfig, SpikeConfig
    from spikemar.models.hub import read_pretrained_config
    from spikemar.models.pretrained import config_from_hf, state_dict_from_hf
    from spikemar.neurons import ATMN

    mamba2_dir(tmp_path)
    config = config_from_hf(read_pretrained_config(tmp_path))
    config.spikes = SpikeConfig(T=2, v_threshold=0.5)
    state = state_dict_from_hf(config, read_pretrained_tensors(tmp_path))
    with torch.device("meta"):
        shapes = MARLM(config)  # names and shapes of the student, nothing allocated
    assert all(p.is_meta for p in shapes.parameters())
    student = MARLM(config)
    missing, unexpected = student.load_state_dict(state, strict=False)
    assert not unexpected and missing and all(k.endswith("neuron.a") for k in missing)
    assert sorted(missing) == sorted(k for k in shapes.state_dict() if k.endswith("neuron.a"))
    # the check itself stays: a bad threshold is refused on the meta device too
    with torch.device("meta"), pytest.raises(ValueError, match="v_threshold: expected finite"):
        ATMN(v_threshold=-1.0, num_channels=4)
    bad = {**config.spikes.as_dict(), "v_threshold": 0.0}
    with torch.device("meta"), pytest.raises(ValueError, match="v_threshold"):
        MARLM(MARConfig(**{**vars(config), "spikes": SpikeConfig(**bad)}))


@pytest.mark.parametrize(
    ("config", "family"),
    [({"model_type": "mamba2"}, "mamba2"), ({"model_type": "llamba"}, "llamba"),
     ({"d_model": 8, "mlp_cfg": {}}, "llamba"), ({"model_type": "llama"}, None),
     ({"d_model": 8, "mlp_cfg": {}, "model_type": "llama"}, None), ({}, None)],
)  # fmt: skip
def test_architecture_of_names_the_family_without_validating(config, family):
    from spikemar.models.pretrained import architecture_of, config_from_hf, is_pretrained_config

    assert architecture_of(config) == family and is_pretrained_config(config) == (
        family is not None
    )
    if family is None:
        with pytest.raises(ValueError, match="unknown architecture"):
            config_from_hf(config)
    elif family == "mamba2":  # absent keys take transformers' Mamba2Config defaults
        c = config_from_hf(config)
        assert (c.d_model, c.n_layers, c.n_groups, c.head_dim, c.vocab_size) == (
            4096, 64, 8, 64, 32768
        )  # fmt: skip
    else:  # recognised, but incomplete: config_from_hf names what is missing
        with pytest.raises(ValueError, match="needs"):
            config_from_hf(config)
    with pytest.raises(TypeError, match="config"):
        architecture_of(["model_type"])


def test_hub_refusals_and_invalid_ids_are_one_line(monkeypatch, tmp_path):
    # what huggingface_hub raises when the Hub answers (its texts span several lines)
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    text = ("404 Client Error. (Request ID: Root=1-abc)\n\nRepository Not Found for url: "
            "https://huggingface.co/api/models/me/nope/revision/main.\nPlease make sure you "
            "specified the correct `repo_id` and `repo_type`.")  # fmt: skip
    for error, match in [
        (RepositoryNotFoundError(text), "no such repository, or a private one"),
        (GatedRepoError(text), "a gated repository"),
        (HfHubHTTPError("500 Server Error: boom\n\nmore"), "500 Server Error: boom$"),
    ]:

        def refuse(*args, error=error, **kwargs):
            raise error

        monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
        with pytest.raises(ConnectionError, match=match) as info:
            from_pretrained("me/nope")
        message = str(info.value)
        assert "\n" not in message and message.startswith("path_or_id: no directory at me/nope")
    monkeypatch.undo()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for name in ("me/bad--name", "me/ends-with."):  # an id's form, but not one the Hub allows
        with pytest.raises(FileNotFoundError, match=f"no directory at {name}, and it is not a "
                           "valid Hub id") as info:  # fmt: skip
            from_pretrained(name)
        assert "\n" not in str(info.value)


def test_a_tied_head_in_the_file_is_checked_for_shape_and_values(tmp_path):
    from spikemar.models.hub import read_pretrained_config
    from spikemar.models.pretrained import config_from_hf, state_dict_from_hf

    mamba2_dir(tmp_path, tied=True)
    config = config_from_hf(read_pretrained_config(tmp_path))
    tensors = read_pretrained_tensors(tmp_path)
    embedding = tensors["backbone.embeddings.weight"]
    state = state_dict_from_hf(config, {**tensors, "lm_head.weight": embedding.clone()})
    assert state["head.weight"] is state["embed.weight"]
    with pytest.raises(ValueError, match=r"'lm_head\.weight' has shape \(300, 16\), expected "
                       r"\(300, 32\) \(the config ties"):  # fmt: skip
        state_dict_from_hf(config, {**tensors, "lm_head.weight": torch.zeros(300, 16)})
    with pytest.raises(ValueError, match="differs from the embedding"):
        state_dict_from_hf(config, {**tensors, "lm_head.weight": embedding + 1})


def test_mamba2_rms_norm_false_loads_as_transformers_runs_it(tmp_path):
    """transformers' Mamba-2 stores config.rms_norm but applies its gated norm whatever it says
    (its weight is in the file either way): spikemar loads such a directory as the same model
    (it refused it)."""
    from transformers import Mamba2ForCausalLM

    hf = mamba2_dir(tmp_path, rms_norm=False, tokenizer=False)
    assert json.loads((tmp_path / "config.json").read_text())["rms_norm"] is False
    x = tokens(300)
    with_norm = Mamba2ForCausalLM.from_pretrained(tmp_path, rms_norm=True).eval()
    with torch.no_grad():
        expected = hf(x).logits
        assert torch.equal(expected, with_norm(x).logits)  # the flag changes nothing there
        model = from_pretrained(tmp_path, tokenizer=False)
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)
