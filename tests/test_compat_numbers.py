"""Inputs that worked before NumPy's numbers were accepted work the same now: the same stored
values and types, the same messages, old checkpoints load (spikemar/_numbers.py's rule)."""

from __future__ import annotations

import collections
import json
import math
from dataclasses import asdict

import numpy as np
import pytest
import torch
from torch import nn

from spikemar._numbers import check_count, check_seed, item
from spikemar.checkpoint import load_checkpoint, save_checkpoint
from spikemar.convert import calibrate_thresholds
from spikemar.distill.losses import kl_divergence
from spikemar.distill.trainer import DistillConfig
from spikemar.eval.scoring import Scorer
from spikemar.models import MARLM, MARConfig, SpikeConfig
from spikemar.models.generation import filter_logits
from spikemar.models.transformer import TransformerConfig, TransformerLM
from spikemar.refine.calibrate import calibrate, firing_rates
from spikemar.tokenizer import HFTokenizer
from spikemar.training import TrainConfig

SMALL = dict(vocab_size=11, d_model=16, n_layers=1, d_state=4, head_dim=8)


def _types(*values):
    return [type(v) for v in values]


def test_loop_configs_keep_ints_as_typed_and_their_messages():
    c = TrainConfig(weight_decay=0, lr=1, min_lr=0, grad_clip=2)
    assert (c.weight_decay, c.lr, c.min_lr, c.grad_clip) == (0, 1, 0, 2)
    assert _types(c.weight_decay, c.lr, c.min_lr, c.grad_clip) == [int] * 4
    assert _types(TrainConfig(lr=np.float64(0.5)).lr) == [float]  # NumPy's as Python's
    with pytest.raises(ValueError, match=r"^grad_clip, weight_decay: .*, got 0, 0.1$"):
        TrainConfig(grad_clip=0)
    with pytest.raises(ValueError, match=r"^lr, min_lr: .*; got 1, 2$"):
        TrainConfig(lr=1, min_lr=2)
    d = DistillConfig(teacher="x.pt", alpha=1, beta=0, gamma=0, ce=0, temperature=2)
    assert (d.alpha, d.beta, d.gamma, d.ce, d.temperature) == (1, 0, 0, 0, 2)
    assert _types(d.alpha, d.beta, d.gamma, d.ce, d.temperature) == [int] * 5
    with pytest.raises(ValueError, match=r"temperature > 0; got -1, 0.7, 1.0, 0.0, 1.0$"):
        DistillConfig(teacher="x.pt", alpha=-1)


def _word_level():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    return Tokenizer(WordLevel({w: i for i, w in enumerate("abcdefghijk")}, unk_token="a"))


def test_a_checkpoint_saved_with_a_bool_eos_id_loads_without_one(tmp_path):
    """Old from_directory stored config.json's ``"eos_token_id": true`` as is; such a
    checkpoint loads, with no end-of-text token (what the same directory reads as now)."""
    path = tmp_path / "old.pt"
    save_checkpoint(path, MARLM(MARConfig(**SMALL)), HFTokenizer(_word_level()))
    payload = torch.load(path, weights_only=True)
    payload["tokenizer"]["eos_id"] = True  # as the old code saved it
    torch.save(payload, path)
    _, tokenizer, _ = load_checkpoint(path)
    assert tokenizer.eos_id is None and tokenizer == HFTokenizer(_word_level())
    with pytest.raises(ValueError, match=r"^eos_id: expected a token id"):
        HFTokenizer(_word_level(), True)  # given by hand, a bool is still refused


@pytest.mark.parametrize(("bounds", "expected"), [
    (np.array([0.001, 0.1]), (0.001, 0.1)),
    (torch.tensor([0.001, 0.1], dtype=torch.float64), (0.001, 0.1)),
    (torch.tensor([0.25, 0.5]), (0.25, 0.5)),  # 0-d float32 elements
    (range(0, 2), (0.0, 1.0)),
    ([0, 1], (0.0, 1.0)),
])  # fmt: skip
def test_dt_limit_takes_any_sequence_of_two_reals(bounds, expected):
    limit = MARConfig(**SMALL, dt_limit=bounds).dt_limit
    assert limit == expected and _types(*limit) == [float, float]


@pytest.mark.parametrize("bounds", ["ab", 0.1, None, (0.1,), (0.2, 0.1), (0.0, "x")])
def test_dt_limit_refuses_what_is_not_two_ordered_bounds(bounds):
    with pytest.raises(ValueError, match=r"^dt_limit: expected \(min, max\)"):
        MARConfig(**SMALL, dt_limit=bounds)


def test_ffn_sparsity_as_a_named_tuple_is_kept():
    Sparsity = collections.namedtuple("Sparsity", "mode amount")
    given = Sparsity("topk", 0.5)
    assert MARConfig(**SMALL, ffn_sparsity=given).ffn_sparsity is given
    assert MARConfig(**SMALL, ffn_sparsity=["topk", np.float32(0.5)]).ffn_sparsity == ["topk", 0.5]


def test_attention_settings_are_python_numbers_without_attention_layers():
    config = MARConfig(**SMALL, spikes=None, max_len=np.int64(100), n_attn_heads=np.int64(2))
    assert _types(config.max_len, config.n_attn_heads) == [int, int]
    json.dumps(asdict(config))  # NumPy's int64 is not JSON
    assert MARConfig(**SMALL, max_len=None).max_len is None  # unused: not checked, as before


def _generate_at_temperature():
    """generate(t) of one seeded small model, sampling with a seeded generator."""
    torch.manual_seed(0)
    model = MARLM(MARConfig(**SMALL)).eval()

    def run(t):
        return model.generate(torch.tensor([[1, 2]]), 3, temperature=t,
                              generator=torch.Generator().manual_seed(0))  # fmt: skip

    return run


@pytest.mark.parametrize("zero_d", [torch.tensor(0.7), np.array(0.7)])
def test_generate_takes_a_0d_temperature(zero_d):
    run = _generate_at_temperature()

    assert torch.equal(run(zero_d), run(float(zero_d)))
    with pytest.raises(ValueError, match=r"^temperature: expected >= 0, got tensor\(-1\.\)$"):
        run(torch.tensor(-1.0))


def test_kl_divergence_takes_a_0d_temperature_and_keeps_its_gradient():
    p, q = torch.randn(3, 5, generator=torch.Generator().manual_seed(0)).unbind(0)[:2]
    expected = kl_divergence(p, q, temperature=2.0)
    assert torch.allclose(kl_divergence(p, q, temperature=np.array(2.0)), expected)
    learned = torch.tensor(2.0, requires_grad=True)
    kl = kl_divergence(p, q, temperature=learned)
    assert torch.allclose(kl, expected)
    kl.backward()
    assert learned.grad is not None and learned.grad != 0
    # any tensor divides as it is, as before (a per-row or learned one; reading it would wait
    # for the device every step); numbers are checked
    per_row = torch.tensor([[2.0], [2.0]])
    assert torch.allclose(kl_divergence(torch.stack([p, p]), torch.stack([q, q]), per_row),
                          torch.stack([expected, expected]))  # fmt: skip
    learned = nn.Parameter(torch.ones(1))
    assert torch.allclose(kl_divergence(p, q, learned), kl_divergence(p, q, 1.0))
    for bad in (0.0, np.float32(-1.0), math.nan, True, "2"):
        with pytest.raises(ValueError, match=r"^temperature: expected a finite number > 0"):
            kl_divergence(p, q, temperature=bad)


def test_item_unwraps_0d_values_only():
    assert item(torch.tensor(3)) == 3 and item(np.array(0.5)) == 0.5
    one = torch.tensor([3])
    assert item(one) is one and item("ab") == "ab"


def test_spike_config_lets_tensor_thresholds_and_unused_tau_through(tmp_path):
    shared = SpikeConfig(threshold="layer", v_threshold=torch.tensor(0.5))
    model = MARLM(MARConfig(**SMALL, spikes=shared))
    assert all(float(s.module.neuron.v_threshold.detach()) == 0.5 for s in model.spike_points())
    # with threshold='channel' it is refused where a spike point is built (as before): a
    # config whose layers have none (spiking=False) builds
    MARLM(MARConfig(**SMALL, spiking=False, spikes=SpikeConfig(v_threshold=torch.tensor(0.5))))
    ternary = SpikeConfig(neuron="ternary-single", tau=0)  # its neuron has no tau
    assert ternary.tau == 0
    path = tmp_path / "ternary.pt"
    save_checkpoint(path, MARLM(MARConfig(**SMALL, spikes=ternary)), HFTokenizer(_word_level()))
    assert load_checkpoint(path)[0].config.spikes.neuron == "ternary-single"
    with pytest.raises(ValueError, match=r"^tau: expected a float > 0"):
        SpikeConfig(tau=0)  # the ATMN neuron uses it
    with pytest.raises(ValueError, match=r"^v_threshold: expected a finite number > 0"):
        SpikeConfig(v_threshold=0)


def test_transformer_dropout_of_one_builds():
    config = TransformerConfig(vocab_size=11, d_model=16, n_layers=1, n_heads=2, dropout=1.0)
    assert TransformerLM(config).config.dropout == 1.0
    with pytest.raises(ValueError, match=r"^dropout: expected a number in \[0, 1\], got 1.5$"):
        TransformerConfig(dropout=1.5)


def _student_teacher():
    torch.manual_seed(0)
    config = MARConfig(**SMALL, ffn=None, spikes=SpikeConfig(T=2))
    student = MARLM(config).eval()
    teacher = MARLM(config.dense()).eval()
    teacher.load_state_dict(student.state_dict(), strict=False)
    return (
        student,
        teacher,
        [torch.randint(0, 11, (1, 8), generator=torch.Generator().manual_seed(1))],
    )


def test_calibrate_thresholds_with_no_rounds_reports_the_rates():
    """rounds=0 ran before: no bisection, each threshold at the top of its bracket (above
    every sample), where nothing fires."""
    student, teacher, batches = _student_teacher()
    rates = calibrate_thresholds(student, teacher, batches, 0.2, max_rows=16, rounds=0)
    assert rates == {s.name: 0.0 for s in student.spike_points()}
    zero_d = calibrate_thresholds(
        student, teacher, batches, torch.tensor(0.2), max_rows=16, rounds=0
    )
    assert zero_d == rates  # a 0-d firing rate, as before
    with pytest.raises(ValueError, match=r"^rounds: expected an int >= 0, got -1$"):
        calibrate_thresholds(student, teacher, batches, 0.2, rounds=-1)


@pytest.mark.parametrize("seed", [2**70, -(2**64)])
def test_refine_calibration_names_a_seed_torch_cannot_take(seed):
    student, teacher, batches = _student_teacher()
    with pytest.raises(ValueError, match=r"^seed: expected an int in \[-2\*\*63, 2\*\*64\)"):
        calibrate(student, teacher, batches, quant_error=0.25, max_rows=16, seed=seed)
    with pytest.raises(ValueError, match=r"^seed: expected an int in \[-2\*\*63, 2\*\*64\)"):
        firing_rates(student, teacher, batches, max_rows=16, seed=seed)


def test_one_count_and_one_seed_check():
    assert _types(check_count("n", np.int64(3)), check_seed(np.uint64(2**64 - 1))) == [int, int]
    assert check_count("rounds", 0, 0) == 0 and check_seed(-(2**63)) == -(2**63)
    for bad in (0, True, 1.0, "1"):
        with pytest.raises(ValueError, match=rf"^n: expected an int >= 1, got {bad!r}$"):
            check_count("n", bad)
    for bad in (2**64, True, 1.5):
        with pytest.raises(ValueError, match=r"^seed: expected an int in \[-2\*\*63, 2\*\*64\)"):
            check_seed(bad)


def test_scorer_ids_refuse_complex_and_take_one_element_integer_tensors():
    torch.manual_seed(0)
    # float64: a batch of two documents rounds as one alone does (float32 differs by 1e-9)
    scorer = Scorer(MARLM(MARConfig(**SMALL)).double().eval(), 11)
    plain = scorer.token_logprobs([[1, 2, 3]], 0)
    wrapped = [[torch.tensor([1]), np.array([2]), torch.tensor(3)]]
    assert torch.equal(torch.as_tensor(scorer.token_logprobs(wrapped, 0)[0]),
                       torch.as_tensor(plain[0]))  # fmt: skip
    column = [torch.tensor([[1], [2], [3]]), np.array([[1], [2], [3]])]  # one id a row
    assert all(torch.equal(got, plain[0]) for got in scorer.token_logprobs(column, 0))
    with pytest.raises(ValueError, match=r"^documents\[0\]: .* got torch.int64 of shape \(1, 3\)"):
        scorer.token_logprobs([torch.tensor([[1, 2, 3]])], 0)
    with pytest.raises(ValueError, match=r"^documents\[0\]: .* got torch.complex64 of shape"):
        scorer.token_logprobs([torch.tensor([1 + 0j, 2 + 0j])], 0)
    with pytest.raises(ValueError, match=r"^documents\[0\]: expected integer token ids, got"):
        scorer.token_logprobs([[torch.tensor([1.0]), 2]], 0)  # int() truncated a float
    with pytest.raises(ValueError, match=r"^documents\[0\]: expected integer token ids, got"):
        scorer.token_logprobs([[torch.tensor([1, 2]), 2]], 0)


def test_filter_logits_filters_along_the_last_dimension_of_any_shape():
    rows = torch.randn(2, 3, 7, generator=torch.Generator().manual_seed(0))
    settings = {"temperature": 0.5, "top_k": 4, "top_p": 0.8}
    each = torch.stack([filter_logits(r, **settings) for r in rows])  # [3, 7] each
    assert torch.equal(filter_logits(rows, **settings), each)
    assert torch.equal(filter_logits(rows[0, 0], **settings), each[0, 0])
    assert torch.equal(filter_logits(torch.arange(6), 2.0), torch.arange(6) / 2.0)
    for bad, what in [(torch.tensor(1.0), r"\(\) torch.float32"),
                      (torch.zeros(2, dtype=torch.complex64), r"\(2,\) torch.complex64"),
                      ([[0.0, 1.0]], "list")]:  # fmt: skip
        with pytest.raises(ValueError, match=rf"^logits: expected a real tensor .*, got {what}$"):
            filter_logits(bad)
    assert math.isinf(float(filter_logits(torch.tensor([0.0, 5.0]), top_k=1)[0]))


def test_sampling_settings_take_the_tensors_they_took_before():
    """filter_logits divided by a per-row temperature and compared top_p/top_k tensors;
    generate took a one-element temperature tensor: each as before."""
    logits = torch.randn(2, 7, generator=torch.Generator().manual_seed(0))
    per_row = torch.tensor([[1.0], [2.0]])
    assert torch.equal(filter_logits(logits, per_row), logits / per_row)
    assert torch.equal(
        filter_logits(logits, top_p=torch.tensor(0.9)), filter_logits(logits, top_p=0.9)
    )
    assert torch.equal(filter_logits(logits, top_k=torch.tensor(3)), filter_logits(logits, top_k=3))
    run = _generate_at_temperature()

    assert torch.equal(run(torch.tensor([0.7])), run(0.7))
    with pytest.raises(
        ValueError, match=r"^temperature: expected >= 0, got tensor\(\[0.5000, 0.6000\]\)$"
    ):
        run(torch.tensor([0.5, 0.6]))  # generate compares it with 0: one number
