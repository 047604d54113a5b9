"""Module-aware refinement (issue 16): per-spike-point configs, calibration, measure, plan, CLI."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spikemar import energy
from spikemar.checkpoint import load_checkpoint, save_checkpoint
from spikemar.data import CharTokenizer
from spikemar.hardware import chip_report
from spikemar.models import MARLM, ActivationSparsifier, MARConfig, SpikeConfig, SpikePoint
from spikemar.refine import (
    Measurements,
    Option,
    build_student,
    calibrate,
    firing_rates,
    measure,
    pareto_plot,
    plan,
    point_samples,
    quantisation_error,
    random_schedule,
    replaceable_layers,
    schedule_kl,
    uniform_schedules,
)

SMALL = dict(vocab_size=11, d_model=16, n_layers=2, d_state=4, head_dim=8)


def _points_model(**extra) -> MARLM:
    points = {
        "layers.*.ffn.spike_hidden": "dense",
        "layers.0.mixer.spike_in": {"T": 2, "tau": 2.0, "v_threshold": 0.25},
        "layers.1.ffn.spike_in": {"sparsify": "topk", "amount": 0.5},
        "layers.1.mixer.spike_out": "spike",
    }
    config = MARConfig(**SMALL, spikes=SpikeConfig(T=3), spiking=[True, False], points=points)
    torch.manual_seed(0)
    return MARLM(config).eval()


def _kinds(model: MARLM) -> dict[str, object]:
    out = {}
    for site in model.spike_points(include_dense=True):
        m = site.module
        out[site.name] = (m.T, m.neuron.tau) if isinstance(m, SpikePoint) else type(m).__name__
    return out


def test_points_override_layer_settings():
    model = _points_model()
    assert _kinds(model) == {
        "layers.0.mixer.spike_in": (2, 2.0),
        "layers.0.mixer.spike_out": (3, 1.0),
        "layers.0.ffn.spike_in": (3, 1.0),
        "layers.0.ffn.spike_hidden": "Identity",
        "layers.1.mixer.spike_in": "Identity",  # a dense layer keeps its other points dense
        "layers.1.mixer.spike_out": (3, 1.0),  # ... but a point can spike in it
        "layers.1.ffn.spike_in": "ActivationSparsifier",
        "layers.1.ffn.spike_hidden": "Identity",
    }
    a = model.layers[0].mixer.spike_in.neuron.log_threshold
    assert a.shape == (16,) and torch.allclose(a.exp(), torch.full((16,), 0.25))
    # a point in a dense layer gets the width of the projection it feeds (expand · d_model)
    assert model.layers[1].mixer.spike_out.neuron.log_threshold.shape == (32,)


def test_points_none_and_dense_twin_keep_their_meaning():
    plain = MARConfig(**SMALL)
    assert plain.points is None
    torch.manual_seed(0)
    a = MARLM(plain)
    torch.manual_seed(0)
    b = MARLM(MARConfig(**SMALL, points={}))
    assert _kinds(a) == _kinds(b)
    for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y)
    dense = _points_model().config.dense()
    assert dense.points is None and dense.spikes is None
    assert not list(MARLM(dense).spike_points())


def test_points_checkpoint_round_trip(tmp_path):
    model = _points_model()
    with torch.no_grad():
        model.layers[0].mixer.spike_in.neuron.log_threshold.add_(0.1)
    path = save_checkpoint(tmp_path / "m.pt", model, CharTokenizer("abcdefghijk"))
    loaded, _, _ = load_checkpoint(path)
    assert loaded.config.points == model.config.points
    assert _kinds(loaded) == _kinds(model)
    tokens = torch.randint(0, 11, (2, 9))
    assert torch.equal(loaded(tokens), model(tokens))


def test_points_bad_settings_are_named():
    with pytest.raises(ValueError, match=r"points\['x'\]: 'topk' keeps"):
        MARConfig(**SMALL, points={"x": {"sparsify": "topk", "amount": 2.0}})
    with pytest.raises(ValueError, match=r"points\['x'\]: unknown spike fields \['V'\]"):
        MARConfig(**SMALL, points={"x": {"V": 1.0}})
    with pytest.raises(ValueError, match=r"points\['x'\]: expected 'dense', 'spike'"):
        MARConfig(**SMALL, points={"x": "fast"})
    with pytest.raises(ValueError, match=r"points\['x'\]: T: expected an int >= 1"):
        MARConfig(**SMALL, points={"x": {"T": 0}})
    with pytest.raises(ValueError, match=r"points: patterns \['layers.9.\*'\] match no"):
        MARLM(MARConfig(**SMALL, points={"layers.9.*": "dense"}))


def test_energy_counter_reads_points():
    """Projections fed by spiking points count ACs (Σ nnz over that point's own T), those fed
    by dense or sparsified points count MACs, and the sparsifier's own work is counted."""
    model = _points_model()
    tokens = torch.randint(0, 11, (2, 8))
    report = energy.profile(model, tokens, hardware="45nm-fp32")
    rows = {r.name: r for r in report.rows}
    sp = model.layers[0].mixer.spike_in
    sp.record = True
    try:
        with torch.no_grad():
            model(tokens)
        nnz = int((sp.spikes != 0).sum())
        assert sp.spikes.shape[0] == 2  # its own T
    finally:
        sp.record, sp.spikes = False, None
    proj = model.layers[0].mixer.in_proj
    assert rows["layers.0.mixer.in_proj"].acs == nnz * proj.out_features
    assert rows["layers.0.mixer.in_proj"].macs == 0
    assert rows["layers.0.ffn.down"].acs == 0 and rows["layers.0.ffn.down"].macs > 0
    assert rows["layers.1.ffn.up"].acs == 0 and rows["layers.1.ffn.up"].macs > 0
    assert rows["layers.1.mixer.out_proj"].acs > 0 and rows["layers.1.mixer.out_proj"].macs == 0
    assert rows["layers.1.ffn.spike_in"].elementwise_ops == 2 * 2 * 8 * 16
    assert not report.uncounted


def test_chip_report_reads_points():
    entries = {e.path: e for e in chip_report(_points_model()).entries}
    assert entries["layers.0.mixer.spike_in"].on_chip
    assert entries["layers.0.mixer.in_proj"].on_chip
    assert not entries["layers.0.ffn.down"].on_chip
    assert entries["layers.1.mixer.out_proj"].on_chip
    assert not entries["layers.1.mixer.in_proj"].on_chip
    assert not entries["layers.1.ffn.spike_in"].on_chip
    assert isinstance(_points_model().layers[1].ffn.spike_in, ActivationSparsifier)


# -- calibration ---------------------------------------------------------------------------


def _student_teacher(T: int = 4, n_layers: int = 1, seed: int = 0):
    torch.manual_seed(seed)
    config = MARConfig(**{**SMALL, "n_layers": n_layers}, spikes=SpikeConfig(T=T))
    student = MARLM(config).eval()
    teacher = MARLM(config.dense()).eval()
    teacher.load_state_dict(student.state_dict(), strict=False)
    return student, teacher


@pytest.mark.parametrize("rate", [0.05, 0.2])
def test_calibrate_hits_firing_rate(rate):
    student, teacher = _student_teacher(T=4, seed=3)
    batches = [torch.randint(0, 11, (4, 24)) for _ in range(2)]
    reached = calibrate(student, teacher, batches, firing_rate=rate)
    assert set(reached) == {s.name for s in student.spike_points()}
    samples = point_samples(student, teacher, batches)
    for site in student.spike_points():  # the student's own spikes on the samples
        sp = site.module
        _, spikes = sp.neuron.quantize(samples[site.name], sp.T)
        assert abs(float((spikes != 0).float().mean()) - rate) < 0.02, site.name


def test_calibrate_per_point_rates_keep_each_points_rate():
    """A rate per point (``spikemar refine``'s planned rates): each point reaches its own rate,
    per channel, and a point's spike count (so its ACs) stays where its scalar V had it."""
    student, teacher = _student_teacher(T=4, n_layers=2, seed=5)
    batches = [torch.randint(0, 11, (4, 24)) for _ in range(2)]
    with torch.no_grad():
        for k, site in enumerate(student.spike_points()):
            site.module.neuron.log_threshold.fill_(-1.5 + 0.3 * k)
    before = firing_rates(student, teacher, batches)
    assert len(set(before.values())) > 1  # the points differ
    reached = calibrate(student, teacher, batches, firing_rate=before)
    after = firing_rates(student, teacher, batches)
    samples = point_samples(student, teacher, batches)
    for site in student.spike_points():
        assert reached[site.name] == pytest.approx(after[site.name])
        assert abs(after[site.name] - before[site.name]) < 0.02, site.name
        _, spikes = site.module.neuron.quantize(samples[site.name], site.module.T)
        per_channel = (spikes != 0).float().mean(dim=(0, 1))
        live = samples[site.name].abs().amax(0) > 0
        assert float((per_channel[live] - before[site.name]).abs().max()) < 0.05, site.name
    names = list(before)
    with pytest.raises(ValueError, match=r"firing_rate: expected a rate for each spike point"):
        calibrate(student, teacher, batches, firing_rate={names[0]: 0.1})
    with pytest.raises(ValueError, match=r"firing_rate\['.*'\]: expected a fraction in \[0, 1\]"):
        calibrate(student, teacher, batches, firing_rate={**before, names[0]: 1.5})


def test_calibrate_quantisation_error_largest_threshold_within_target():
    student, teacher = _student_teacher(T=8, seed=1)
    batches = [torch.randint(0, 11, (4, 24)) for _ in range(2)]
    target = 0.1
    calibrate(student, teacher, batches, quant_error=target)
    samples = point_samples(student, teacher, batches)
    met = 0
    for site in student.spike_points():
        a = site.module.neuron.log_threshold.detach()
        err = quantisation_error(samples[site.name], site.module, a[None])[0]
        larger = quantisation_error(samples[site.name], site.module, a[None] + 0.05)[0]
        # within the target, or the channel cannot reach it (least error); either way a 5 %
        # larger V misses the target: the threshold is the largest that meets it
        assert bool((larger > target).all()), site.name
        met += int((err <= target + 1e-4).sum())
    assert met > 0


def test_calibrate_arguments():
    student, teacher = _student_teacher()
    batches = [torch.randint(0, 11, (2, 8))]
    with pytest.raises(ValueError, match="exactly one calibration target"):
        calibrate(student, teacher, batches)
    with pytest.raises(ValueError, match="quant_error: expected a relative error in"):
        calibrate(student, teacher, batches, quant_error=1.5)
    with pytest.raises(ValueError, match="batches: expected at least one batch"):
        calibrate(student, teacher, [], quant_error=0.1)


# -- measure and plan ------------------------------------------------------------------------

costs = st.floats(0, 10, allow_nan=False, allow_infinity=False)


@st.composite
def tables(draw):
    n_modules = draw(st.integers(1, 4))
    modules = {}
    for m in range(n_modules):
        name = f"m{m}"
        options = [Option(name, "dense", 0.0, 1.0, 0.0)]
        for k in range(draw(st.integers(0, 3))):
            options.append(Option(name, {"T": k + 1}, draw(costs), 1.0, draw(costs)))
        modules[name] = options
    return Measurements(modules, draw(st.floats(1, 50)), 1.0, "45nm-fp32")


def _brute(m: Measurements):
    return [
        (sum(o.kl for o in combo), sum(o.energy_saved_pj for o in combo))
        for combo in itertools.product(*m.modules.values())
    ]


@given(tables(), st.floats(1.0, 5.0))
@settings(max_examples=200, deadline=None)
def test_plan_energy_budget_equals_brute_force(m, ratio):
    need = m.teacher_energy_pj * (1 - 1 / ratio)
    feasible = [kl for kl, saved in _brute(m) if saved >= need - 1e-9 * need]
    if not feasible:
        with pytest.raises(ValueError, match="out of reach"):
            plan(m, energy_ratio=ratio)
        return
    p = plan(m, energy_ratio=ratio)
    assert p.exact and p.predicted_kl == pytest.approx(min(feasible), abs=1e-9)
    assert sum(o.energy_saved_pj for o in p.choice.values()) >= need - 1e-9 * need
    assert p.predicted_kl == pytest.approx(sum(o.kl for o in p.choice.values()))


@given(tables(), costs)
@settings(max_examples=200, deadline=None)
def test_plan_kl_budget_equals_brute_force(m, max_kl):
    best = max(saved for kl, saved in _brute(m) if kl <= max_kl)
    p = plan(m, max_kl=max_kl)
    assert p.predicted_kl <= max_kl
    assert p.energy_saved_pj == pytest.approx(best, abs=1e-9)
    assert set(p.points) == set(m.modules)


@given(tables(), st.floats(1.0, 8.0), st.integers(0, 5))
@settings(max_examples=100, deadline=None)
def test_random_schedule_reaches_the_ratio(m, ratio, seed):
    need = m.teacher_energy_pj * (1 - 1 / ratio)
    most = sum(max(o.energy_saved_pj for o in opts) for opts in m.modules.values())
    if most < need - 1e-9 * need:
        with pytest.raises(ValueError, match="out of reach"):
            random_schedule(m, ratio, seed=seed, tries=5)
        return
    pick = random_schedule(m, ratio, seed=seed, tries=5)
    assert set(pick) == set(m.modules)
    assert all(o in m.modules[n] for n, o in pick.items())
    assert sum(o.energy_saved_pj for o in pick.values()) >= need - 1e-9 * need
    assert pick == random_schedule(m, ratio, seed=seed, tries=5)  # seeded


def test_plan_arguments():
    m = Measurements({"a": [Option("a", "dense", 0.0, 1.0, 0.0)]}, 10.0, 1.0, "45nm-fp32")
    with pytest.raises(ValueError, match="exactly one budget"):
        plan(m)
    with pytest.raises(ValueError, match=r"energy_ratio: 2 is out of reach; .* at most 1x"):
        plan(m, energy_ratio=2)
    with pytest.raises(ValueError, match="energy_ratio: expected a number >= 1"):
        plan(m, energy_ratio=0.5)


def test_measure_and_plan_on_a_model(tmp_path):
    torch.manual_seed(0)
    teacher = MARLM(MARConfig(**{**SMALL, "n_layers": 1}, spikes=None)).eval()
    windows = torch.randint(0, 11, (3, 9))
    options = ({"T": 4, "v_threshold": 0.5},)
    m = measure(teacher, windows, options=options, sparsify=(), energy_windows=1)
    assert list(m.modules) == [s.name for s in teacher.spike_points(include_dense=True)]
    for name, opts in m.modules.items():
        dense, spiking = opts
        assert dense.setting == "dense" and dense.kl == 0 and dense.energy_saved_pj == 0
        assert spiking.kl >= 0 and spiking.energy_saved_pj > 0  # ACs instead of MACs
        # the table's number is the student's own KL
        kl, loss = schedule_kl(teacher, {name: spiking.setting}, windows)
        assert kl == pytest.approx(spiking.kl) and loss == pytest.approx(spiking.loss)
    # a schedule's energy is the teacher's minus the summed savings (additive per point)
    p = plan(m, energy_ratio=1.2)
    student = build_student(teacher, p.points)
    report = energy.profile(student, windows[:1, :-1], hardware="45nm-fp32")
    e = report.total_energy_pj / report.tokens
    assert e == pytest.approx(m.teacher_energy_pj - p.energy_saved_pj, rel=1e-6)
    loaded = Measurements.load(m.save(tmp_path / "m.json"))
    assert loaded.to_json() == m.to_json()
    png = pareto_plot(m, [p], tmp_path / "pareto.png", measured={"plan": (p.energy_ratio, 0.1)})
    assert png.stat().st_size > 1000


def test_sparsified_points_offered_and_picked_under_zero_skipping():
    """Dense hardware multiplies a sparsifier's zeros: measure does not offer it there. A
    zero-skipping profile prices it, and the planner takes it where it is the cheapest way to
    save energy (here the only one: no spike option is measured)."""
    torch.manual_seed(0)
    teacher = MARLM(MARConfig(**{**SMALL, "n_layers": 1}, spikes=None)).eval()
    windows = torch.randint(0, 11, (2, 13))
    topk = ({"sparsify": "topk", "amount": 0.25},)
    dense_hw = measure(teacher, windows, options=(), sparsify=topk, energy_windows=1)
    assert all(len(opts) == 1 for opts in dense_hw.modules.values())  # 'dense' only
    assert dense_hw.info["zero_skipping"] is False
    m = measure(teacher, windows, options=(), sparsify=topk, energy_windows=1,
                hardware="45nm-fp32+zs")  # fmt: skip
    ffn = [n for n in m.modules if ".ffn." in n]
    assert ffn and all(len(m.modules[n]) == 2 for n in ffn)
    assert all(len(m.modules[n]) == 1 for n in m.modules if n not in ffn)
    for n in ffn:
        assert m.modules[n][1].setting == topk[0] and m.modules[n][1].energy_saved_pj > 0
    p = plan(m, max_kl=1e9)
    assert all(p.points[n] == topk[0] for n in ffn)
    # its saving is the counted one: the planned student under the same profile
    report = energy.profile(build_student(teacher, p.points), windows[:1, :-1],
                            hardware="45nm-fp32+zs")  # fmt: skip
    counted = m.teacher_energy_pj - report.total_energy_pj / report.tokens
    assert counted == pytest.approx(p.energy_saved_pj, rel=1e-6)
    # with a spike option beside it, the choice at each point is the table's best (brute force)
    both = measure(teacher, windows, options=({"T": 4, "v_threshold": 0.5},), sparsify=topk,
                   energy_windows=1, hardware="45nm-fp32+zs")  # fmt: skip
    ratio = 1.05
    need = both.teacher_energy_pj * (1 - 1 / ratio)
    best = min((sum(o.kl for o in c), c) for c in itertools.product(*both.modules.values())
               if sum(o.energy_saved_pj for o in c) >= need)  # fmt: skip
    assert plan(both, energy_ratio=ratio).predicted_kl == pytest.approx(best[0])


def _hybrid_and_stage1(vocab_size: int = SMALL["vocab_size"]):
    """A tiny teacher with an attention layer and SSM layers, and a stage-1 student: the same
    architecture with that layer's mixer an SSM (its other tensors copied from the teacher)."""
    torch.manual_seed(2)
    kinds = ["ssm", "attn", "ssm"]
    size = {**SMALL, "n_layers": 3, "vocab_size": vocab_size}
    teacher = MARLM(MARConfig(**size, layers=kinds, spikes=None)).eval()
    stage1 = MARLM(MARConfig(**size, layers=["ssm"] * 3, spikes=None))
    ours = stage1.state_dict()
    ours.update({k: v for k, v in teacher.state_dict().items()
                 if k in ours and v.shape == ours[k].shape and ".mixer." not in k})  # fmt: skip
    ours.update({k: v for k, v in teacher.state_dict().items() if not k.startswith("layers.1.")})
    stage1.load_state_dict(ours)
    return teacher, stage1.eval()


def test_measure_offers_attention_to_ssm_with_a_stage1_student():
    teacher, stage1 = _hybrid_and_stage1()
    assert replaceable_layers(teacher, stage1) == {1: "ssm"}
    assert replaceable_layers(teacher, None) == {}
    windows = torch.randint(0, 11, (2, 17))
    options = ({"T": 4, "v_threshold": 0.5},)
    plain = measure(teacher, windows, options=options, sparsify=(), energy_windows=1)
    assert "layers.1.mixer" not in plain.modules  # no stage-1 student: not offered
    m = measure(teacher, windows, options=options, sparsify=(), energy_windows=1, stage1=stage1)
    assert set(m.modules) == set(plain.modules) | {"layers.1.mixer"}
    assert m.info["replaced_layers"] == {"1": "ssm"}
    dense, swap = m.modules["layers.1.mixer"]
    assert dense.setting == "dense" and swap.setting == {"mixer": "ssm"}
    # the table's numbers are the replaced student's own: KL, and energy counted
    student = build_student(teacher, {"layers.1.mixer": swap.setting}, stage1)
    assert student.config.layer_kinds() == ["ssm", "ssm", "ssm"]
    for k, v in student.state_dict().items():
        src = stage1 if k.startswith("layers.1.") else teacher
        if not k.endswith("neuron.a"):
            assert torch.equal(v, src.state_dict()[k]), k
    kl, loss = schedule_kl(teacher, {"layers.1.mixer": swap.setting}, windows, stage1=stage1)
    assert kl == pytest.approx(swap.kl) and loss == pytest.approx(swap.loss) and kl > 0
    e = energy.profile(student, windows[:1, :-1], hardware="45nm-fp32")
    assert m.teacher_energy_pj - e.total_energy_pj / e.tokens == pytest.approx(
        swap.energy_saved_pj, rel=1e-6, abs=1e-6
    )
    # the planner takes the replacement exactly when it is worth its KL: with any KL allowed
    # it maximises energy saved, so it replaces the layer iff that saves energy
    p = plan(m, max_kl=1e9)
    assert (p.points["layers.1.mixer"] == swap.setting) == (swap.energy_saved_pj > 0)
    # a KL budget below the replacement's own KL never takes it
    p = plan(m, max_kl=swap.kl * 0.999)
    assert p.points["layers.1.mixer"] == "dense"
    # a replacement with the spike points of the same layer builds (its points by name)
    both = build_student(teacher, {"layers.1.mixer": swap.setting,
                                   "layers.1.mixer.spike_in": options[0]}, stage1)  # fmt: skip
    assert isinstance(both.layers[1].mixer.spike_in, SpikePoint)


def test_attention_to_ssm_bad_input_is_named():
    teacher, stage1 = _hybrid_and_stage1()
    windows = torch.randint(0, 11, (2, 9))
    with pytest.raises(
        ValueError, match=r"points\['layers.1.mixer'\]: .* stage-1 student replaces"
    ):
        build_student(teacher, {"layers.1.mixer": {"mixer": "ssm"}})
    with pytest.raises(ValueError, match=r"points\['layers.0.mixer'\]: .*\(\[1\]\)"):
        build_student(teacher, {"layers.0.mixer": {"mixer": "ssm"}}, stage1)
    with pytest.raises(ValueError, match=r"stage1: it replaces none of the teacher's attention"):
        measure(teacher, windows, stage1=teacher)
    wide = MARConfig(**{**SMALL, "n_layers": 3, "d_model": 32}, layers=["ssm"] * 3, spikes=None)
    wide = MARLM(wide)
    with pytest.raises(
        ValueError, match=r"stage1: its config differs from the teacher's in \['d_model'\]"
    ):
        measure(teacher, windows, stage1=wide)


# -- spikemar refine -------------------------------------------------------------------------


def _tiny_corpus(tmp_path) -> CharTokenizer:
    """A short text at ``tmp_path / 't.txt'`` for the command tests, and its characters."""
    text = "to be or not to be that is the question " * 40
    (tmp_path / "t.txt").write_text(text)
    return CharTokenizer("".join(sorted(set(text))))


def test_refine_command_end_to_end_and_resume(tmp_path, capsys):
    from spikemar.cli import main

    tokenizer = _tiny_corpus(tmp_path)
    torch.manual_seed(0)
    config = MARConfig(**{**SMALL, "n_layers": 1, "vocab_size": tokenizer.vocab_size})
    save_checkpoint(tmp_path / "teacher.pt", MARLM(config.dense()), tokenizer)
    out = tmp_path / "out"
    argv = ["refine", "--teacher", str(tmp_path / "teacher.pt"), "--data", str(tmp_path / "t.txt"),
            "--budget-energy", "1.05", "--out", str(out), "--steps", "2", "--L", "16",
            "--batch-size", "2", "--eval-interval", "2", "--eval-iters", "1",
            "--calib-windows", "2", "--option", "T=4,v_threshold=0.5", "--sparsify-topk", "0",
            "--warmup", "0", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "validation loss" in line and "energy ratio" in line and "predicted" in line
    for name in ("measurements.json", "plan.json", "init.pt", "student.pt", "pareto.png"):
        assert (out / name).is_file(), name
    result = json.loads((out / "result.json").read_text())
    assert result["energy_ratio"] >= 1.05 and result["plan"]["energy_ratio"] >= 1.05
    # a counted ratio short of the budget is said on the result line (not here: it is met)
    assert ("below --budget-energy" in line) == (result["energy_ratio"] < 1.05)
    student, _, _ = load_checkpoint(out / "student.pt")
    assert student.config.points == {"*": "dense", **result["plan"]["points"]}
    # calibrated before stage 2 (auto: kept only when it lowered the KL on the windows)
    calib = result["calibration"]
    assert calib["mode"] == "auto" and "kl_calibrated" in calib
    assert calib["kept"] == (calib["kl_calibrated"] < calib["kl_planned_v"])
    start = calib["kl_calibrated"] if calib["kept"] else calib["kl_planned_v"]
    assert result["initial_kl"] == pytest.approx(start, rel=1e-9)
    # an existing run is not replaced without --resume / --overwrite; --resume reuses the table
    assert main(argv) == 2  # one line, no traceback
    assert "pass --resume" in capsys.readouterr().err
    before = (out / "measurements.json").stat().st_mtime_ns
    assert main([*argv, "--resume", "--steps", "3"]) == 0
    assert "measurements read from" in capsys.readouterr().err
    assert (out / "measurements.json").stat().st_mtime_ns == before


def test_refine_command_calibrates_the_planned_student(tmp_path):
    """--calibrate on: the planned student starts stage 2 with per-channel thresholds at each
    point's planned firing rate (not the plan's one V₀ per point); off: with the plan's V₀."""
    from spikemar.cli import main

    tokenizer = _tiny_corpus(tmp_path)
    torch.manual_seed(1)
    config = MARConfig(**{**SMALL, "n_layers": 1, "vocab_size": tokenizer.vocab_size})
    save_checkpoint(tmp_path / "teacher.pt", MARLM(config.dense()), tokenizer)
    thresholds = {}
    for mode in ("on", "off"):
        out = tmp_path / mode
        argv = ["refine", "--teacher", str(tmp_path / "teacher.pt"), "--data",
                str(tmp_path / "t.txt"), "--budget-energy", "1.5", "--out", str(out),
                "--steps", "1", "--L", "16", "--batch-size", "2", "--eval-interval", "1",
                "--eval-iters", "1", "--calib-windows", "2", "--option", "T=4,v_threshold=0.5",
                "--sparsify-topk", "0", "--warmup", "0", "--no-progress",
                "--calibrate", mode]  # fmt: skip
        assert main(argv) == 0
        calib = json.loads((out / "calibration.json").read_text())
        init, _, _ = load_checkpoint(out / "init.pt")
        thresholds[mode] = {s.name: s.module.neuron.log_threshold.detach().exp()
                            for s in init.spike_points()}  # fmt: skip
        assert calib["kept"] == (mode == "on")
    assert thresholds["on"].keys() == thresholds["off"].keys() and thresholds["on"]
    for name, v in thresholds["off"].items():
        assert torch.allclose(v, torch.full_like(v, 0.5)), name  # the plan's V₀
        assert not torch.allclose(thresholds["on"][name], v), name  # calibrated per channel


def test_refine_command_takes_a_stage1_student_and_stage2_trains_the_hybrid(tmp_path, capsys):
    """--stage1: the attention layer the stage-1 student replaces is measured as one more module,
    and a planned student holding that SSM layer goes through stage 2 (its other tensors have the
    teacher's shapes; the replaced mixer is compared to nothing)."""
    from spikemar.cli import main

    tokenizer = _tiny_corpus(tmp_path)
    teacher, stage1 = _hybrid_and_stage1(tokenizer.vocab_size)
    save_checkpoint(tmp_path / "teacher.pt", teacher, tokenizer)
    save_checkpoint(tmp_path / "stage1.pt", stage1, tokenizer)
    out = tmp_path / "out"
    argv = ["refine", "--teacher", str(tmp_path / "teacher.pt"), "--data", str(tmp_path / "t.txt"),
            "--stage1", str(tmp_path / "stage1.pt"), "--budget-kl", "100", "--out", str(out),
            "--steps", "2", "--L", "16", "--batch-size", "2", "--eval-interval", "2",
            "--eval-iters", "1", "--calib-windows", "2", "--option", "T=4,v_threshold=0.5",
            "--sparsify-topk", "0", "--warmup", "0", "--calibrate", "off",
            "--no-progress"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    measured = json.loads((out / "measurements.json").read_text())
    assert "layers.1.mixer" in json.dumps(measured)
    # stage 2 on a student whose layer 1 is the stage-1 SSM, whatever the plan chose
    student = build_student(
        teacher, {"layers.1.mixer": {"mixer": "ssm"}, "layers.0.mixer.spike_in": "spike"}, stage1
    )
    assert student.config.layer_kinds()[1] == "ssm"
    save_checkpoint(tmp_path / "hybrid.pt", student, tokenizer)
    argv = ["distill", "--stage", "2", "--teacher", str(tmp_path / "teacher.pt"), "--student",
            str(tmp_path / "hybrid.pt"), "--data", str(tmp_path / "t.txt"), "--out",
            str(tmp_path / "s2.pt"), "--steps", "2", "--L", "16", "--batch-size", "2",
            "--eval-interval", "2", "--eval-iters", "1", "--warmup", "0",
            "--no-progress"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    assert load_checkpoint(tmp_path / "s2.pt")[0].config.layer_kinds()[1] == "ssm"
    capsys.readouterr()
    missing = ["refine", "--teacher", str(tmp_path / "teacher.pt"), "--data",
               str(tmp_path / "t.txt"), "--stage1", str(tmp_path / "none.pt"), "--budget-kl", "1",
               "--out", str(tmp_path / "o2")]  # fmt: skip
    assert main(missing) == 2  # a missing stage-1 checkpoint: one line naming it
    err = capsys.readouterr().err.strip()
    assert "stage1: no checkpoint" in err and "\n" not in err and not (tmp_path / "o2").exists()


def test_refine_takes_the_teachers_tokenizer_from_elsewhere(tmp_path, capsys):
    """A pretrained teacher whose directory ships no tokenizer (state-spaces/mamba2-130m):
    without --tokenizer one line says to pass it; with it the whole refinement runs."""
    from references.hf_checkpoints import bpe_tokenizer, write_mamba2_checkpoint

    from spikemar.cli import main

    write_mamba2_checkpoint(tmp_path / "m2", tokenizer=False)
    tok = bpe_tokenizer(300)
    tok.save(tmp_path / "tok")
    capsys.readouterr()  # transformers' warnings while the checkpoint is made
    (tmp_path / "t.txt").write_text("First Citizen:\nBefore we proceed any further.\n" * 30)
    argv = ["refine", "--teacher", str(tmp_path / "m2"), "--data", str(tmp_path / "t.txt"),
            "--budget-energy", "1.05", "--out", str(tmp_path / "out"), "--steps", "2", "--L",
            "16", "--batch-size", "2", "--eval-interval", "2", "--eval-iters", "1",
            "--calib-windows", "2", "--option", "T=2,v_threshold=0.5", "--sparsify-topk", "0",
            "--warmup", "0", "--no-progress"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "teacher: " in err and "pass --tokenizer DIR|FILE|OWNER/NAME" in err
    assert "\n" not in err and "tokenizer=False" not in err
    assert main([*argv, "--tokenizer", str(tmp_path / "tok")]) == 0
    assert load_checkpoint(tmp_path / "out" / "student.pt")[1] == tok


def _refine_argv(tmp_path, teacher, out, *extra: str) -> list[str]:
    return ["refine", "--teacher", str(teacher), "--data", str(tmp_path / "t.txt"), "--out",
            str(out), "--steps", "1", "--L", "16", "--batch-size", "2", "--eval-interval", "1",
            "--eval-iters", "1", "--calib-windows", "2", "--option", "T=4,v_threshold=0.5",
            "--sparsify-topk", "0", "--warmup", "0", "--no-progress", *extra]  # fmt: skip


def test_refine_command_refuses_what_cannot_work_before_any_work(tmp_path, capsys):
    """An energy budget below 1, a profile that prices no MAC (loihi: every refinement would
    look like a loss, measured for minutes) and a spiking student given as the teacher (its
    dense twin was measured, then stage 2 failed on the spiking file) are one line each, exit 2,
    before the teacher is measured."""
    from spikemar.cli import main

    tokenizer = _tiny_corpus(tmp_path)
    torch.manual_seed(0)
    config = MARConfig(**{**SMALL, "n_layers": 1, "vocab_size": tokenizer.vocab_size})
    save_checkpoint(tmp_path / "teacher.pt", MARLM(config.dense()), tokenizer)
    save_checkpoint(tmp_path / "student.pt", MARLM(config), tokenizer)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:  # argparse's one line
        main(_refine_argv(tmp_path, tmp_path / "teacher.pt", tmp_path / "o", "--budget-energy",
                          "0.5"))  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_.value.code == 2 and "expected a ratio >= 1" in err, err
    argv = _refine_argv(tmp_path, tmp_path / "teacher.pt", tmp_path / "o", "--budget-kl", "1",
                        "--hardware", "loihi")  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "'loihi' has no price for MACs" in err and "\n" not in err, err
    argv = _refine_argv(tmp_path, tmp_path / "student.pt", tmp_path / "o", "--budget-kl", "1")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "is a spiking student" in err and "\n" not in err and "measure" not in err, err
    assert not (tmp_path / "o").exists()


def test_refine_command_with_a_plan_that_spikes_nowhere_and_resume_checks(tmp_path, capsys):
    """A KL budget below every option's KL plans no spiking point: the run still ends (it
    raised KeyError 'kl_calibrated'); --resume with another teacher or another --hardware than
    the run was measured for, or a budget that plans another schedule, is one line (it crashed
    in a tensor op, or re-planned silently)."""
    from spikemar.cli import main

    tokenizer = _tiny_corpus(tmp_path)
    torch.manual_seed(0)
    config = MARConfig(**{**SMALL, "n_layers": 1, "vocab_size": tokenizer.vocab_size})
    save_checkpoint(tmp_path / "teacher.pt", MARLM(config.dense()), tokenizer)
    other = MARConfig(**{**SMALL, "n_layers": 1, "d_model": 24, "vocab_size": tokenizer.vocab_size})
    save_checkpoint(tmp_path / "other.pt", MARLM(other.dense()), tokenizer)
    out = tmp_path / "out"
    argv = _refine_argv(tmp_path, tmp_path / "teacher.pt", out, "--budget-kl", "1e-12")
    assert main(argv) == 0, capsys.readouterr().err
    result = json.loads((out / "result.json").read_text())
    assert all(s == "dense" for s in result["plan"]["points"].values())
    for teacher, extra, message in [
        ("other.pt", (), "was measured for teacher"),
        ("teacher.pt", ("--hardware", "45nm-fp16"), "was measured under --hardware 45nm-fp32"),
        # another budget, another schedule: the results reported the new plan beside the old
        # plan's trained student
        ("teacher.pt", ("--budget-kl", "100"), "was planned for budget {'max_kl': 1e-12}"),
        ("teacher.pt", ("--option", "T=2,v_threshold=0.5"), "was measured with --option"),
    ]:
        capsys.readouterr()
        argv = _refine_argv(tmp_path, tmp_path / teacher, out, "--budget-kl", "1e-12",
                            "--resume", *extra)  # fmt: skip
        assert main(argv) == 2
        line = capsys.readouterr().err.strip().splitlines()[-1]  # after any progress lines
        assert line.startswith("spikemar refine: error: resume:") and message in line, line


def test_pareto_plot_names_every_point_in_its_legend(saved_figures, tmp_path):
    """The uniform schedules sit close together: their labels, written at the points, ran into
    each other and off the figure, and "before"/"after stage 2" overlapped. Every point is a
    legend entry beside the axes now, with no text on the axes."""

    figures = saved_figures
    settings_ = [{"T": 4, "v_threshold": v} for v in (0.25, 0.5, 1.0)] + [{"T": 2}]
    modules = {
        name: [Option(name, "dense", 0.0, 1.0, 0.0)]
        + [Option(name, dict(s), 0.1 + 0.01 * k, 1.0, 10.0 + k) for k, s in enumerate(settings_)]
        for name in ("a", "b")
    }
    m = Measurements(modules, 100.0, 1.0, "45nm-fp32")
    assert len(uniform_schedules(m)) == 4  # four close together
    p = plan(m, energy_ratio=1.2)
    measured = {"plan, before stage 2": (p.energy_ratio, 0.1), "plan, after stage 2": (1.0, 0.05)}
    pareto_plot(m, [p], tmp_path / "pareto.png", measured=measured)
    (fig,) = figures
    (ax,) = fig.axes
    assert len(ax.texts) == 0  # nothing written at the points
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    for name in uniform_schedules(m):
        assert f"uniform {name}, predicted" in labels
    assert {"plan, before stage 2, measured", "plan, after stage 2, measured"} <= set(labels)
