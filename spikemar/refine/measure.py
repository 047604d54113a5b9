"""Sensitivity and cost: refine one module at a time and record what it costs and saves.

For each spike point of a dense SSM teacher and each option (spiking at a few T/τ/V settings,
sparsified), the student is the teacher with *only that point* refined; on calibration windows
it records the student–teacher KL(p_teacher ‖ q_student) per token, the student's loss, and the
energy per token under a hardware profile (:func:`spikemar.energy.profile`). A schedule's
predicted KL is the sum of its modules' KLs (refinements assumed to act independently: the
first-order picture; the Pareto plot sets measured KLs beside it) and its energy the teacher's
minus the sum of the savings (also first order: a point's savings depend on its firing rate,
which the points upstream of it shift; on the packaged teacher a 5.07x plan measured 5.23x).

**Attention → SSM.** Where the teacher has attention layers and a stage-1 student is given (the
same architecture with those layers' mixers replaced by SSMs and trained in stage 1), each such
layer is one more module, ``layers.{i}.mixer``, with options ``'dense'`` (attention kept) and
``{'mixer': kind}`` (the whole layer i taken from the stage-1 student). A schedule names it like a
spike point; :func:`build_student` builds it. The layer's spike points are measured on the
attention mixer; a schedule that replaces the layer applies their settings to the SSM's points of
the same name (first order, like the rest of the table).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import energy
from .._numbers import check_count
from ..models import MARLM, SpikeConfig
from ..models.mar import point_module

__all__ = [
    "DEFAULT_OPTIONS",
    "Measurements",
    "Option",
    "build_student",
    "check_hardware",
    "check_setting",
    "check_teacher",
    "kl_and_loss",
    "measure",
    "replaceable_layers",
    "schedule_kl",
]

# the options measured at every spike point: three thresholds at T = 4 and a coarse T = 2
DEFAULT_OPTIONS: tuple[dict[str, Any], ...] = (
    {"T": 4, "v_threshold": 0.25},
    {"T": 4, "v_threshold": 0.5},
    {"T": 4, "v_threshold": 1.0},
    {"T": 2, "v_threshold": 0.5},
)
# the sparsification options of FFN points (real values kept: top-k per token)
DEFAULT_SPARSIFY: tuple[dict[str, Any], ...] = ({"sparsify": "topk", "amount": 0.25},)


@dataclass(frozen=True)
class Option:
    """One refinement of one module: ``setting`` as in ``MARConfig.points``; its measured
    ``kl`` (nats/token), ``loss`` (nats/token) and ``energy_saved_pj`` per token."""

    module: str
    setting: str | dict[str, Any]
    kl: float
    loss: float
    energy_saved_pj: float

    def label(self) -> str:
        s = self.setting
        return s if isinstance(s, str) else ",".join(f"{k}={v}" for k, v in s.items())


@dataclass
class Measurements:
    """The sensitivity table: per module its options (``'dense'`` first, KL 0, nothing saved),
    the teacher's ``energy_pj`` per token and loss, under ``hardware``."""

    modules: dict[str, list[Option]]
    teacher_energy_pj: float
    teacher_loss: float
    hardware: str
    info: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": "spikemar-refine-measurements-1",
            "hardware": self.hardware,
            "teacher_energy_pj": self.teacher_energy_pj,
            "teacher_loss": self.teacher_loss,
            "info": self.info,
            "modules": {
                name: [
                    {
                        "setting": o.setting,
                        "kl": o.kl,
                        "loss": o.loss,
                        "energy_saved_pj": o.energy_saved_pj,
                    }
                    for o in options
                ]
                for name, options in self.modules.items()
            },
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Measurements:
        if not isinstance(data, dict) or data.get("format") != "spikemar-refine-measurements-1":
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"measurements: unknown format {found!r}")
        try:
            modules = {
                name: [
                    Option(name, o["setting"], o["kl"], o["loss"], o["energy_saved_pj"])
                    for o in options
                ]
                for name, options in data["modules"].items()
            }
            return cls(modules, data["teacher_energy_pj"], data["teacher_loss"],
                       data["hardware"], data.get("info", {}))  # fmt: skip
        except (KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"measurements: a table without {err} (an incomplete "
                             "spikemar-refine-measurements-1)") from None  # fmt: skip

    def save(self, path: str | os.PathLike, *, name: str = "path") -> Path:
        """Write the table to ``path`` as JSON, atomically; ``name`` is the argument that gave
        ``path`` (a command's ``--out``), which a failed write names with the file."""
        from .._io import atomic_write, check_output_path

        # a folder at path is named, not atomic_write's temp file
        path = check_output_path(path, name=name)
        with atomic_write(path, name=name) as tmp:
            tmp.write_text(json.dumps(self.to_json(), indent=1))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Measurements:
        """The table saved at ``path``; a file that is not one is one error naming it."""
        try:
            return cls.from_json(json.loads(Path(path).read_text()))
        except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
            raise ValueError(f"{path}: not a refine measurements table ({err})") from None


def _is_mixer_setting(setting: Any) -> bool:
    return isinstance(setting, dict) and "mixer" in setting


def replaceable_layers(teacher: MARLM, stage1: MARLM | None) -> dict[int, str]:
    """Layer index → the stage-1 student's mixer kind, for each attention layer of ``teacher``
    that ``stage1`` replaces (empty without a stage-1 student)."""
    if stage1 is None:
        return {}
    if not isinstance(stage1, MARLM) or stage1.config.spikes is not None:
        raise ValueError("stage1: expected a dense MARLM (the stage-1 student, config.spikes "
                         "None)")  # fmt: skip
    t, s = teacher.config, stage1.config
    same = {k: v for k, v in vars(t).items() if k != "layers"}
    other = {k: v for k, v in vars(s).items() if k != "layers"}
    if same != other:
        diff = sorted(k for k in same if same[k] != other.get(k))
        raise ValueError(f"stage1: its config differs from the teacher's in {diff}; expected "
                         "the teacher's architecture with attention layers replaced")  # fmt: skip
    return {i: b for i, (a, b) in enumerate(zip(t.layer_kinds(), s.layer_kinds(), strict=True))
            if a == "attn" and b != "attn"}  # fmt: skip


def check_teacher(teacher: Any) -> None:
    """One error unless ``teacher`` is a dense MARLM whose every spike point's place is dense:
    ``config.spikes`` None and no ``ffn_sparsity`` (a sparsified FFN is not the 'dense' option
    of its points: every student would drop it, and its KL would not start at 0)."""
    if not isinstance(teacher, MARLM) or teacher.config.spikes is not None:
        raise ValueError("teacher: expected a dense MARLM (config.spikes None)")
    if teacher.config.ffn_sparsity is not None:
        raise ValueError(f"teacher: its FFNs are sparsified (ffn_sparsity="
                         f"{teacher.config.ffn_sparsity!r}); expected a dense teacher, whose "
                         "FFN points refine can sparsify one by one ({'sparsify': ...} "
                         "options)")  # fmt: skip


def build_student(teacher: MARLM, points: dict[str, Any], stage1: MARLM | None = None) -> MARLM:
    """The teacher's architecture and weights with the spike-point ``points`` (every point not
    named stays dense), in eval mode on the teacher's device and dtype. An entry
    ``'layers.{i}.mixer': {'mixer': kind}`` takes layer i from ``stage1`` (the stage-1 student,
    whose layer i has that mixer kind)."""
    check_teacher(teacher)
    mixers = {k: v for k, v in points.items() if _is_mixer_setting(v)}
    # a layer's mixer left as the teacher's ('dense' in a plan) is no spike point to configure
    points = {k: v for k, v in points.items()
              if k not in mixers and not (k.endswith(".mixer") and v == "dense")}  # fmt: skip
    kinds = teacher.config.layer_kinds()
    state = teacher.state_dict()
    if mixers:
        allowed = replaceable_layers(teacher, stage1)
        other = stage1.state_dict() if stage1 is not None else {}
        for name, setting in mixers.items():
            i = name.split(".")[1] if name.startswith("layers.") else ""
            if name != f"layers.{i}.mixer" or not i.isdigit() or int(i) not in allowed:
                raise ValueError(f"points[{name!r}]: {setting} replaces a layer's mixer; "
                                 f"expected 'layers.{{i}}.mixer' for an attention layer i the "
                                 f"stage-1 student replaces ({sorted(allowed)})")  # fmt: skip
            if setting != {"mixer": allowed[int(i)]}:
                raise ValueError(f"points[{name!r}]: expected {{'mixer': "
                                 f"{allowed[int(i)]!r}}} (the stage-1 student's), "
                                 f"got {setting}")  # fmt: skip
            kinds[int(i)] = allowed[int(i)]
            prefix = f"layers.{i}."
            state = {k: v for k, v in state.items() if not k.startswith(prefix)}
            state.update({k: v for k, v in other.items() if k.startswith(prefix)})
    base = SpikeConfig()
    config = replace(teacher.config, spikes=base, spiking=True, layers=kinds,
                     points={"*": "dense", **points})  # fmt: skip
    student = MARLM(config)
    missing, unexpected = student.load_state_dict(state, strict=False)
    others = [k for k in missing if not k.endswith("neuron.a")]
    if others or unexpected:
        raise ValueError(f"points: the student's parameters differ from the teacher's "
                         f"(missing {others[:3]}, unexpected {unexpected[:3]})")  # fmt: skip
    p = next(teacher.parameters())
    return student.to(device=p.device, dtype=p.dtype).eval()


@torch.no_grad()
def _logprobs(model: MARLM, windows: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(model(windows[:, :-1]).double(), dim=-1)


@torch.no_grad()
def schedule_kl(
    teacher: MARLM,
    points: dict[str, Any],
    windows: torch.Tensor,
    batch_size: int = 8,
    stage1: MARLM | None = None,
) -> tuple[float, float]:
    """``(KL(p_teacher ‖ q_student), student loss)`` per token of the student with ``points``
    on ``windows`` [n, L + 1]."""
    student = build_student(teacher, points, stage1)
    return kl_and_loss(teacher, student, windows, batch_size)


@torch.no_grad()
def kl_and_loss(
    teacher: nn.Module, student: nn.Module, windows: torch.Tensor, batch_size: int = 8
) -> tuple[float, float]:
    """``(KL(p_teacher ‖ q_student), student loss)`` per token on ``windows`` [n, L + 1]."""
    _check_windows(windows)
    batch_size = check_count("batch_size", batch_size)
    kl = loss = 0.0
    count = 0
    for i in range(0, windows.shape[0], batch_size):
        w = windows[i : i + batch_size]
        p, q = _logprobs(teacher, w), _logprobs(student, w)
        kl += float((p.exp() * (p - q)).sum())
        loss += float(F.nll_loss(q.flatten(0, 1), w[:, 1:].flatten(), reduction="sum"))
        count += w[:, 1:].numel()
    return kl / count, loss / count


def _check_windows(windows: Any) -> None:
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.shape[1] < 2:
        shape = tuple(windows.shape) if isinstance(windows, torch.Tensor) else type(windows)
        raise ValueError(f"windows: expected token ids [n, L + 1] with L >= 1, got {shape}")
    if windows.shape[0] < 1:
        raise ValueError(f"windows: expected at least one window, got {tuple(windows.shape)}")


def check_hardware(hardware: str | energy.HardwareProfile) -> energy.HardwareProfile:
    """The profile ``hardware`` names, if it can weigh a spiking point against its dense form:
    it must price both the accumulates (ACs) of spike-fed projections and the
    multiply-accumulates (MACs) of dense ones (``loihi`` prices no MAC: under it a dense
    teacher's projections would cost nothing and every refinement would look like a loss)."""
    hw = energy.get_profile(hardware)
    missing = [what for what, price in (("ACs", hw.ac_pj), ("MACs", hw.mac_pj)) if price is None]
    if missing:
        raise ValueError(
            f"hardware: {hw.name!r} has no price for {' or '.join(missing)}, so it cannot weigh a "
            "spiking point against its dense form; choose a profile that prices both (e.g. "
            "45nm-fp32, 45nm-fp32+mem)"
        )
    return hw


def check_setting(where: str, setting: Any) -> dict[str, Any]:
    """``setting`` (one option to measure at a spike point: a ``MARConfig.points`` dict) as a
    dict, else one error that starts with ``where``."""
    if _is_mixer_setting(setting):
        raise ValueError(f"{where}: {setting!r} replaces a layer's mixer, which is no option of "
                         "a spike point; a stage-1 student (measure(stage1=...), spikemar "
                         "refine --stage1) offers each layer it replaces")  # fmt: skip
    if not isinstance(setting, dict):
        raise ValueError(f"{where}: expected a spike-point setting as a dict (e.g. "
                         f"{{'T': 4, 'v_threshold': 0.5}} or {{'sparsify': 'topk', "
                         f"'amount': 0.25}}), got {setting!r}")  # fmt: skip
    try:
        point_module(1, setting, SpikeConfig(), name=where)
    except ValueError as err:  # SpikeConfig's own messages name the field, not the option
        message = str(err)
        if not message.startswith(where):
            message = f"{where}: {message}"
        raise ValueError(message) from None
    return dict(setting)


def check_settings(name: str, settings: Any) -> tuple[dict[str, Any], ...]:
    """``settings`` (``measure``'s ``options`` or ``sparsify``) as a tuple of dicts, each a
    ``MARConfig.points`` setting of one spike point, else one error naming ``name[i]``."""
    if isinstance(settings, str | dict) or not isinstance(settings, Sequence):
        raise ValueError(f"{name}: expected a sequence of spike-point settings (dicts such as "
                         f"{{'T': 4, 'v_threshold': 0.5}}), got {settings!r}")  # fmt: skip
    return tuple(check_setting(f"{name}[{i}]", s) for i, s in enumerate(settings))


def _energy(model: MARLM, tokens: torch.Tensor, hardware: str) -> float:
    report = energy.profile(model, tokens, hardware=hardware)
    return report.total_energy_pj / report.tokens


def measure(
    teacher: MARLM,
    windows: torch.Tensor,
    *,
    options: Sequence[dict[str, Any]] = DEFAULT_OPTIONS,
    sparsify: Sequence[dict[str, Any]] = DEFAULT_SPARSIFY,
    hardware: str | energy.HardwareProfile = "45nm-fp32",
    batch_size: int = 8,
    energy_windows: int = 2,
    stage1: MARLM | None = None,
    progress: Callable[[str], None] | None = None,
    done: Mapping[str, Sequence[Option]] | None = None,
    on_module: Callable[[Measurements], None] | None = None,
) -> Measurements:
    """Refine each spike point of ``teacher`` (a dense MARLM) alone with each of ``options``
    (``MARConfig.points`` settings; FFN points also with ``sparsify``) and measure it on
    ``windows`` (token ids [n, L + 1]: inputs ``w[:, :-1]``, targets ``w[:, 1:]``).

    Energy per token comes from one counted pass over the first ``energy_windows`` windows.
    ``sparsify`` options are measured only under a zero-skipping profile (``'45nm-fp32+zs'``
    …): a dense-hardware profile prices a sparsified point's projection as full MACs.
    ``stage1``: a stage-1 student (the teacher with attention layers replaced by SSMs); each
    replaced layer is then measured as a module ``layers.{i}.mixer`` too.

    ``on_module`` is called with the table so far after each module, and ``done`` (such a
    partial table's ``modules``, measured for the same teacher, windows and profile) gives
    modules not to measure again where their options are this call's: what lets ``spikemar
    refine --resume`` continue a measurement that was stopped."""
    check_teacher(teacher)
    _check_windows(windows)
    batch_size = check_count("batch_size", batch_size)
    energy_windows = check_count("energy_windows", energy_windows)
    options, sparsify = check_settings("options", options), check_settings("sparsify", sparsify)
    profile = check_hardware(hardware)  # before any work
    zero_skipping = profile.zero_skipping
    teacher.eval()
    sample = windows[:energy_windows, :-1]
    teacher_energy = _energy(teacher, sample, hardware)
    if not math.isfinite(teacher_energy) or teacher_energy <= 0:
        raise ValueError(f"hardware: {profile.name!r} prices the teacher at {teacher_energy} pJ")
    _, teacher_loss = kl_and_loss(teacher, teacher, windows, batch_size)
    # dense hardware multiplies the zeros a sparsifier makes: its options would only cost (the
    # sparsifier's own work) and are not measured; zero-skipping profiles price them
    if not zero_skipping:
        sparsify = ()
    replaced = replaceable_layers(teacher, stage1)
    if stage1 is not None and not replaced:
        raise ValueError("stage1: it replaces none of the teacher's attention layers (teacher "
                         f"{teacher.config.layer_kinds()}, stage1 "
                         f"{stage1.config.layer_kinds()})")  # fmt: skip
    sites = [s.name for s in teacher.spike_points(include_dense=True)]
    settings = {name: [*options, *(sparsify if ".ffn." in name else ())] for name in sites}
    for i, kind in replaced.items():
        sites.append(f"layers.{i}.mixer")
        settings[f"layers.{i}.mixer"] = [{"mixer": kind}]
    info = {"windows": list(windows.shape), "options": [dict(o) for o in options],
            "sparsify": [dict(o) for o in sparsify], "zero_skipping": zero_skipping,
            "replaced_layers": {str(i): k for i, k in replaced.items()}}  # fmt: skip
    modules: dict[str, list[Option]] = {}
    for n, name in enumerate(sites):
        before = list((done or {}).get(name, ()))
        if [o.setting for o in before] == ["dense", *settings[name]]:
            modules[name] = before  # measured before, with these options
            if progress is not None:
                progress(f"measure {n + 1}/{len(sites)} {name}: measured before")
            continue
        opts = [Option(name, "dense", 0.0, teacher_loss, 0.0)]
        for setting in settings[name]:
            student = build_student(teacher, {name: setting}, stage1)
            kl, loss = kl_and_loss(teacher, student, windows, batch_size)
            saved = teacher_energy - _energy(student, sample, hardware)
            opts.append(Option(name, dict(setting), kl, loss, saved))
        modules[name] = opts
        if progress is not None:
            best = max(opts, key=lambda o: o.energy_saved_pj)
            progress(f"measure {n + 1}/{len(sites)} {name}: {len(opts)} options, most saved "
                     f"{best.energy_saved_pj:.4g} pJ/token at KL {best.kl:.3g}")  # fmt: skip
        if on_module is not None:
            on_module(Measurements(dict(modules), teacher_energy, teacher_loss, profile.name,
                                   dict(info)))  # fmt: skip
    return Measurements(modules, teacher_energy, teacher_loss, profile.name, info)
