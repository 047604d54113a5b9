"""from_pretrained builds the model on the meta device and reads the file one tensor at a time, in
the dtype it loads: the same model as building it in float32, loading the file into it and
casting it (every tensor bit for bit, the tie, requires_grad, the logits), at about the loaded
dtype's bytes per parameter instead of ~6.5."""

import json

import pytest
import torch
from references.hf_checkpoints import write_mamba2_checkpoint
from references.llamba import tiny_llamba_config, write_llamba_checkpoint
from references.peak_memory import needs_peak_reset, peak_growth

from spikemar.models import MARLM, SpikeConfig, from_pretrained
from spikemar.models.hub import read_pretrained_config, read_pretrained_tensors
from spikemar.models.pretrained import config_from_hf, state_dict_from_hf


def _to_bfloat16(directory):
    """Rewrite a checkpoint's weight files (single or shards, safetensors or bin) in bfloat16,
    and drop config.json's dtype so that 'auto' reads the weights'."""
    from safetensors.torch import load_file, save_file

    for f in directory.glob("*.safetensors"):
        save_file({k: t.to(torch.bfloat16) for k, t in load_file(str(f)).items()}, str(f))
    for f in directory.glob("*.bin"):
        tensors = torch.load(f, weights_only=True)
        torch.save({k: t.to(torch.bfloat16) for k, t in tensors.items()}, f)
    config = json.loads((directory / "config.json").read_text())
    config.pop("dtype", None), config.pop("torch_dtype", None)
    (directory / "config.json").write_text(json.dumps(config))


CHECKPOINTS = {
    "mamba2": lambda d: write_mamba2_checkpoint(d, tokenizer=False),
    "mamba2-tied-bin": lambda d: write_mamba2_checkpoint(d, tied=True, tokenizer=False),
    "mamba2-groups": lambda d: write_mamba2_checkpoint(d, n_groups=2, tokenizer=False),
    "llamba": lambda d: write_llamba_checkpoint(d, tiny_llamba_config(), seed=1),
    "llamba-tied-shards": lambda d: write_llamba_checkpoint(
        d, tiny_llamba_config(tie_embeddings=True), seed=2, shards=3
    ),
    "llamba-bin": lambda d: write_llamba_checkpoint(d, tiny_llamba_config(), weights="bin"),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for name, write in CHECKPOINTS.items():
        directory = tmp_path_factory.mktemp(name)
        write(directory)
        _to_bfloat16(directory)
        out[name] = directory
    return out


def _built_in_float32_and_cast(directory, spikes, dtype):
    """What from_pretrained did before: a float32 MARLM with its random initial weights, the
    file's tensors copied in, the model cast."""
    config = config_from_hf(read_pretrained_config(directory))
    state = state_dict_from_hf(config, read_pretrained_tensors(directory))
    config.spikes = spikes
    model = MARLM(config)
    model.load_state_dict(state, strict=False)
    return model.to(dtype).eval()


SPIKES = SpikeConfig(T=3, v_threshold=0.3)
F32, BF16, F64 = torch.float32, torch.bfloat16, torch.float64


# each checkpoint dense and spiking, each dtype (float32, bfloat16, 'auto', float64) with both
# families and with spikes and without
@pytest.mark.parametrize(
    ("name", "dtype", "spikes"),
    [("mamba2", F32, None), ("mamba2", BF16, SPIKES), ("mamba2-tied-bin", "auto", SPIKES),
     ("mamba2-tied-bin", F64, None), ("mamba2-groups", BF16, None), ("mamba2-groups", F64, SPIKES),
     ("llamba", "auto", None), ("llamba", F64, SPIKES), ("llamba-tied-shards", BF16, SPIKES),
     ("llamba-tied-shards", F32, None), ("llamba-bin", F32, SPIKES), ("llamba-bin", BF16, None),
     ("mamba2", F32, SpikeConfig(T=2, threshold="layer", neuron="binary"))],
)  # fmt: skip
def test_the_model_is_the_float32_build_cast(checkpoints, name, dtype, spikes):
    directory = checkpoints[name]
    model = from_pretrained(directory, spikes=spikes, dtype=dtype, tokenizer=False)
    expected = _built_in_float32_and_cast(
        directory, spikes, torch.bfloat16 if dtype == "auto" else dtype
    )
    # every tensor real (parameters, buffers, plain tensor attributes), bit for bit, same dtype
    for module in model.modules():
        for key, value in vars(module).items():
            assert not (isinstance(value, torch.Tensor) and value.is_meta), key
    got, want = model.state_dict(), expected.state_dict()
    assert list(got) == list(want)
    for key, t in want.items():
        assert not got[key].is_meta and got[key].dtype == t.dtype, key
        assert torch.equal(got[key], t), key
    params = dict(model.named_parameters(remove_duplicate=False))
    assert {k: p.requires_grad for k, p in params.items()} == {
        k: p.requires_grad for k, p in expected.named_parameters(remove_duplicate=False)
    }
    assert len(list(model.parameters())) == len(list(expected.parameters()))
    if model.config.tie_embeddings:  # one Parameter, as MARLM ties it
        assert model.head.weight is model.embed.weight
    assert not model.training and (model.config.spikes is None) == (spikes is None)
    if spikes is not None:  # the spike points were built for real, thresholds from spikes
        assert [s.name for s in model.spike_points()] == [s.name for s in expected.spike_points()]
    x = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x), expected(x))


def test_a_tied_model_stays_tied_while_it_learns(checkpoints):
    model = from_pretrained(checkpoints["llamba-tied-shards"], tokenizer=False).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randint(0, 61, (2, 5), generator=torch.Generator().manual_seed(0))
    model(x).square().mean().backward()
    optimizer.step()
    assert torch.equal(model.head.weight, model.embed.weight)


@needs_peak_reset
def test_peak_memory_is_about_the_loaded_dtype_per_parameter(tmp_path):
    # ~8 M parameters in bfloat16, most in the embedding and the head as in a real LM
    config = tiny_llamba_config(vocab_size=32000, d_model=128, n_layer=1)
    write_llamba_checkpoint(tmp_path, config, weights="safetensors")
    _to_bfloat16(tmp_path)
    # a first load for the imports; kept, so that the measured one cannot reuse its memory
    first = from_pretrained(tmp_path, tokenizer=False, dtype="auto")
    growth, model = peak_growth(lambda: from_pretrained(tmp_path, tokenizer=False, dtype="auto"))
    del first
    n = sum(p.numel() for p in model.parameters())
    # the bfloat16 model (2 B/param) plus its largest tensor (the embedding, ~1 B/param here) and
    # the allocator's slack; building in float32 and casting took ~6.5 B/param
    assert growth < 4.0 * n, (growth / n, n)


@pytest.mark.parametrize("pread", [True, False])
def test_the_model_owns_its_memory_when_the_file_is_rewritten(tmp_path, monkeypatch, pread):
    """The tensors are copies, not views of the mapped file: a checkpoint whose bytes are written
    over in place leaves a loaded model as it was (pread=False: a safetensors before 0.8, whose
    safe_open has no backend argument and maps the file)."""
    import safetensors

    if not pread:
        mapped = safetensors.safe_open

        def safe_open(*args, **kwargs):
            if "backend" in kwargs:
                raise TypeError("safe_open() got an unexpected keyword argument 'backend'")
            return mapped(*args, **kwargs)

        monkeypatch.setattr(safetensors, "safe_open", safe_open)
    write_llamba_checkpoint(tmp_path, tiny_llamba_config(), seed=1)
    _to_bfloat16(tmp_path)
    model = from_pretrained(tmp_path, tokenizer=False, dtype="auto")
    before = {k: t.clone() for k, t in model.state_dict().items()}
    with open(tmp_path / "model.safetensors", "r+b") as f:
        data = 8 + int.from_bytes(f.read(8), "little")  # the header's length, then the tensors
        size = f.seek(0, 2) - data
        f.seek(data)
        f.write(bytes(size))
    assert all(torch.equal(t, before[k]) for k, t in model.state_dict().items())


def test_a_legacy_format_bin_is_read_whole(checkpoints, tmp_path):
    """torch maps only zip-format files; a .bin in torch's legacy format is read as before."""
    source = checkpoints["llamba-bin"]
    for f in source.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    tensors = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    torch.save(tensors, tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    model = from_pretrained(tmp_path, tokenizer=False, dtype="auto")
    expected = from_pretrained(source, tokenizer=False, dtype="auto")
    assert all(torch.equal(t, expected.state_dict()[k]) for k, t in model.state_dict().items())


def test_a_float64_checkpoint_loads_as_float64_without_a_float32_rounding(tmp_path):
    """Each tensor is cast from the file's dtype to the loaded one: a float64 file loaded as
    float64 keeps every bit (the float32 build rounded it to float32 first)."""
    from safetensors.torch import load_file, save_file

    write_llamba_checkpoint(tmp_path, tiny_llamba_config(), seed=1)
    f = str(tmp_path / "model.safetensors")
    gen = torch.Generator().manual_seed(0)
    exact = {k: t.double() + 1e-12 * torch.randn(t.shape, generator=gen, dtype=torch.float64)
             for k, t in load_file(f).items()}  # fmt: skip
    save_file(exact, f)
    model = from_pretrained(tmp_path, tokenizer=False, dtype="auto")
    assert model.embed.weight.dtype == torch.float64
    assert torch.equal(model.embed.weight, exact["backbone.embedding.weight"])
    assert torch.equal(model.layers[1].ffn.down_proj.weight,
                       exact["backbone.layers.1.mlp.down_proj.weight"])  # fmt: skip


@pytest.mark.parametrize("legacy", [False, True])
def test_a_transposed_tensor_in_a_bin_loads_contiguous(checkpoints, tmp_path, legacy):
    """A pytorch_model.bin may hold a tensor saved as a transposed view: the weight is made
    contiguous, as copying it into a built model made it (a strided weight rounded its
    products otherwise: logits 2e-6 off)."""
    source = checkpoints["llamba-bin"]
    for f in source.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    tensors = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    strided = {k: t.t().contiguous().t() if t.dim() == 2 else t for k, t in tensors.items()}
    assert not all(t.is_contiguous() for t in strided.values())
    torch.save(strided, tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=not legacy)
    model = from_pretrained(tmp_path, tokenizer=False, dtype="auto")
    expected = from_pretrained(source, tokenizer=False, dtype="auto")
    for k, t in model.state_dict().items():
        assert t.is_contiguous(), k
        assert torch.equal(t, expected.state_dict()[k]), k
