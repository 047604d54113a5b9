"""Acceptance probes of the SSM layers and the energy counter (issues 3 and 4) from outside: the
``spikemar energy`` command's bad inputs, and counts compared with hand counts."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from spikemar import cli
from spikemar.energy import declare_spikes, profile, record_ops

DEMO = ["energy", "--model", "demo", "--d", "16", "--layers", "1"]
PACKAGED_STUDENT = str(Path(__file__).parents[1] / "spikemar" / "assets" / "mar_shakespeare.pt")


def _run(capsys, *args: str) -> tuple[int, str]:
    rc = cli.main([*DEMO, *args])
    captured = capsys.readouterr()
    return rc, captured.err


def test_energy_cli_names_a_text_file_that_is_not_utf8(tmp_path, capsys):
    path = tmp_path / "bytes.bin"
    path.write_bytes(b"abc\xd0\x00\xff")
    rc, err = _run(capsys, "--text-file", str(path))
    assert rc == 2
    assert err.count("\n") == 1 and "--text-file" in err and "not UTF-8" in err


@pytest.mark.parametrize(
    "flag, make, needle",
    [
        ("--png", lambda tmp: tmp / "energy.txt", "expected a .png"),
        ("--json", lambda tmp: tmp, "is a folder"),
        ("--markdown", lambda tmp: tmp / "file" / "r.md", "is a file, not a folder"),
    ],
    ids=["png-suffix", "json-folder", "markdown-under-a-file"],
)
def test_energy_cli_refuses_a_bad_output_path_before_writing_anything(
    tmp_path, capsys, flag, make, needle
):
    """A bad output path is one line naming its option, before the model runs, and the other
    reports asked for in the same command are not written."""
    (tmp_path / "file").write_text("")
    good = tmp_path / "out" / "r.json"
    args = ["--random-tokens", "4", flag, str(make(tmp_path))]
    if flag != "--json":
        args += ["--json", str(good)]
    rc, err = _run(capsys, *args)
    assert rc == 2
    assert err.count("\n") == 1 and flag in err and needle in err
    assert not good.exists()


@pytest.mark.parametrize(
    "fields, needle",
    [
        ({"chunk_size": 0}, "chunk_size: expected an int >= 1 or None"),
        ({"chunk_size": 2.5}, "chunk_size: expected an int >= 1 or None"),
        ({"ffn_hidden": -4}, "ffn_hidden: expected an int >= 0 or None"),
        ({"ffn_hidden": 2.5}, "ffn_hidden: expected an int >= 0 or None"),
        ({"layers": "attn", "n_attn_heads": 3}, "n_attn_heads: 3 does not divide d_model = 8"),
        ({"layers": "attn", "n_attn_heads": 0}, "n_attn_heads: expected an int >= 1"),
        ({"layers": "attn", "max_len": 0}, "max_len: expected an int >= 1"),
        ({"ffn_sparsity": ("topk",)}, "ffn_sparsity: expected ('topk', f)"),
        ({"ffn_sparsity": ("topk", "half")}, "ffn_sparsity: expected a number"),
        ({"ffn_hidden": 0, "spikes": "channel"}, "ffn_hidden: 0 leaves the FFN's hidden spike"),
    ],
)
def test_mar_config_names_a_bad_field_when_it_is_made(fields, needle):
    """Each bad field is a ValueError naming the config's own field as the config is made, not
    an error from deep inside the model when it is built or first run."""
    from spikemar.models import MARConfig, SpikeConfig

    if "spikes" in fields:
        fields = {**fields, "spikes": SpikeConfig(threshold=fields["spikes"])}
    with pytest.raises(ValueError, match="^" + re.escape(needle)):
        MARConfig(vocab_size=5, d_model=8, n_layers=1, head_dim=4, d_state=2, **fields)
    if "spikes" in fields:  # per layer, a zero-width FFN runs
        fields["spikes"] = SpikeConfig(threshold="layer")
        MARConfig(vocab_size=5, d_model=8, n_layers=1, head_dim=4, d_state=2, **fields)


def test_energy_cli_names_the_text_option_the_tokenizer_cannot_spell(tmp_path, capsys):
    """The packaged student's character tokenizer refuses '~': the one line names the option
    the text came from."""
    rc = cli.main(["energy", "--text", "h~i"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("spikemar energy: error: --text: ")
    path = tmp_path / "prompt.txt"
    path.write_text("h~i")
    rc = cli.main(["energy", "--text-file", str(path)])
    err = capsys.readouterr().err
    assert rc == 2 and "error: --text-file: characters ['~']" in err


class _Records(torch.nn.Module):
    def __init__(self, macs) -> None:
        super().__init__()
        self.macs = macs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        record_ops(self, kind="custom", macs=self.macs)
        return x


@pytest.mark.parametrize(
    "macs, error, needle",
    [
        (-3, ValueError, "expected a count >= 0, got -3"),
        (2.5, TypeError, "got 2.5"),  # priced as 2.5 MACs but listed as 2
        ("many", TypeError, "got 'many'"),
        (True, TypeError, "got True"),
        (torch.tensor([1, 2]), TypeError, "got a tensor of shape (2,)"),
    ],
)
def test_record_ops_refuses_a_count_that_is_not_one(macs, error, needle):
    """record_ops is public: a negative count (negative energy), a fraction or a non-number
    is an error naming the count where it is given, not a wrong total or a failure when the
    report is built."""
    with pytest.raises(error, match=r"^record_ops: macs: .*" + re.escape(needle)):
        profile(_Records(macs), torch.zeros(2))


def test_record_ops_takes_ints_and_0d_tensors():
    assert profile(_Records(7), torch.zeros(2)).total_macs == 7
    assert profile(_Records(torch.tensor(5)), torch.zeros(2)).total_macs == 5


@pytest.mark.parametrize("kind", ["ssm", "discrete-mamba2"])
@pytest.mark.parametrize("conv_bias", [True, False])
def test_step_by_step_counts_the_same_work_as_the_forward(kind, conv_bias):
    """Counted token by token (``step``, where the mixer computes its convolution by hand) the
    model does the work of its parallel forward (where the counter sees the Conv1d module):
    the same ACs, MACs, element-wise ops (the convolution's bias adds included) and neuron
    updates."""
    from spikemar.energy import EnergyCounter
    from spikemar.models import MARLM, MARConfig
    from spikemar.models.common import SpikeConfig

    torch.manual_seed(0)
    config = MARConfig(vocab_size=11, d_model=16, n_layers=1, d_state=4, head_dim=4,
                       layers=kind, conv_bias=conv_bias, spikes=SpikeConfig(T=2))  # fmt: skip
    model = MARLM(config).eval()
    tokens = torch.randint(0, 11, (2, 5))
    with torch.no_grad(), EnergyCounter(model) as counter:
        model(tokens)
    forward = counter.report(tokens=10)
    with torch.no_grad(), EnergyCounter(model) as counter:
        state = model.init_state(2)
        for t in range(5):
            _, state = model.step(tokens[:, t], state)
    stepped = counter.report(tokens=10)
    for total in ("total_acs", "total_macs", "total_elementwise_ops", "total_neuron_updates"):
        assert getattr(stepped, total) == getattr(forward, total), total


def _mixers():
    from spikemar.models import MARConfig
    from spikemar.models.mixers import MIXERS
    from spikemar.ssm import DiscreteMixer, LTICell, SelectiveMixer

    attention = MARConfig(vocab_size=5, d_model=8, n_layers=1, layers="attn", n_attn_heads=2,
                          max_len=6, spikes=None)  # fmt: skip
    return {
        "selective": SelectiveMixer(8, d_state=2, head_dim=4),
        "discrete": DiscreteMixer(8, d_state=2, n_qk_heads=1, n_v_heads=2),
        "lti": LTICell(8),
        "attention": MIXERS["attn"](attention, None),
    }


def _state(mixer, batch: int):
    return mixer.init_state(batch, 6) if hasattr(mixer, "qkv") else mixer.init_state(batch)


@pytest.mark.parametrize("kind", ["selective", "discrete", "lti", "attention"])
@pytest.mark.parametrize(
    "call, needle",
    [
        (lambda m: m(torch.randn(2, 3, 7)), r"^u: expected \[batch, L, "),
        (lambda m: m(torch.randn(2, 0, 8)), r"^u: expected \[batch, L, .* with L >= 1"),
        (lambda m: m(torch.randn(2, 8)), r"^u: expected \[batch, L, "),
        (lambda m: m.step(torch.randn(2, 3, 8), _state(m, 2)), r"^u_t: expected \[batch, "),
        (lambda m: m.step(torch.randn(2, 8), _state(m, 1)), r"^state(\.\w+)?: expected "),
        (lambda m: m.step(torch.randn(2, 8), None), r"^state: expected the \w+State"),
    ],
    ids=["width", "empty", "2-d", "step-3-d", "step-batch", "step-no-state"],
)
def test_a_mixer_names_a_bad_input_or_state_at_its_own_boundary(kind, call, needle):
    """The mixers are public (spikemar.ssm): a wrong width, an empty run, a token of the wrong
    rank or a state made for another batch is one ValueError naming it, not a matmul's
    RuntimeError, and an LTI cell no longer broadcasts a batch-1 state over a batch of 2."""
    with torch.no_grad(), pytest.raises(ValueError, match=needle):
        call(_mixers()[kind])


@pytest.mark.parametrize("labels", [("x", "x"), ("rows", "teacher"), ("ratio", "basis"),
                                    ("", "dense"), ("x", "x_pj")])  # fmt: skip
def test_compare_refuses_labels_whose_json_keys_meet(labels):
    """The labels name keys of the comparison's JSON: equal labels dropped one side's report,
    'rows' or 'ratio' overwrote the comparison's own fields."""
    from spikemar.energy import compare
    from spikemar.energy.demo import demo_model, dense_demo_model

    tokens = torch.randint(0, 256, (1, 4))
    student = profile(demo_model(d=16, layers=1), tokens)
    teacher = profile(dense_demo_model(d=16, layers=1), tokens)
    with pytest.raises(ValueError, match=r"^labels: expected two different non-empty names"):
        compare(student, teacher, labels=labels)
    done = json.loads(compare(student, teacher, labels=("spiking", "dense")).to_json())
    assert done["spiking"]["rows"] and done["dense"]["rows"] and isinstance(done["rows"], list)


def test_a_malformed_energy_report_is_one_value_error():
    """A report file that is not JSON, or a report missing a field or with a row that is not
    one, is a ValueError saying so (it was a KeyError, TypeError or a bare JSONDecodeError)."""
    from spikemar.energy import EnergyReport
    from spikemar.energy.demo import demo_model

    data = profile(demo_model(d=16, layers=1), torch.randint(0, 256, (1, 4))).to_dict()
    with pytest.raises(ValueError, match=r"^text: not a JSON energy report"):
        EnergyReport.from_json("energy: 5 pJ")
    broken = [
        {k: v for k, v in data.items() if k != "rows"},
        {**data, "rows": [1]},
        {**data, "hardware": "loihi"},
    ]
    for doc in broken:
        with pytest.raises(ValueError, match=r"^data: a malformed 'spikemar.energy/\d' report"):
            EnergyReport.from_json(json.dumps(doc))


class _Declares(torch.nn.Module):
    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.shape = shape
        self.proj = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(declare_spikes(self, x, torch.ones(self.shape)))


@pytest.mark.parametrize("shape", [(5, 4), (2, 5, 3), (2, 5, 4, 1), (0, 5, 4)])
def test_declare_spikes_refuses_a_spike_train_that_does_not_decode_to_the_tensor(shape):
    """declare_spikes(module, decoded, spikes) takes spikes [T, *decoded.shape]: a train of
    another shape was counted as it came (neuron updates and ACs of a train that is not the
    decode's)."""
    with pytest.raises(ValueError, match=r"^declare_spikes: spikes: expected .* = \[T, 5, 4\]"):
        profile(_Declares(shape), torch.randn(5, 4))
    assert profile(_Declares((2, 5, 4)), torch.randn(5, 4)).total_acs == 2 * 20 * 3


@pytest.mark.parametrize("P, N", [(0, 4), (3, 0)], ids=["head_dim-0", "state-0"])
def test_ssd_scan_names_an_empty_head_or_state(P, N):
    """A head_dim or state of 0 was a reshape RuntimeError from inside the chunked scan."""
    from spikemar.ssm import ssd_scan, ssd_step

    x, a = torch.randn(1, 5, 2, P), -torch.rand(1, 5, 2)
    B = torch.randn(1, 5, 2, N)
    with pytest.raises(ValueError, match=r"^x .* heads, head_dim and state must be >= 1"):
        ssd_scan(x, a, B, B)
    with pytest.raises(ValueError, match=r"^x_t .* heads, head_dim and state must be >= 1"):
        ssd_step(x[:, 0], a[:, 0], B[:, 0], B[:, 0], None)
    empty = torch.randn(0, 5, 2, 3), -torch.rand(0, 5, 2), torch.randn(0, 5, 2, 4)
    y, h = ssd_scan(empty[0], empty[1], empty[2], empty[2])  # a batch of 0 stays fine
    assert y.shape == (0, 5, 2, 3) and h.shape == (0, 2, 3, 4)


@pytest.mark.parametrize(
    "argv, line",
    [
        (["energy", "--checkpoint", "nope.pt"], "spikemar energy: error: --checkpoint: no file at"),
        (["energy", "--checkpoint", PACKAGED_STUDENT, "--teacher", "nope.pt", "--compare-dense"],
         "spikemar energy: error: --teacher: no file at"),
        (["energy", "--hardware", "zz"], "spikemar energy: error: --hardware: unknown profile"),
    ],
    ids=["checkpoint", "teacher", "hardware"],
)  # fmt: skip
def test_energy_cli_names_each_option_once(argv, line, capsys):
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith(line), err
