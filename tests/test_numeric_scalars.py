"""Hyperparameters given as NumPy scalars (a sweep's ``np.linspace`` / ``np.arange``, a value
read from a .npy or HDF5 file) behave as the Python numbers they stand for, at every public
boundary that takes one, and are stored as Python's (configs save as JSON and load with
``torch.load(weights_only=True)``); a bool, NaN or a string is still refused, naming the
argument."""

from __future__ import annotations

import functools
import importlib
import json
import math
from dataclasses import asdict, astuple
from fractions import Fraction

import numpy as np
import pytest
import torch
from torch import nn

from spikemar import counting
from spikemar._numbers import integer, number, plain, real
from spikemar.checkpoint import load_checkpoint, model_config_dict, save_checkpoint
from spikemar.data import CharTokenizer
from spikemar.distill import DistillConfig, kl_divergence, sbds_loss
from spikemar.energy import EnergyReport, HardwareProfile, MemoryLevel, profile
from spikemar.energy.demo import demo_model
from spikemar.eval.perplexity import end_token, text_perplexity
from spikemar.eval.scoring import Scorer
from spikemar.hardware import CUBALIF, export_nir, run_lava
from spikemar.hardware.demo import demo_network
from spikemar.hardware.formats import check_input_shape
from spikemar.models import MARLM, ActivationSparsifier, MARConfig, SpikeConfig, SpikePoint
from spikemar.models.fused_step import FusedStep
from spikemar.models.generation import filter_logits
from spikemar.models.transformer import TransformerConfig
from spikemar.neurons import ATMN, TernarySingleStep, atmn_decode, atmn_quantize
from spikemar.neurons.functional import ATMNParameters, atmn_multi_step, delta_inject
from spikemar.neurons.surrogate import ATan, Rectangle, Sigmoid, Triangle
from spikemar.refine import (
    Measurements,
    Option,
    calibrate,
    kl_and_loss,
    measure,
    plan,
    random_schedule,
)
from spikemar.refine.calibrate import firing_rates as point_firing_rates
from spikemar.ssm.norm import RMSNorm
from spikemar.ssm.scan import ssd_scan
from spikemar.tokenizer import HFTokenizer
from spikemar.training import TrainConfig
from spikemar.viz import firing_rates, raster

X = torch.linspace(-2.0, 2.0, 24, dtype=torch.float64).reshape(8, 3)
SMALL = dict(vocab_size=11, d_model=16, n_layers=1, d_state=4, head_dim=8)


def _same(a, b) -> bool:
    """Equal, and of the same type: a Python float stays a float, never a NumPy scalar."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b))


def _config(c) -> dict:
    return {**vars(c), "spikes": None if c.spikes is None else c.spikes.as_dict()}


def _quantized(neuron: nn.Module, T: int = 4):
    decoded, spikes = neuron.quantize(X, T)
    return neuron.tau, decoded.detach(), spikes


class _Sink:
    """A counting listener that takes spike counts and keeps the T it is handed."""

    def __init__(self):
        self.T = None

    def needs_spike_train(self, module):
        return False

    def on_declare_spike_counts(self, module, decoded, counts, T, ternary):
        self.T = T


def _declared_T(T):
    sink = _Sink()
    token = counting.activate(sink)
    try:
        counting.declare_spike_counts(None, X, torch.zeros(3, 2, dtype=torch.int64), T)
    finally:
        counting.deactivate(token)
    return sink.T


def _loss(**kw):
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    hs, ht = [torch.randn(2, 3, 4)], [torch.randn(2, 3, 4)]
    settings = {"T": 2, "alpha": 0.25, "beta": 0.75, "gamma": 0.5, "temperature": 2.0, **kw}
    return sbds_loss(s, t, hs, ht, **settings).loss


def _profile(**kw):
    levels = {k: kw.pop(k) for k in ("capacity_bytes", "pj_per_byte") if k in kw}
    level = MemoryLevel("SRAM", **{"capacity_bytes": 1024, "pj_per_byte": 1.25, **levels})
    memory = (level, MemoryLevel("DRAM", None, 160.0))
    profile = HardwareProfile("numbers", **{"ac_pj": 0.9, "mac_pj": 4.5, "memory": memory, **kw})
    data = profile.to_dict()
    json.dumps(data)  # reports write it
    return data


def _student_teacher():
    torch.manual_seed(0)
    config = MARConfig(**SMALL, ffn=None, spikes=SpikeConfig(T=2))  # few points: fast
    student = MARLM(config).eval()
    teacher = MARLM(config.dense()).eval()
    teacher.load_state_dict(student.state_dict(), strict=False)
    return student, teacher


def _calibrated(**target):
    student, teacher = _student_teacher()
    batches = [torch.randint(0, 11, (1, 8), generator=torch.Generator().manual_seed(1))]
    reached = calibrate(student, teacher, batches, **{"max_rows": 16, **target})
    return reached, [s.module.neuron.log_threshold.detach() for s in student.spike_points()]


def _per_point_rate(rate):
    student, _ = _student_teacher()
    return _calibrated(firing_rate={s.name: rate for s in student.spike_points()})


def _measurements() -> Measurements:
    modules = {
        name: [Option(name, "dense", 0.0, 1.0, 0.0)]
        + [Option(name, {"T": k + 1}, 0.1 * (k + 1), 1.0, 10.0 * (k + 1)) for k in range(3)]
        for name in ("a", "b")
    }
    return Measurements(modules, 100.0, 1.0, "45nm-fp32")


def _schedule(**kw):
    settings = {"energy_ratio": 1.2, "seed": 3, **kw}
    return {k: o.setting for k, o in random_schedule(_measurements(), **settings).items()}


def _windows():
    return torch.randint(0, 11, (3, 7), generator=torch.Generator().manual_seed(2))


def _kl_and_loss(batch_size):
    student, teacher = _student_teacher()
    return kl_and_loss(teacher, student, _windows(), batch_size)


def _measured(**kw):
    _, teacher = _student_teacher()
    settings = {"options": ({"T": 2},), "sparsify": (), "energy_windows": 1, **kw}
    return measure(teacher, _windows(), **settings).to_json()


def _generated(**kw):
    """A greedy (temperature 0) or seeded continuation of a fixed prompt, and the model's
    fused C step for ``batch`` sequences."""
    torch.manual_seed(0)
    model = MARLM(MARConfig(**SMALL)).eval()
    settings = {"max_new_tokens": 4, "temperature": 0.0, **kw}
    return model.generate(torch.tensor([1, 2, 3]), generator=torch.Generator().manual_seed(0),
                          **settings)  # fmt: skip


def _fused(batch):
    torch.manual_seed(0)
    model = MARLM(MARConfig(**SMALL)).eval()
    step = FusedStep(model, batch)
    logits, _ = step(torch.arange(batch) % 11, model.init_state(batch, in_place=True))
    return step.batch, logits


def _scan(chunk_size):
    g = torch.Generator().manual_seed(0)
    x, B, C = (torch.randn(1, 6, 2, 3, generator=g, dtype=torch.float64) for _ in range(3))
    a = -torch.rand(1, 6, 2, generator=g, dtype=torch.float64)
    return ssd_scan(x, a, B, C, chunk_size=chunk_size)


def _norm(groups):
    norm = RMSNorm(8, None, groups)
    return norm.groups, norm(X.float().reshape(3, 8))


def _energy(**kw):
    """A report's dict as written to JSON (tokens and parameters are stored in it)."""
    x = torch.ones(2, 4)
    if "tokens" in kw:
        report = profile(demo_network((4, 3)), x, hardware="45nm-fp32+mem", tokens=kw["tokens"])
    else:
        report = EnergyReport.build([], hardware="45nm-fp32+mem", passes=1, **kw)
    data = report.to_dict()
    json.dumps(data)
    return data


def _rates(batch_dims):
    spikes = np.sign(np.sin(np.arange(24.0))).reshape(2, 3, 4)
    rates = firing_rates(spikes, batch_dims=batch_dims)
    return rates.n_samples, rates.rate_pos.tolist(), rates.rate_neg.tolist()


def _raster(boundary_every):
    ax = raster(np.zeros((6, 3)), boundary_every=boundary_every)
    return [[float(x) for x in line.get_xdata()] for line in ax.lines]


def _demo_network(**kw):
    net = demo_network(**{"sizes": (4, 3), **kw})
    return {k: v.detach() for k, v in net.state_dict().items()}


def _lif(**kw):
    neuron = CUBALIF(**{"current_decay": 0.5, "voltage_decay": 0.25, "v_threshold": 0.75, **kw})
    attrs = (neuron.current_decay, neuron.voltage_decay, neuron.v_threshold)
    return attrs, torch.stack([neuron(x) for x in X.float().reshape(4, 2, 3)])


def _nir(dt, tmp_path):
    model = nn.Sequential(nn.Linear(3, 2, bias=False), CUBALIF(0.5, 0.25, 1.0))
    path = tmp_path / f"{type(dt).__name__}.nir"
    graph = export_nir(model, path, (3,), dt=dt)
    dts = [node.metadata["dt"] for node in graph.nodes.values() if "dt" in node.metadata]
    return dts, path.stat().st_size > 0


def _lava(tmp_path, **kw):
    """run_lava up to the file's check (no Lava needed): the arguments before it passed."""
    bogus = tmp_path / "not-netx.h5"
    bogus.write_text("not HDF5")
    try:
        run_lava(bogus, torch.zeros(3, 2), **{"num_steps": 3, "timeout_s": 5.0, **kw})
    except ValueError as err:
        if not str(err).startswith("path:"):
            raise
        return str(err)
    raise AssertionError("run_lava read a file that is not HDF5")


def _point_rates(**kw):
    student, teacher = _student_teacher()
    batches = [torch.randint(0, 11, (1, 8), generator=torch.Generator().manual_seed(1))]
    return point_firing_rates(student, teacher, batches, **{"max_rows": 16, **kw})


def _train(**kw):
    """A training run's settings as its checkpoints save them."""
    return asdict(TrainConfig(**kw))


def _distill(**kw):
    return asdict(DistillConfig(**{"teacher": "teacher.pt", **kw}))


DOCS = [[1, 2, 3, 4, 5, 6], [7, 8, 9]]


@functools.cache
def _lm() -> MARLM:
    """One small model for the scoring rows (a Scorer only reads it)."""
    torch.manual_seed(0)
    return MARLM(MARConfig(**SMALL)).eval()


def _scorer(vocab_size=11, **kw):
    return Scorer(_lm(), vocab_size, **kw)


def _scored(**kw):
    """What a Scorer keeps of its settings, and the scores it gives."""
    scorer = _scorer(**kw)
    scores = scorer.loglikelihood([(d[:2], d[2:]) for d in DOCS])
    return (scorer.vocab_size, scorer.batch_size, scorer.max_length,
            [astuple(score) for score in scores])  # fmt: skip


def _greedy(max_new_tokens):
    decode = lambda ids: "".join("abcdefghijk"[i] for i in ids)  # noqa: E731
    return _scorer().greedy_until(DOCS, decode=decode, max_new_tokens=max_new_tokens)


def _perplexity(window):
    result = text_perplexity(_lm(), CharTokenizer("abcdefghij\n"), "abcabdabeabf", window=window)
    data = result.to_dict()
    json.dumps(data)  # spikemar eval writes it
    return data


class _EndOfText:
    """A tokenizer as end_token reads one: its end-of-text id, and "\n" as token 0."""

    def __init__(self, eos_id):
        self.eos_id = eos_id

    def encode(self, text):
        return [0]


def _word_level():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    return Tokenizer(WordLevel({w: i for i, w in enumerate("abcde")}, unk_token="a"))


def _hf_eos(eos_id):
    tokenizer = HFTokenizer(_word_level(), eos_id)
    return tokenizer.eos_id, tokenizer.to_dict()


def _filtered(**kw):
    logits = torch.linspace(-1.0, 2.0, 12).reshape(2, 6)
    return filter_logits(logits, **{"temperature": 1.0, **kw})


# name, function of the value (and tmp_path), a Python value, the argument the errors name
REAL = [
    ("ATMN tau", lambda v, _: _quantized(ATMN(tau=v, v_threshold=0.5)), 2.0, "tau"),
    ("ATMN v_threshold", lambda v, _: _quantized(ATMN(2.0, v)), 0.75, "v_threshold"),
    ("ATMN per-channel v_threshold",
     lambda v, _: _quantized(ATMN(2.0, v, num_channels=3)), 0.3, "v_threshold"),
    ("TernarySingleStep v_threshold",
     lambda v, _: _quantized(TernarySingleStep(v), T=1), 0.5, "v_threshold"),
    ("ATMNParameters v_threshold",
     lambda v, _: atmn_multi_step(delta_inject(X, 4), None, ATMNParameters(v))[0],
     1.5, "v_threshold"),
    ("ATMNParameters tau",
     lambda v, _: atmn_multi_step(delta_inject(X, 4), None, ATMNParameters(1.0, v))[0],
     1.5, "tau"),
    ("atmn_decode tau",
     lambda v, _: atmn_decode(torch.ones(4, 3), 0.5, v), 1.5, "tau"),
    ("atmn_decode v_threshold",
     lambda v, _: atmn_decode(torch.ones(4, 3), v, 2.0), 0.5, "v_threshold"),
    ("Sigmoid alpha", lambda v, _: (Sigmoid(v).alpha, Sigmoid(v).derivative(X)), 4.0, "alpha"),
    ("ATan alpha", lambda v, _: (ATan(v).alpha, ATan(v).derivative(X)), 2.0, "alpha"),
    ("Rectangle width", lambda v, _: Rectangle(v).derivative(X), 0.5, "width"),
    ("Triangle width", lambda v, _: Triangle(v).primitive(X), 1.5, "width"),
    ("SpikeConfig tau", lambda v, _: SpikeConfig(tau=v).as_dict(), 1.5, "tau"),
    ("SpikeConfig v_threshold",
     lambda v, _: SpikeConfig(v_threshold=v).as_dict(), 0.25, "v_threshold"),
    ("MARConfig ffn_mult", lambda v, _: _config(MARConfig(**SMALL, ffn_mult=v)), 2.5, "ffn_mult"),
    ("MARConfig norm_eps", lambda v, _: _config(MARConfig(**SMALL, norm_eps=v)), 0.5, "norm_eps"),
    ("MARConfig final_norm_eps",
     lambda v, _: _config(MARConfig(**SMALL, final_norm_eps=v)), 0.5, "final_norm_eps"),
    ("MARConfig ffn_sparsity",
     lambda v, _: _config(MARConfig(**SMALL, ffn_sparsity=("topk", v))), 0.25, "ffn_sparsity"),
    ("MARConfig points",
     lambda v, _: _config(MARConfig(**SMALL, points={"layers.0.ffn.*": {"tau": v}})),
     1.5, r"points\[.*\]: tau"),
    ("ActivationSparsifier",
     lambda v, _: ActivationSparsifier("threshold", v)(X), 0.5, "ffn_sparsity"),
    ("sbds_loss alpha", lambda v, _: _loss(alpha=v), 0.5, "alpha"),
    ("sbds_loss gamma", lambda v, _: _loss(gamma=v), 0.25, "gamma"),
    ("sbds_loss temperature", lambda v, _: _loss(temperature=v), 2.0, "temperature"),
    ("kl_divergence temperature",
     lambda v, _: kl_divergence(X, X.flip(0), v), 2.0, "temperature"),
    ("MARConfig dt_limit",
     lambda v, _: _config(MARConfig(**SMALL, dt_limit=(0.0, v))), 0.5, "dt_limit"),
    ("HardwareProfile ac_pj", lambda v, _: _profile(ac_pj=v), 0.75, "ac_pj"),
    ("HardwareProfile value_bytes", lambda v, _: _profile(value_bytes=v), 2.0, "value_bytes"),
    ("MemoryLevel pj_per_byte", lambda v, _: _profile(pj_per_byte=v), 1.25, "pj_per_byte"),
    ("calibrate firing_rate", lambda v, _: _calibrated(firing_rate=v), 0.25, "firing_rate"),
    ("calibrate per-point rates", lambda v, _: _per_point_rate(v), 0.25, r"firing_rate\["),
    ("calibrate quant_error", lambda v, _: _calibrated(quant_error=v), 0.25, "quant_error"),
    ("plan energy_ratio",
     lambda v, _: plan(_measurements(), energy_ratio=v).to_json(), 1.5, "energy_ratio"),
    ("plan max_kl", lambda v, _: plan(_measurements(), max_kl=v).to_json(), 0.25, "max_kl"),
    ("random_schedule energy_ratio", lambda v, _: _schedule(energy_ratio=v), 1.5, "energy_ratio"),
    ("CUBALIF current_decay", lambda v, _: _lif(current_decay=v), 0.75, "current_decay"),
    ("CUBALIF voltage_decay", lambda v, _: _lif(voltage_decay=v), 0.5, "voltage_decay"),
    ("CUBALIF v_threshold", lambda v, _: _lif(v_threshold=v), 0.5, "v_threshold"),
    ("export_nir dt", _nir, 0.5, "dt"),
    ("run_lava timeout_s", lambda v, tmp: _lava(tmp, timeout_s=v), 2.0, "timeout_s"),
    ("generate temperature",
     lambda v, _: _generated(temperature=v), 0.5, "temperature"),
    ("generate top_p",
     lambda v, _: _generated(temperature=1.0, top_p=v), 0.5, "top_p"),
    ("TransformerConfig ffn_mult",
     lambda v, _: vars(TransformerConfig(ffn_mult=v)), 2.5, "ffn_mult"),
    ("TransformerConfig dropout",
     lambda v, _: vars(TransformerConfig(dropout=v)), 0.25, "dropout"),
    ("demo_network threshold_ratio",
     lambda v, _: _demo_network(threshold_ratio=v), 0.5, "threshold_ratio"),
    ("TrainConfig lr", lambda v, _: _train(lr=v), 0.5, "lr"),
    ("TrainConfig min_lr", lambda v, _: _train(lr=1.0, min_lr=v), 0.25, "min_lr"),
    ("TrainConfig weight_decay", lambda v, _: _train(weight_decay=v), 0.25, "weight_decay"),
    ("TrainConfig grad_clip", lambda v, _: _train(grad_clip=v), 2.0, "grad_clip"),
    ("DistillConfig alpha", lambda v, _: _distill(alpha=v), 0.25, "alpha"),
    ("DistillConfig beta", lambda v, _: _distill(beta=v), 0.5, "beta"),
    ("DistillConfig gamma", lambda v, _: _distill(gamma=v), 2.0, "gamma"),
    ("DistillConfig ce", lambda v, _: _distill(ce=v), 0.5, "ce"),
    ("DistillConfig temperature", lambda v, _: _distill(temperature=v), 2.0, "temperature"),
    ("filter_logits temperature",
     lambda v, _: _filtered(temperature=v), 0.5, "temperature"),
    ("filter_logits top_p", lambda v, _: _filtered(top_p=v), 0.5, "top_p"),
]  # fmt: skip

INTEGER = [
    ("ATMN.quantize T", lambda v, _: _quantized(ATMN(2.0, 0.5), T=v), 4, "T"),
    ("atmn_quantize T",
     lambda v, _: atmn_quantize(X, v, ATMNParameters(0.5, 2.0)), 3, "T"),
    ("ATMN num_channels",
     lambda v, _: _quantized(ATMN(2.0, 0.5, num_channels=v)), 3, "num_channels"),
    ("SpikeConfig T", lambda v, _: SpikeConfig(T=v).as_dict(), 3, "T"),
    ("SpikePoint from SpikeConfig T",
     lambda v, _: SpikePoint(3, SpikeConfig(T=v))(X.float()).detach(), 3, "T"),
    ("MARConfig d_model",
     lambda v, _: _config(MARConfig(**{**SMALL, "d_model": v})), 24, "d_model"),
    ("MARConfig d_conv", lambda v, _: _config(MARConfig(**SMALL, d_conv=v)), 3, "d_conv"),
    ("MARConfig ffn_hidden",
     lambda v, _: _config(MARConfig(**SMALL, ffn_hidden=v)), 20, "ffn_hidden"),
    ("MARConfig chunk_size",
     lambda v, _: _config(MARConfig(**SMALL, chunk_size=v)), 8, "chunk_size"),
    ("MARConfig max_len",
     lambda v, _: _config(MARConfig(**SMALL, layers="attn", max_len=v)), 64, "max_len"),
    ("MARConfig points T",
     lambda v, _: _config(MARConfig(**SMALL, points={"layers.0.ffn.*": {"T": v}})),
     2, r"points\[.*\]: T"),
    ("MARLM.init_state batch",
     lambda v, _: len(MARLM(MARConfig(**SMALL)).init_state(v)), 2, "batch"),
    ("declare_spike_counts T", lambda v, _: _declared_T(v), 3, "T"),
    ("sbds_loss T", lambda v, _: _loss(T=v), 4, "T"),
    ("MemoryLevel capacity_bytes",
     lambda v, _: _profile(capacity_bytes=v), 2048, "capacity_bytes"),
    ("random_schedule seed", lambda v, _: _schedule(seed=v), 7, None),
    ("run_lava num_steps", lambda v, tmp: _lava(tmp, num_steps=v), 2, "num_steps"),
    ("calibrate max_rows",
     lambda v, _: _calibrated(firing_rate=0.25, max_rows=v), 12, "max_rows"),
    ("random_schedule tries", lambda v, _: _schedule(tries=v), 5, "tries"),
    ("kl_and_loss batch_size", lambda v, _: _kl_and_loss(v), 2, "batch_size"),
    ("measure batch_size", lambda v, _: _measured(batch_size=v), 2, "batch_size"),
    ("measure energy_windows", lambda v, _: _measured(energy_windows=v), 2, "energy_windows"),
    ("generate max_new_tokens",
     lambda v, _: _generated(max_new_tokens=v), 3, "max_new_tokens"),
    ("generate top_k", lambda v, _: _generated(temperature=1.0, top_k=v), 3, "top_k"),
    ("TransformerConfig d_model",
     lambda v, _: vars(TransformerConfig(d_model=v)), 16, "d_model"),
    ("TransformerConfig n_heads",
     lambda v, _: vars(TransformerConfig(n_heads=v)), 2, "n_heads"),
    ("FusedStep batch", lambda v, _: _fused(v), 2, "batch"),
    ("ssd_scan chunk_size", lambda v, _: _scan(v), 4, "chunk_size"),
    ("RMSNorm groups", lambda v, _: _norm(v), 2, "groups"),
    ("EnergyReport tokens", lambda v, _: _energy(tokens=v), 2, "tokens"),
    ("EnergyReport parameters", lambda v, _: _energy(parameters=v), 40, "parameters"),
    ("demo_model d", lambda v, _: _config(demo_model(v, 1, 2).config), 16, "d"),
    ("demo_model layers", lambda v, _: _config(demo_model(16, v, 2).config), 2, "layers"),
    ("demo_model T", lambda v, _: _config(demo_model(16, 1, v).config), 3, "T"),
    ("firing_rates batch_dims", lambda v, _: _rates(v), 1, "batch_dims"),
    ("raster boundary_every", lambda v, _: _raster(v), 2, "boundary_every"),
    ("demo_network sizes", lambda v, _: _demo_network(sizes=(4, v)), 3, "sizes"),
    ("calibrate seed", lambda v, _: _calibrated(firing_rate=0.25, seed=v), 3, "seed"),
    ("refine firing_rates max_rows", lambda v, _: _point_rates(max_rows=v), 12, "max_rows"),
    ("refine firing_rates seed", lambda v, _: _point_rates(seed=v), 3, "seed"),
    ("TrainConfig steps", lambda v, _: _train(steps=v), 10, "steps"),
    ("TrainConfig batch_size", lambda v, _: _train(batch_size=v), 4, "batch_size"),
    ("TrainConfig L", lambda v, _: _train(L=v), 16, "L"),
    ("TrainConfig eval_interval", lambda v, _: _train(eval_interval=v), 5, "eval_interval"),
    ("TrainConfig eval_iters", lambda v, _: _train(eval_iters=v), 2, "eval_iters"),
    ("TrainConfig warmup", lambda v, _: _train(warmup=v), 5, "warmup"),
    ("TrainConfig seed", lambda v, _: _train(seed=v), 7, "seed"),
    ("TrainConfig schedule_steps",
     lambda v, _: _train(schedule_steps=v), 20, "schedule_steps"),
    ("DistillConfig stage", lambda v, _: _distill(stage=v), 1, "stage"),
    ("DistillConfig align_steps",
     lambda v, _: _distill(stage=1, steps=12, align_steps=v), 3, "align_steps"),
    ("Scorer vocab_size", lambda v, _: _scored(vocab_size=v), 11, "vocab_size"),
    ("Scorer batch_size", lambda v, _: _scored(batch_size=v), 1, "batch_size"),
    ("Scorer max_length", lambda v, _: _scored(max_length=v), 4, "max_length"),
    ("Scorer.token_logprobs window",
     lambda v, _: _scorer().token_logprobs(DOCS, 0, window=v), 2, "window"),
    ("Scorer.greedy_until max_new_tokens", lambda v, _: _greedy(v), 3, "max_new_tokens"),
    ("text_perplexity window", lambda v, _: _perplexity(v), 4, "window"),
    ("end_token eos_id", lambda v, _: end_token(_EndOfText(v)), 3, None),
    ("HFTokenizer eos_id", lambda v, _: _hf_eos(v), 3, "eos_id"),
    ("check_input_shape features", lambda v, _: check_input_shape((v,)), 3, "input_shape"),
    ("check_input_shape channels, height, width",
     lambda v, _: check_input_shape([2, v, 4]), 3, "input_shape"),
    ("filter_logits top_k", lambda v, _: _filtered(top_k=v), 3, "top_k"),
]  # fmt: skip

FLOAT_TYPES = (np.float32, np.float64)
INT_TYPES = (np.int64, np.int32)


def _cases(table, types, extra=()):
    return [
        pytest.param(fn, t(value), id=f"{name}-{t.__name__}")
        for name, fn, value, _ in table
        for t in types + tuple(x for x in extra if float(value).is_integer())
    ]


@pytest.mark.parametrize(("fn", "value"), _cases(REAL, FLOAT_TYPES, INT_TYPES))
def test_a_numpy_real_acts_as_the_python_number(fn, value, tmp_path):
    assert value.item() == value  # the sample values are exact in float32
    assert _same(fn(value, tmp_path), fn(value.item(), tmp_path))


@pytest.mark.parametrize(("fn", "value"), _cases(INTEGER, INT_TYPES))
def test_a_numpy_integer_acts_as_the_python_int(fn, value, tmp_path):
    assert _same(fn(value, tmp_path), fn(value.item(), tmp_path))


BAD = [True, np.bool_(True), math.nan, "2", torch.tensor([2.0])]
# where a threshold may be a tensor, a 1-element one is a per-channel threshold, not a bad value
# (SpikeConfig keeps a tensor for the neuron to check when the model is built)
# boundaries that take a tensor on a path of their own (a threshold per channel; a temperature
# that divides as it is, as these took one before): a tensor there is no bad number
TENSOR_PATH = {"ATMN v_threshold", "TernarySingleStep v_threshold", "ATMNParameters v_threshold",
               "atmn_decode v_threshold", "SpikeConfig v_threshold", "kl_divergence temperature",
               "generate temperature", "filter_logits temperature"}  # fmt: skip


@pytest.mark.parametrize(
    ("fn", "bad", "name"),
    [
        pytest.param(fn, bad, name, id=f"{label}-{bad!r}")
        for label, fn, _, name in REAL
        for bad in BAD
        if not (label in TENSOR_PATH and isinstance(bad, torch.Tensor))
    ],
)
def test_a_bad_real_is_refused_naming_the_argument(fn, bad, name, tmp_path):
    with pytest.raises((ValueError, TypeError), match=name) as err:
        fn(bad, tmp_path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("fn", "bad", "name"),
    [
        pytest.param(fn, bad, name, id=f"{label}-{bad!r}")
        for label, fn, _, name in INTEGER
        # a seed takes what random.Random takes; end_token passes over what is no id
        if name is not None
        for bad in [*BAD, 2.0, np.float64(2.0)]
    ],
)
def test_a_bad_integer_is_refused_naming_the_argument(fn, bad, name, tmp_path):
    with pytest.raises((ValueError, TypeError), match=name) as err:
        fn(bad, tmp_path)
    assert "\n" not in str(err.value)


def test_the_rule_itself():
    assert real(np.float32(0.5)) == 0.5 and type(real(np.float32(0.5))) is float
    assert type(real(np.int64(3))) is float and real(Fraction(1, 4)) == 0.25
    assert real(10**400) == math.inf and real(-(10**400)) == -math.inf
    assert integer(np.uint8(7)) == 7 and type(integer(np.int32(7))) is int
    assert number(np.int64(2)) == 2 and type(number(np.int64(2))) is int
    assert type(number(np.float64(2.0))) is float and type(number(3)) is int
    for bad in (True, np.bool_(False), "2", None, torch.tensor(2.0), np.array(2.0), 1j):
        assert real(bad) is None and integer(bad) is None and number(bad) is None
    assert integer(2.0) is None and integer(np.float64(2.0)) is None
    assert plain("channel") == "channel" and type(plain(np.float32(0.5))) is float


def test_a_config_of_numpy_scalars_saves_and_loads_as_plain_data(tmp_path):
    """The checkpoint spikemar writes loads with weights_only=True (which refuses NumPy
    scalars) and rebuilds the same model: the config holds Python numbers only."""
    spikes = SpikeConfig(T=np.int64(3), tau=np.float32(1.5), v_threshold=np.float64(0.25))
    config = MARConfig(
        **{**SMALL, "d_model": np.int64(16), "n_layers": np.int32(1)},
        spikes=spikes,
        ffn_mult=np.float32(2.5),
        norm_eps=np.float32(0.5),
        ffn_sparsity=("topk", np.float32(0.5)),
        points={"layers.0.ffn.*": {"T": np.int64(2), "v_threshold": np.float32(0.5)}},
    )
    model = MARLM(config)
    plain_config = json.loads(json.dumps(model_config_dict(model)))  # JSON as it is
    assert plain_config["spikes"] == {"T": 3, "tau": 1.5, "v_threshold": 0.25,
                                      "threshold": "channel", "neuron": "atmn",
                                      "backend": "auto"}  # fmt: skip
    path = save_checkpoint(tmp_path / "numpy.pt", model, CharTokenizer("abcdefghijk"))
    payload = torch.load(path, weights_only=True)
    assert json.loads(json.dumps(payload["model_config"])) == plain_config
    loaded, _, _ = load_checkpoint(path)
    assert _same(model_config_dict(loaded), model_config_dict(model))
    tokens = torch.randint(0, 11, (1, 6))
    with torch.no_grad():
        assert torch.equal(loaded(tokens), model.eval()(tokens))


def test_a_run_config_of_numpy_scalars_saves_and_loads_as_plain_data(tmp_path):
    """A training or distillation run's settings, saved in each of its checkpoints, load with
    weights_only=True when they were given as NumPy values, the model's overrides too."""
    numpy_model = {"d_model": np.int64(16), "dt_limit": (0.0, np.float32(0.5)),
                   "spikes": {"T": np.int32(2), "tau": np.float32(1.5)}}  # fmt: skip
    python_model = {"d_model": 16, "dt_limit": (0.0, 0.5), "spikes": {"T": 2, "tau": 1.5}}
    train = TrainConfig(steps=np.int64(10), lr=np.float32(0.5), warmup=np.int32(2),
                        seed=np.int64(3), model_config=numpy_model)  # fmt: skip
    distill = DistillConfig(teacher="teacher.pt", stage=np.int64(1), align_steps=np.int64(2),
                            steps=np.int32(8), alpha=np.float64(0.25),
                            student_config={"d_model": np.int64(16)})  # fmt: skip
    assert _same(asdict(train), _train(steps=10, lr=0.5, warmup=2, seed=3,
                                       model_config=python_model))  # fmt: skip
    assert _same(asdict(distill), _distill(stage=1, align_steps=2, steps=8, alpha=0.25,
                                           student_config={"d_model": 16}))  # fmt: skip
    tokenizer = HFTokenizer(_word_level(), np.int64(3))  # its end-of-text id is saved too
    state = {"config": asdict(train), "distill": asdict(distill)}
    path = save_checkpoint(tmp_path / "run.pt", MARLM(MARConfig(**SMALL)), tokenizer, state)
    payload = torch.load(path, weights_only=True)
    assert _same(payload["train"], state) and payload["tokenizer"]["eos_id"] == 3


def test_calibration_hands_its_counts_on_as_python_ints(monkeypatch):
    """max_rows and seed reach the sampling as Python ints (torch's generator refuses
    NumPy's seed)."""
    calibration = importlib.import_module("spikemar.refine.calibrate")
    seen = []

    def spy(sample):
        def sampling(*args, **kw):
            seen.append((sample.__name__, type(kw["max_rows"]), type(kw["seed"])))
            return sample(*args, **kw)

        return sampling

    for name in ("point_samples", "calibrate_thresholds"):  # what calibration samples through
        monkeypatch.setattr(calibration, name, spy(getattr(calibration, name)))
    _calibrated(firing_rate=0.25, max_rows=np.int64(12), seed=np.int32(1))
    _calibrated(quant_error=0.25, max_rows=np.int32(12))
    _point_rates(max_rows=np.int64(12), seed=np.int64(1))
    assert seen == [("calibrate_thresholds", int, int), ("point_samples", int, int),
                    ("point_samples", int, int)]  # fmt: skip


def test_filter_logits_checks_what_generate_checks():
    """filter_logits, public, refuses what would divide by zero or index past its input,
    with generate's messages (one check); generate itself still takes temperature 0."""
    with pytest.raises(ValueError, match=r"^temperature: expected > 0, got 0$"):
        _filtered(temperature=0)
    with pytest.raises(ValueError, match=r"^top_k: expected an int >= 1 or None, got 0$"):
        _filtered(top_k=0)
    with pytest.raises(ValueError, match=r"^top_p: expected a number in \(0, 1\] or None"):
        _filtered(top_p=1.5)
    for logits, what in [(torch.tensor(1.0), r"\(\) torch.float32"),
                         (torch.zeros(2, 6, dtype=torch.cfloat), r"\(2, 6\) torch.complex64"),
                         ([[0.0, 1.0]], "list")]:  # fmt: skip
        with pytest.raises(ValueError, match=rf"^logits: expected .*\[\.\.\., vocab\], got {what}"):
            filter_logits(logits)
    assert _same(_generated(temperature=np.float32(0.0)), _generated(temperature=0.0))
    with pytest.raises(ValueError, match=r"^temperature: expected >= 0, got -1$"):
        _generated(temperature=-1)


def test_a_bool_is_no_end_of_text_id(tmp_path):
    """A JSON ``true`` as a directory's eos_token_id, or a tokenizer whose eos_id is a bool,
    names no token: the tokenizer has none (it was token 1), end_token falls back to "\\n"."""
    _word_level().save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": True}))
    assert HFTokenizer.from_directory(tmp_path).eos_id is None
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": np.int64(3).item()}))
    assert HFTokenizer.from_directory(tmp_path).eos_id == 3
    assert end_token(_EndOfText(True)) == 0 and end_token(_EndOfText(np.int64(3))) == 3
