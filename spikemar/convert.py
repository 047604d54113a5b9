"""MAR-ify a pretrained model: insert the spike points, calibrate their thresholds, report.

    spikemar convert --from DIR --out student.pt [--T 4 --tau 1 --firing-rate 0.2 --data FILE]
        [--spike-layers 0,2 | --spike-points 'layers.*.mixer.spike_in' | --spike-points plan.json]

``DIR`` is a Hugging Face Mamba-2 or Llamba checkpoint directory or Hub id
(:func:`spikemar.models.from_pretrained`), or a spikemar checkpoint of a dense (or spiking) SSM
LM. The student is the same model with MAR's spike points (``SpikeConfig``: T, τ, neuron,
threshold sharing) in the chosen layers and the pretrained weights unchanged; only the
thresholds V are new, and they are calibrated on a few batches of text.

Where the spike points go: every layer's (default), the layers ``--spike-layers`` names, or the
points ``--spike-points`` names (``MARConfig.points``; the others stay dense): a comma-separated
list of point names or patterns (``layers.0.mixer.spike_in``, ``layers.*.ffn.*``), or a JSON
file of per-point settings, either ``{pattern: setting}`` or the ``plan.json`` that
``spikemar refine`` writes (its ``points``): ``'dense'``, ``'spike'``, a dict of
:class:`SpikeConfig` fields over the command's (its own T, τ, neuron, threshold sharing), or a
sparsification. Every spiking point is calibrated; a setting's ``v_threshold`` is only where the
search starts from, as the command's ``--T``/``--tau`` are the defaults of the points that do not
set their own.

Calibration (:func:`calibrate_thresholds` with ``sequential=True``, what :func:`convert` runs):

1. The spike points are calibrated one after the other in the order the student runs them, each
   on the activations I that reach it in the *student* (every earlier point already spiking at
   its calibrated threshold), sampled over the calibration batches (up to ``max_rows`` token rows
   per point). It takes one forward pass of the student over all calibration batches together
   (a hook before each point calibrates it, then the point runs with its new threshold), stopped
   after the last layer.
2. For each spike point, per channel (or per layer when the threshold is shared), V is set by
   bisection on log V (:func:`calibrate_point_rate`) so that the fraction of nonzero spikes
   over the T micro-steps, computed with the neuron's own dynamics on those samples
   (δ-injection, ATMN's soft reset), equals the target ``firing_rate``. The firing rate falls
   monotonically as V grows, so bisection finds it; a channel that never fires (I ≡ 0) keeps
   the largest V tried.

Calibrating every point on the *dense* model's activations instead (``sequential=False``,
:func:`calibrate_thresholds`'s default) misses the rate downstream of the first spike point:
quantisation noise changes what reaches a mixer's output point or an FFN's hidden point (a
Llamba at T = 1 asked for 20 % fired 1.4 % there, 8.6 % over all points). Distillation
(``spikemar distill --stage 2 --student student.pt --teacher DIR``) then trains the thresholds.

The command prints the immediate change: validation loss (nats/token) and energy per token
(:func:`spikemar.energy.profile`, 45nm-fp32 by default) of the dense model and the student on
the same held-out windows, and the firing rate the student reaches there.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._numbers import check_count, check_seed, item, real
from .models import MARLM, SpikeConfig, SpikePoint
from .models.hub import command_line_hint

__all__ = [
    "ConvertResult",
    "add_convert_arguments",
    "calibrate_point_rate",
    "calibrate_thresholds",
    "convert",
    "convert_main",
    "load_dense",
    "point_rates",
    "read_spike_points",
    "spike_point_state_names",
    "spiking_student",
]


def load_dense(
    source: str | Path,
    device: str = "cpu",
    tokenizer: bool | str | Path = True,
    *,
    spiking_ok: bool = True,
):
    """``(dense MARLM, tokenizer)`` from a Hugging Face checkpoint directory / Hub id or a
    spikemar checkpoint (a spiking one gives its dense twin; ``spiking_ok=False``: a
    ValueError instead, for callers that need the teacher itself). ``tokenizer``: True, the
    source's own; False, none; a directory, ``tokenizer.json`` or Hub id, that one (see
    :func:`spikemar.models.from_pretrained`)."""
    from .checkpoint import dense_twin, load_checkpoint

    path = Path(source)
    if path.is_file():
        model, tokenizer_, _ = load_checkpoint(path, map_location=device)
        if tokenizer is False:
            tokenizer_ = None
        elif tokenizer is not True:
            from .models.hub import tokenizer_from

            tokenizer_ = tokenizer_from(tokenizer)
        if not isinstance(model, MARLM):
            raise ValueError(f"from: {path} holds a {type(model).__name__}; convert needs an SSM "
                             "language model (a MARLM, or a Mamba-2/Llamba directory)")  # fmt: skip
        if model.config.spikes is not None:
            if not spiking_ok:
                raise ValueError(f"{path} is a spiking student, not a dense teacher (give "
                                 "the Hugging Face directory or dense checkpoint it was "
                                 "converted from)")  # fmt: skip
            model = dense_twin(model)
        return model.to(device).eval(), tokenizer_
    from .models.hub import from_pretrained

    model = from_pretrained(source, tokenizer=tokenizer)
    return model.to(device).eval(), model.tokenizer


def spiking_student(
    dense: MARLM,
    spikes: SpikeConfig,
    spiking: bool | Sequence[bool] = True,
    points: Mapping[str, str | dict] | None = None,
) -> MARLM:
    """The dense model with MAR's spike points (in the layers ``spiking`` selects, or only the
    ``points`` named, ``MARConfig.points`` settings, the others dense) and its weights; the
    thresholds start at ``spikes.v_threshold`` (or a point's own)."""
    if not isinstance(dense, MARLM) or dense.config.spikes is not None:
        raise ValueError("dense: expected a dense MARLM (config.spikes None)")
    spiking = spiking if isinstance(spiking, bool) else [bool(s) for s in spiking]
    if points is not None:
        if spiking is not True:
            raise ValueError("points: give the spiking points or the spiking layers, not both")
        if not isinstance(points, Mapping) or not points:
            raise ValueError(f"points: expected a non-empty {{pattern: setting}} dict, got "
                             f"{points!r}")  # fmt: skip
        points = {"*": "dense", **points}  # a point not named stays dense
    config = replace(dense.config, spikes=spikes, spiking=spiking,
                     points=None if points is None else dict(points))  # fmt: skip
    student = MARLM(config)
    missing, unexpected = student.load_state_dict(dense.state_dict(), strict=False)
    others = sorted(set(missing) - spike_point_state_names(student))
    if others or unexpected:  # the student is the dense model plus thresholds, nothing else
        raise ValueError(f"dense: the student's parameters differ (missing {others[:3]}, "
                         f"unexpected {unexpected[:3]})")  # fmt: skip
    p = next(dense.parameters())
    student.tokenizer = getattr(dense, "tokenizer", None)  # the same vocabulary
    return student.to(device=p.device, dtype=p.dtype).eval()


def spike_point_state_names(model: nn.Module) -> set[str]:
    """The state-dict names that ``model``'s spike points own (their thresholds): what a
    spiking student holds beyond its dense twin's weights. Read from ``MARLM.spike_points()``;
    empty for a model without them."""
    if not isinstance(model, MARLM):
        return set()
    return {f"{site.name}.{key}" for site in model.spike_points()
            for key in site.module.state_dict()}  # fmt: skip


def _spike_points(student: MARLM) -> list[tuple[str, SpikePoint]]:
    return [(site.name, site.module) for site in student.spike_points()]


def _points_to_calibrate(student: MARLM) -> list[tuple[str, SpikePoint]]:
    sites = _spike_points(student)
    if not sites:
        raise ValueError("student: it has no spike points to calibrate")
    return sites


def _sample_rows(t: torch.Tensor, max_rows: int, gen: torch.Generator) -> torch.Tensor:
    """A spike point's input as float rows [rows, channels], at most ``max_rows`` of them (a
    random subset drawn from ``gen``)."""
    x = t.detach().reshape(-1, t.shape[-1]).float()
    if x.shape[0] > max_rows:
        x = x[torch.randperm(x.shape[0], generator=gen)[:max_rows].to(x.device)]
    return x


@torch.no_grad()
def point_samples(
    student: MARLM,
    dense: MARLM,
    batches: Iterable[torch.Tensor],
    *,
    max_rows: int = 2048,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """The activations [rows, channels] that ``dense`` feeds to the place of each of
    ``student``'s spike points on ``batches`` (token ids [b, L]), at most ``max_rows`` rows
    each (a seeded random subset, taken per batch too, so a large model's activations are
    never all held at once)."""
    points = [name for name, _ in _points_to_calibrate(student)]
    samples: dict[str, list[torch.Tensor]] = {name: [] for name in points}
    gen = torch.Generator().manual_seed(seed)

    def keep(name: str):
        def hook(module, inputs, output):
            samples[name].append(_sample_rows(inputs[0], max_rows, gen).cpu())

        return hook

    handles = []
    try:
        for name in points:
            try:
                place = dense.get_submodule(name)
            except AttributeError as err:
                raise ValueError(f"dense: no module {name!r} where the student has a spike point "
                                 "(not the same architecture)") from err  # fmt: skip
            handles.append(place.register_forward_hook(keep(name)))
        seen = 0
        for tokens in batches:
            dense(tokens)
            seen += 1
    finally:
        for h in handles:
            h.remove()
    if not seen:
        raise ValueError("batches: expected at least one batch of token ids")
    out = {}
    for name, parts in samples.items():
        x = torch.cat(parts)
        if x.shape[0] > max_rows:
            x = x[torch.randperm(x.shape[0], generator=gen)[:max_rows]]
        out[name] = x
    return out


def point_rates(point: SpikePoint, x: torch.Tensor) -> torch.Tensor:
    """Nonzero spikes per micro-step of each channel of ``point`` at its current thresholds, on
    samples x [n, C]: [C]."""
    _, spikes = point.neuron.quantize(x, point.T)
    return (spikes != 0).float().mean(dim=tuple(range(spikes.dim() - 1)))


@torch.no_grad()
def calibrate_point_rate(
    point: SpikePoint, x: torch.Tensor, firing_rate: float, *, rounds: int = 5
) -> float:
    """Set ``point``'s threshold, per channel (or one V when it is shared), to the smallest V
    that fires at most ``firing_rate`` (nonzero spikes per micro-step) on the samples x [n, C]
    that reach it, to within 40 / 16^rounds in log V (4 halvings a round). Returns the mean
    rate reached."""
    a = point.neuron.log_threshold
    x = x.to(a.device)  # samples may be kept on the CPU while the point is on a GPU
    shared = a.dim() == 0
    # bisection on log V (the rate falls as V grows), run by the neuron's own kernel on its own
    # threshold: hi above every |I| (no spikes, rate 0 <= target), lo far below (fires all it
    # can); hi always fires at most the target
    top = x.abs().amax().reshape(1) if shared else x.abs().amax(dim=0)
    hi = torch.log(top.clamp(min=1e-12)) + 1.0
    lo = hi - 40.0
    for _ in range(4 * rounds):
        mid = (lo + hi) / 2
        a.copy_(mid.reshape(a.shape).to(a.dtype))
        rate = point_rates(point, x)
        ok = (rate.mean().reshape(1) if shared else rate) <= firing_rate
        hi, lo = torch.where(ok, mid, hi), torch.where(ok, lo, mid)
    a.copy_(hi.reshape(a.shape).to(a.dtype))
    return float(point_rates(point, x).mean())


@torch.no_grad()
def calibrate_thresholds(
    student: MARLM,
    dense: MARLM,
    batches: Iterable[torch.Tensor],
    firing_rate: float = 0.2,
    *,
    max_rows: int = 2048,
    rounds: int = 5,
    seed: int = 0,
    sequential: bool = False,
) -> dict[str, float]:
    """Set every spike point's threshold of ``student`` so it fires at ``firing_rate`` on
    ``batches`` (token ids [b, L]) (:func:`calibrate_point_rate` per point).

    ``sequential`` False: on the activations the ``dense`` model produces at each point's place
    (one pass; points downstream of another spike point then fire off the target in the
    student). True: point after point in the student's own order, each on the activations that
    reach it in the student with the earlier points calibrated (see the module docstring), so
    the student itself fires at ``firing_rate``; ``dense`` is not used.

    Returns each spike point's mean firing rate on those samples after calibration.
    """
    firing_rate = _fraction(firing_rate)
    max_rows, seed = check_count("max_rows", max_rows), check_seed(seed)
    rounds = check_count("rounds", rounds, 0)  # 0, as before: no bisection, V above all |I|
    if sequential:
        return _calibrate_in_order(student, batches, firing_rate, max_rows=max_rows,
                                   rounds=rounds, seed=seed)  # fmt: skip
    samples = point_samples(student, dense, batches, max_rows=max_rows, seed=seed)
    return {name: calibrate_point_rate(sp, samples[name], firing_rate, rounds=rounds)
            for name, sp in _spike_points(student)}  # fmt: skip


# The numbers of convert and calibrate_thresholds as Python's (NumPy's too: a sweep's np.int64,
# a rate from np.linspace), checked before any work: the provenance saved with a student holds
# them, and torch.Generator.manual_seed takes no NumPy int.


def _fraction(firing_rate: object) -> float:
    rate = real(item(firing_rate))  # a 0-d tensor or array too, as the old comparison took it
    if rate is None or not 0 < rate < 1:
        raise ValueError(f"firing_rate: expected a fraction in (0, 1), got {firing_rate!r}")
    return rate


class _Reached(Exception):
    """Raised by a hook to end a forward pass once the part it watches has run."""


@torch.no_grad()
def _calibrate_in_order(
    student: MARLM,
    batches: Iterable[torch.Tensor],
    firing_rate: float,
    *,
    max_rows: int,
    rounds: int,
    seed: int,
) -> dict[str, float]:
    """Sequential calibration (the module docstring) in one forward pass of the student over
    all batches at once: a hook before each spike point calibrates it on the activations that
    reach it (earlier points already calibrated, as the pass runs them first), then the point
    runs with its new threshold; the pass stops after the last layer (no logits)."""
    sites = _points_to_calibrate(student)
    batches = list(batches)
    if not batches:
        raise ValueError("batches: expected at least one batch of token ids")
    if len({tuple(b.shape[1:]) for b in batches}) > 1:
        raise ValueError("batches: expected token ids of one length [b, L] (they are run as one "
                         f"batch), got {sorted({tuple(b.shape) for b in batches})}")  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    rates: dict[str, float] = {}

    def calibrate(name: str):
        def hook(point, args):
            x = _sample_rows(args[0], max_rows, gen)
            rates[name] = calibrate_point_rate(point, x, firing_rate, rounds=rounds)

        return hook

    def stop(module, inputs, output):
        raise _Reached

    handles = [sp.register_forward_pre_hook(calibrate(name)) for name, sp in sites]
    handles.append(student.layers[-1].register_forward_hook(stop))
    try:
        student(torch.cat(batches))
    except _Reached:
        pass
    finally:
        for h in handles:
            h.remove()
    missing = [name for name, _ in sites if name not in rates]
    if missing:
        raise ValueError(f"student: the forward pass never reached the spike points {missing}")
    return {name: rates[name] for name, _ in sites}


@torch.no_grad()
def _measured_rate(student: MARLM, tokens: torch.Tensor) -> float | None:
    """Nonzero spikes per (micro-step, activation) over all spike points on ``tokens``."""
    points = [m for _, m in _spike_points(student)]
    if not points:
        return None
    for sp in points:
        sp.record = True
    try:
        student(tokens)
        nonzero = sum(int((sp.spikes != 0).sum()) for sp in points)
        total = sum(sp.spikes.numel() for sp in points)
    finally:
        for sp in points:
            sp.record, sp.spikes = False, None
    return nonzero / total


@torch.no_grad()
def _loss(model: nn.Module, windows: torch.Tensor, batch_size: int) -> float:
    total, count = 0.0, 0
    for i in range(0, windows.shape[0], batch_size):
        w = windows[i : i + batch_size]
        logits = model(w[:, :-1]).float()
        total += F.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten(), reduction="sum").item()
        count += w[:, 1:].numel()
    return total / count


@dataclass
class ConvertResult:
    """What :func:`convert` made and measured (losses in nats/token, energies in pJ/token)."""

    student: MARLM
    dense: MARLM
    tokenizer: Any
    calibration_rates: dict[str, float]
    dense_loss: float
    student_loss: float
    dense_energy_pj: float
    student_energy_pj: float
    student_firing_rate: float | None
    hardware: str
    checkpoint: str | None
    seconds: float

    def summary(self) -> str:
        """One line: the change in loss and energy."""
        ratio = (
            self.dense_energy_pj / self.student_energy_pj if self.student_energy_pj else math.inf
        )
        # a student that spends more than its dense model (many micro-steps, a high rate) says so
        change = f"{ratio:.2f}× less" if ratio >= 1 else f"{1 / ratio:.2f}× more"
        rate = "" if self.student_firing_rate is None else (
            f", firing rate {100 * self.student_firing_rate:.1f} %")  # fmt: skip
        where = f"{self.checkpoint}: " if self.checkpoint else ""
        return (
            f"{where}validation loss {self.dense_loss:.4f} → {self.student_loss:.4f} nats/token "
            f"({self.student_loss - self.dense_loss:+.4f}); energy {self.dense_energy_pj:.4g} → "
            f"{self.student_energy_pj:.4g} pJ/token ({change}, {self.hardware})"
            f"{rate}"
        )


def convert(
    source: str | Path | MARLM,
    out: str | Path | None = None,
    *,
    spikes: SpikeConfig | dict[str, Any] | None = None,
    spiking: bool | Sequence[bool] = True,
    points: Mapping[str, str | dict] | None = None,
    firing_rate: float = 0.2,
    data: str | Path | None = None,
    tokenizer: Any = None,
    calib_batches: int = 4,
    eval_batches: int = 4,
    batch_size: int = 4,
    L: int = 128,
    hardware: str = "45nm-fp32",
    seed: int = 0,
    device: str = "cpu",
) -> ConvertResult:
    """Make the spiking student of ``source`` (see the module docstring); with ``out``, save it
    as a spikemar checkpoint with its tokenizer. ``spiking`` selects layers, or ``points`` the
    spike points (``MARConfig.points`` settings; the others stay dense). ``data``: the
    calibration/validation text (a file or folder; default Tiny Shakespeare), tokenized with
    the model's tokenizer. ``tokenizer``: None, the source's own; a tokenizer object, or a
    directory, ``tokenizer.json`` or Hub id to load one from (a checkpoint that ships none)."""
    from . import energy
    from ._io import check_output_path
    from .checkpoint import save_checkpoint
    from .data import TokenDataset

    start = time.perf_counter()
    calib_batches = check_count("calib_batches", calib_batches)
    eval_batches = check_count("eval_batches", eval_batches)
    batch_size, L = check_count("batch_size", batch_size), check_count("L", L)
    firing_rate, seed = _fraction(firing_rate), check_seed(seed)
    energy.get_profile(hardware)  # before any work: a bad name fails now, not after calibration
    if out is not None:  # before any work: a folder or an unwritable place fails now
        check_output_path(out, name="out")
    if isinstance(source, MARLM):
        dense = source.eval()
        if tokenizer is None:
            tokenizer = getattr(source, "tokenizer", None)
        elif isinstance(tokenizer, str | os.PathLike):
            from .models.hub import tokenizer_from

            tokenizer = tokenizer_from(tokenizer)
    elif tokenizer is None or isinstance(tokenizer, str | os.PathLike):  # the source's, or from
        dense, tokenizer = load_dense(source, device, True if tokenizer is None else tokenizer)
    else:  # a tokenizer object
        dense, _ = load_dense(source, device, tokenizer=False)
    if tokenizer is None:
        raise ValueError("tokenizer: the model has none; pass the tokenizer of its vocabulary")
    if tokenizer.vocab_size > dense.config.vocab_size:
        raise ValueError(f"tokenizer: {tokenizer.vocab_size} ids exceed the model's vocabulary "
                         f"of {dense.config.vocab_size}")  # fmt: skip
    spike_config = spikes if isinstance(spikes, SpikeConfig) else SpikeConfig(**(spikes or {}))
    student = spiking_student(dense, spike_config, spiking, points)
    if not any(True for _ in student.spike_points()):
        raise ValueError("points: the selection leaves no spiking point to calibrate")
    corpus = TokenDataset.from_text_file(data, tokenizer=tokenizer)
    gen = torch.Generator().manual_seed(seed)
    dev = next(dense.parameters()).device
    calib = [corpus.batch("train", batch_size, L, generator=gen)[0].to(dev)
             for _ in range(calib_batches)]  # fmt: skip
    rates = calibrate_thresholds(student, dense, calib, firing_rate, seed=seed, sequential=True)
    windows = corpus.windows("val", L, max_windows=eval_batches * batch_size).to(dev)
    dense_loss = _loss(dense, windows, batch_size)
    student_loss = _loss(student, windows, batch_size)
    probe = windows[:batch_size, :-1]
    reports = [energy.profile(m, probe, hardware=hardware) for m in (dense, student)]
    dense_pj, student_pj = (r.per_token()["energy_pj"] for r in reports)
    mean_rate = _measured_rate(student, probe)
    checkpoint = None
    if out is not None:
        provenance = {
            "command": "spikemar convert",
            "source": str(source) if not isinstance(source, MARLM) else "in-memory model",
            "data": str(data) if data is not None else "Tiny Shakespeare",
            "seed": seed,
            "points": None if points is None else dict(points),
            "result": {"dense_loss": dense_loss, "student_loss": student_loss,
                       "dense_energy_pj_per_token": dense_pj,
                       "student_energy_pj_per_token": student_pj, "hardware": hardware,
                       "firing_rate_target": firing_rate, "calibration_rates": rates},
        }  # fmt: skip
        checkpoint = str(save_checkpoint(out, student, tokenizer, provenance=provenance))
    student.tokenizer = tokenizer
    return ConvertResult(student, dense, tokenizer, rates, dense_loss, student_loss, dense_pj,
                         student_pj, mean_rate, hardware, checkpoint,
                         time.perf_counter() - start)  # fmt: skip


# -- the command line -----------------------------------------------------------------------------


def _layers(text: str) -> list[int] | None:
    if text == "all":
        return None
    try:
        return sorted({int(t) for t in text.split(",") if t.strip()})
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            f"expected 'all' or comma-separated layer indices, got {text!r}"
        ) from err


def read_spike_points(text: str) -> dict[str, str | dict]:
    """``--spike-points``: a JSON file (``{pattern: setting}``, or ``spikemar refine``'s
    ``plan.json`` whose ``points`` are that), or comma-separated point names or patterns, each
    made ``'spike'``. Settings are checked when the student is built."""
    path = Path(text)
    if path.suffix == ".json" or path.is_file():
        if not path.is_file():
            raise ValueError(f"spike_points: no file {path}")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"spike_points: {path} is not JSON ({err})") from None
        if isinstance(data, dict) and isinstance(data.get("points"), dict):
            data = data["points"]  # spikemar refine's plan.json
        if not isinstance(data, dict) or not data or not all(isinstance(k, str) for k in data):
            raise ValueError(f"spike_points: {path} holds no {{pattern: setting}} object (or a "
                             "plan.json with 'points')")  # fmt: skip
        return data
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise ValueError(f"spike_points: expected point names or a JSON file, got {text!r}")
    return {name: "spike" for name in names}


def add_convert_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Declare the options of ``spikemar convert`` on ``parser``."""
    from ._argtypes import add_tokenizer_argument, device_argument, int_at_least_1, positive_float

    p = parser
    p.add_argument("--from", dest="source", required=True,
                   help="a Hugging Face Mamba-2/Llamba directory or Hub id, or a spikemar "
                        "checkpoint of an SSM LM")  # fmt: skip
    add_tokenizer_argument(p, "the source's")
    p.add_argument("--out", required=True, help="where to write the student checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing checkpoint at --out")  # fmt: skip
    p.add_argument("--T", type=int_at_least_1, default=4, help="micro-steps per spike point")
    p.add_argument("--tau", type=positive_float, default=1.0, help="ATMN τ")
    p.add_argument("--neuron", choices=("atmn", "binary", "ternary-single"), default="atmn")
    p.add_argument("--threshold", choices=("channel", "layer"), default="channel",
                   help="one threshold per channel, or one per spike point")  # fmt: skip
    where = p.add_mutually_exclusive_group()
    where.add_argument("--spike-layers", type=_layers, default=None, metavar="all|I,J,...",
                       help="layers that get MAR's spike points (default: all)")  # fmt: skip
    where.add_argument("--spike-points", default=None, metavar="NAMES|FILE.json",
                       help="only these spike points spike: comma-separated names or patterns "
                            "(layers.0.mixer.spike_in, layers.*.ffn.*), or a JSON file of "
                            "per-point settings ({pattern: setting}, or spikemar refine's "
                            "plan.json); every spiking point is calibrated")  # fmt: skip
    p.add_argument("--firing-rate", type=positive_float, default=0.2,
                   help="target fraction of nonzero spikes per micro-step")  # fmt: skip
    p.add_argument("--data", default=None,
                   help="calibration/validation text: a file, .jsonl or folder (default: Tiny "
                        "Shakespeare)")  # fmt: skip
    p.add_argument("--calib-batches", type=int_at_least_1, default=4,
                   help="batches of --data the thresholds are calibrated on")  # fmt: skip
    p.add_argument("--eval-batches", type=int_at_least_1, default=4,
                   help="validation batches the losses are measured on")  # fmt: skip
    p.add_argument("--batch-size", type=int_at_least_1, default=4, help="windows per batch")
    p.add_argument("--L", type=int_at_least_1, default=128, help="tokens per window")
    p.add_argument("--hardware", default="45nm-fp32", help="energy profile")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration batches")
    p.add_argument("--device", type=device_argument, default="cpu",
                   help="cpu, cuda or cuda:N (checked when given)")  # fmt: skip
    return p


# the library's argument names that the command's flags call otherwise (path, text: of --data)
_FLAGS = {"path_or_id": "from", "source": "from", "points": "spike_points", "path": "data",
          "text": "data"}  # fmt: skip


def _flag_message(message: str, args: argparse.Namespace) -> str:
    """A library error as the command line says it: the flag (``--data``) for an argument's
    name, ``--from SOURCE`` for whatever is about the source (its directory, config, tensors,
    tokenizer or checkpoint), which the library names by its path or by those words."""
    message = command_line_hint(message)
    source = str(args.source)
    if message.startswith(f"{source}: "):  # a directory's problem, named by its path
        return f"--from {message}"
    name, sep, rest = message.partition(": ")
    if sep and name.startswith("points[") and args.spike_points is not None:
        return f"--spike-points: {message}"  # one point's setting in the file: points['NAME']
    if not (sep and name.isidentifier()):
        return message
    if rest.startswith(f"{source} "):  # "tokenizer: DIR has no tokenizer", "checkpoint: ..."
        return f"--from: {rest}"
    if name in _FLAGS or vars(args).get(name) is not None:  # a flag that was given
        return f"--{_FLAGS.get(name, name).replace('_', '-')}: {rest}"
    return f"--from {source}: {message}"  # tokenizer, checkpoint, config, tensors, dense, ...


def convert_main(args: argparse.Namespace) -> int:
    from ._argtypes import is_machine_failure

    spikes = {"T": args.T, "tau": args.tau, "neuron": args.neuron, "threshold": args.threshold}
    try:
        from ._io import check_output_path

        if check_output_path(args.out, name="out").exists() and not args.overwrite:
            raise FileExistsError(f"out: {args.out} exists; pass --overwrite to replace it")
        spiking: bool | list[bool] = True
        if args.spike_layers is not None:
            n = _layer_count(args.source)
            bad = [i for i in args.spike_layers if not 0 <= i < n]
            if bad:
                raise ValueError(f"spike_layers: {bad} outside the model's layers 0..{n - 1}")
            spiking = [i in args.spike_layers for i in range(n)]
        points = None if args.spike_points is None else read_spike_points(args.spike_points)
        result = convert(
            args.source, args.out, spikes=spikes, spiking=spiking, points=points,
            firing_rate=args.firing_rate,
            data=args.data, tokenizer=args.tokenizer,
            calib_batches=args.calib_batches, eval_batches=args.eval_batches,
            batch_size=args.batch_size, L=args.L, hardware=args.hardware, seed=args.seed,
            device=args.device,
        )  # fmt: skip
    except (ValueError, TypeError, OSError) as err:  # ConnectionError is an OSError
        if is_machine_failure(err):  # a full disk: the run failed (exit 1), the input did not
            raise _failed_run(err, args) from err
        args._parser.error(_flag_message(str(err), args))
    print(result.summary())
    return 0


def _failed_run(err: OSError, args: argparse.Namespace) -> OSError:
    """A full disk (quota, file-size limit, I/O error) as the command line says it, with its
    errno, for :func:`spikemar.cli.main` to print as a failed run: the student checkpoint's
    write (``checkpoint: cannot write``) is --out's; the token cache's names its own file."""
    message = str(err)
    if message.startswith("checkpoint: "):
        message = "--out: " + message.removeprefix("checkpoint: ")
    from ._io import reworded

    return reworded(err, _flag_message(message, args))


def _layer_count(source: str) -> int:
    path = Path(source)
    if path.is_file():
        from .checkpoint import load_checkpoint

        return load_checkpoint(path)[0].config.n_layers
    from .models.hub import read_pretrained_config, resolve_pretrained
    from .models.pretrained import config_from_hf

    return config_from_hf(read_pretrained_config(resolve_pretrained(source))).n_layers
