"""``spikemar refine``: measure → plan → SBDS stage 2 → evaluate, in one command.

    spikemar refine --teacher runs/dense.pt --budget-energy 5 --out runs/refine --steps 500

Writes into ``--out`` (a folder), one file per finished stage, which is what ``--resume`` reads:
``measurements.json`` (the sensitivity table; ``measurements.partial.json`` holds the modules
measured so far while it is made, from which ``--resume`` continues), ``plan.json`` (the
schedule: ``MARConfig.points`` and its predicted KL and energy ratio), ``calibration.json``
and ``init.pt`` (the planned student before training, its thresholds calibrated),
``student.pt`` (after SBDS stage 2: ``spikemar distill``'s checkpoint, resumable),
``pareto.png`` and ``result.json``. Measurement windows come from the start of the training
split, never the validation split that evaluates the student.

Calibration (``--calibrate``): the plan fixes one V₀ per point; calibration sets per-channel
thresholds on the teacher's activations at each point's *planned firing rate* (so the plan's
energy stays: a point's ACs are its spike count times one fan-out), with
:func:`spikemar.refine.calibrate`. ``auto`` keeps them only when they lower the KL on the
measurement windows (on the packaged teacher they did not: equal per-channel rates spend spikes
on channels that carry little), ``on`` always keeps them, ``off`` skips the step.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .._argtypes import (
    add_tokenizer_argument,
    finite_positive_float,
    int_at_least_1,
    is_machine_failure,
    positive_float,
)
from .._io import cannot_write
from ..training import add_loop_arguments, loop_settings

__all__ = ["add_refine_arguments", "refine_main"]


def _option(text: str) -> dict[str, Any]:
    """``T=4,v_threshold=0.5`` → {'T': 4, 'v_threshold': 0.5}, checked as a spike-point setting
    (a bad field or value is argparse's one line, before the teacher is loaded)."""
    from .measure import check_setting

    out: dict[str, Any] = {}
    for part in text.split(","):
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise argparse.ArgumentTypeError(f"expected key=value[,key=value...], got {text!r}")
        value = value.strip()
        try:
            out[key.strip()] = int(value) if key.strip() == "T" else float(value)
        except ValueError:
            out[key.strip()] = value
    try:
        return check_setting(repr(text), out)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _energy_ratio(text: str) -> float:
    """An energy budget: teacher/student energy, a ratio >= 1 (checked before any work)."""
    value = finite_positive_float(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a ratio >= 1 (teacher/student energy), got "
                                         f"{text!r}")  # fmt: skip
    return value


def add_refine_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Declare the options of ``spikemar refine`` on ``parser``."""
    p = parser
    p.add_argument("--teacher", required=True,
                   help="a dense SSM LM: a spikemar checkpoint (mar-dense) or a Hugging Face "
                        "Mamba-2/Llamba directory")  # fmt: skip
    add_tokenizer_argument(p, "the teacher's")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--budget-energy", type=_energy_ratio, default=None,
                        help="least predicted KL at teacher/student energy >= X")  # fmt: skip
    budget.add_argument("--budget-kl", type=positive_float, default=None,
                        help="most energy saved at predicted KL <= this (nats/token)")  # fmt: skip
    add_loop_arguments(p, out="runs/refine")
    r = p.add_argument_group("measurement")
    r.add_argument("--option", dest="options", type=_option, action="append", default=None,
                   help="a spike setting measured at every point, e.g. T=4,v_threshold=0.5 "
                        "(repeat; default: T=4 at V 0.25/0.5/1 and T=2 at V 0.5)")  # fmt: skip
    r.add_argument("--sparsify-topk", type=float, default=0.25,
                   help="FFN points also measured top-k sparsified keeping this fraction, "
                        "under a zero-skipping --hardware profile (…+zs) that prices it "
                        "(0: not measured)")  # fmt: skip
    r.add_argument("--calib-windows", type=int_at_least_1, default=16,
                   help="measurement windows (--L tokens, training split)")  # fmt: skip
    r.add_argument("--stage1", type=Path, default=None, metavar="CHECKPOINT",
                   help="a stage-1 student of the teacher (spikemar distill --stage 1): "
                        "each attention layer it replaces by an SSM is one more module to "
                        "plan")  # fmt: skip
    r.add_argument("--hardware", default="45nm-fp32", help="energy profile")
    r.add_argument("--calibrate", choices=("auto", "on", "off"), default="auto",
                   help="per-channel thresholds at each point's planned firing rate before "
                        "stage 2: kept when they lower the KL (auto), always (on), or not "
                        "computed (off)")  # fmt: skip
    return p


def _calibrated_student(args, teacher, points, windows, stage1) -> tuple[Any, dict[str, Any]]:
    """The planned student, its thresholds calibrated as ``--calibrate`` says, and a record of
    what calibration did."""
    import torch

    from .calibrate import calibrate, firing_rates
    from .measure import build_student, kl_and_loss

    student = build_student(teacher, points, stage1)
    planned_kl, _ = kl_and_loss(teacher, student, windows)
    record: dict[str, Any] = {"mode": args.calibrate, "kl_planned_v": planned_kl}
    if args.calibrate == "off" or not list(student.spike_points()):
        return student, {**record, "kept": False}
    batches = [windows[:, :-1]]
    saved = {k: v.clone() for k, v in student.state_dict().items() if k.endswith("neuron.a")}
    rates = firing_rates(student, teacher, batches)
    calibrate(student, teacher, batches, firing_rate=rates)
    calibrated_kl, _ = kl_and_loss(teacher, student, windows)
    kept = args.calibrate == "on" or calibrated_kl < planned_kl
    if not kept:
        with torch.no_grad():
            student.load_state_dict(saved, strict=False)
    record.update(kl_calibrated=calibrated_kl, kept=kept, planned_rates=rates)
    return student, record


def _teacher_id(teacher: str) -> str:
    """How a run records its teacher: an existing path resolved, else the text (a Hub id)."""
    path = Path(teacher)
    return str(path.resolve()) if path.exists() else str(teacher)


def _read_json(path: Path) -> Any:
    """A stage file of the run at ``--out``; one that does not read names itself."""
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
        raise ValueError(f"resume: {path} is not readable JSON ({err}); --overwrite starts "
                         "again") from None  # fmt: skip


def _sparsify(topk: float) -> tuple[dict[str, Any], ...]:
    """``--sparsify-topk`` as ``measure``'s ``sparsify`` settings (0: none)."""
    return ({"sparsify": "topk", "amount": topk},) if topk else ()


def _check_resumed(
    m: Any, teacher_id: str, hardware: str, options: list[dict[str, Any]], sparsify_topk: float,
    out: Path,
) -> None:  # fmt: skip
    """One line when ``--resume`` would continue a run measured for another teacher, with other
    options or under another profile (its plan, initial student and stage 2 would not fit this
    one)."""
    from ..energy import get_profile

    saved = m.info.get("teacher")  # runs written before it was recorded have none
    if saved is not None and saved != teacher_id:
        raise ValueError(f"resume: {out} was measured for teacher {saved}, not {teacher_id}; "
                         "give that --teacher, or --overwrite to start again")  # fmt: skip
    saved_options = m.info.get("options")
    if saved_options is not None and saved_options != options:
        raise ValueError(f"resume: {out} was measured with --option {saved_options}, not "
                         f"{options}; give those, or --overwrite to start again")  # fmt: skip
    if get_profile(m.hardware).name != get_profile(hardware).name:
        raise ValueError(
            f"resume: {out} was measured under --hardware {m.hardware}, not {hardware}; give "
            "that profile, or --overwrite to start again"
        )
    saved_sparsify = m.info.get("sparsify")  # what was measured: nothing on dense hardware
    if saved_sparsify is not None and get_profile(hardware).zero_skipping \
            and saved_sparsify != list(_sparsify(sparsify_topk)):  # fmt: skip
        amount = saved_sparsify[0]["amount"] if saved_sparsify else 0
        raise ValueError(f"resume: {out} was measured with --sparsify-topk {amount:g}, not "
                         f"{sparsify_topk:g}; give that, or --overwrite to start "
                         "again")  # fmt: skip


# what a run writes into --out, in order; --overwrite removes them before its first stage
_STAGE_FILES = ("measurements.partial.json", "measurements.json", "plan.json", "calibration.json",
                "init.pt", "student.pt", "result.json", "pareto.png")  # fmt: skip


@contextlib.contextmanager
def _full_disk_names_out(path: Path) -> Iterator[None]:
    """A full disk under the write of ``path`` (a file in --out) by a writer that names it as
    its own argument ('checkpoint: ', 'path: ') or not at all ('[Errno 28] ...') names --out
    and ``path``, as the command's other writes do; a write of another file (the token cache,
    which distill may make) keeps its own name."""
    try:
        yield
    except OSError as err:
        if not is_machine_failure(err):
            raise
        unnamed = err.strerror is not None  # the system's own error, not a writer's message
        if not (unnamed or str(err).startswith(("checkpoint: ", "path: "))):
            raise
        raise cannot_write(err, path, "--out") from err


def _say(args: argparse.Namespace, text: str) -> None:
    print(f"refine: {text}", file=sys.stderr, flush=True)


def refine_main(args: argparse.Namespace) -> int:
    from .. import energy
    from .._io import atomic_write
    from ..checkpoint import load_checkpoint, save_checkpoint
    from ..convert import load_dense
    from ..data import CharTokenizer, TokenDataset
    from ..distill.trainer import DistillConfig, distill
    from .measure import (
        DEFAULT_OPTIONS,
        Measurements,
        check_hardware,
        kl_and_loss,
        measure,
        replaceable_layers,
    )
    from .plan import pareto_plot, plan

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"out: {out} is a file; refine writes a folder")
    for above in out.parents:  # before any work (the first module's table failed to save)
        if above.exists():
            if not above.is_dir():
                raise NotADirectoryError(f"out: cannot make the folder {out}: {above} is a "
                                         "file")  # fmt: skip
            break
    done = out / "measurements.json"
    partial = out / "measurements.partial.json"  # the modules measured so far
    if (done.exists() or partial.exists()) and not (args.resume or args.overwrite):
        raise FileExistsError(f"out: {out} holds a refine run; pass --resume to continue it or "
                              "--overwrite to start again")  # fmt: skip
    resume = args.resume and not args.overwrite
    if not 0 <= args.sparsify_topk <= 1:
        raise ValueError(f"sparsify-topk: expected a fraction in [0, 1], got {args.sparsify_topk}")
    check_hardware(args.hardware)  # a profile that cannot price the trade: before any work
    teacher_id = _teacher_id(args.teacher)
    table = done if done.exists() else partial
    before = Measurements.load(table) if resume and table.exists() else None
    if before is not None:  # the run at --out must be this teacher's, on this profile
        options = [dict(o) for o in (args.options or DEFAULT_OPTIONS)]
        _check_resumed(before, teacher_id, args.hardware, options, args.sparsify_topk, out)
    from ..models.hub import command_line_hint

    try:
        source = True if args.tokenizer is None else args.tokenizer
        teacher, tokenizer = load_dense(args.teacher, args.device, tokenizer=source,
                                        spiking_ok=False)  # fmt: skip
    except (FileNotFoundError, ValueError) as err:  # name the option, not the loader's argument
        message = command_line_hint(str(err))
        if args.tokenizer is not None and message.startswith("tokenizer: "):
            raise type(err)(message) from err  # --tokenizer's own problem
        raise type(err)(f"teacher: {message}") from err
    # a character-level teacher: the vocabulary comes from the text (distill checks they agree)
    pretrained = tokenizer is not None and not isinstance(tokenizer, CharTokenizer)
    try:
        data = TokenDataset.from_text_file(args.data, tokenizer=tokenizer if pretrained else None)
    except (FileNotFoundError, ValueError) as err:  # the loader names its argument 'path'
        message = str(err)
        if not message.startswith("path: "):
            raise
        raise type(err)(f"data: {message.removeprefix('path: ')}") from err
    windows = data.windows("train", args.L, args.calib_windows).to(args.device)
    stage1 = None
    if args.stage1 is not None:
        if not Path(args.stage1).is_file():
            raise FileNotFoundError(f"stage1: no checkpoint at {args.stage1}")
        stage1, _, _ = load_checkpoint(args.stage1, map_location=args.device)
        stage1.eval()
    if args.overwrite:  # a stage file of the old run must not pass for one of this run's
        for name in _STAGE_FILES:
            (out / name).unlink(missing_ok=True)

    # 1. measure
    if before is not None:
        replaced = {str(i): k for i, k in replaceable_layers(teacher, stage1).items()}
        saved = before.info.get("replaced_layers")
        if saved is not None and saved != replaced:  # the table's modules would not fit
            raise ValueError(f"resume: {out} was measured with the stage-1 replacements "
                             f"{saved or 'none'}, not {replaced or 'none'}; give the same "
                             "--stage1, or --overwrite to start again")  # fmt: skip
    if before is not None and table == done:
        m = before
        _say(args, f"measurements read from {done}")
    else:
        if before is not None and before.info.get("windows") != list(windows.shape):
            raise ValueError(f"resume: {partial} was measured on windows "
                             f"{before.info.get('windows')}, not {list(windows.shape)} (--L, "
                             "--calib-windows); give those, or --overwrite to start "
                             "again")  # fmt: skip
        if before is not None:
            _say(args, f"measurement continued from {partial} ({len(before.modules)} modules)")

        def keep(so_far: Measurements) -> None:  # after each module: what --resume continues
            so_far.info["teacher"] = teacher_id
            so_far.save(partial, name="--out")

        m = measure(teacher, windows, options=tuple(args.options or DEFAULT_OPTIONS),
                    sparsify=_sparsify(args.sparsify_topk), hardware=args.hardware, stage1=stage1,
                    progress=lambda s: _say(args, s),
                    done=None if before is None else before.modules, on_module=keep)  # fmt: skip
        m.info["teacher"] = teacher_id  # what --resume checks
        m.save(done, name="--out")
        partial.unlink(missing_ok=True)
    # 2. plan
    try:
        if args.budget_energy is not None:
            chosen = plan(m, energy_ratio=args.budget_energy)
        else:
            chosen = plan(m, max_kl=args.budget_kl)
    except ValueError as err:  # out of reach: name the option, and what is kept
        name, _, rest = str(err).partition(": ")
        flag = {"energy_ratio": "budget-energy", "max_kl": "budget-kl"}.get(name, name)
        raise ValueError(f"{flag}: {rest} ({done} is kept: --resume with another budget plans "
                         "from it)") from err  # fmt: skip
    if resume and (out / "init.pt").exists() and (out / "plan.json").is_file():
        # the student at --out was built from the saved plan: another budget would plan another
        # student, whose numbers the results would report beside this one's
        saved = _read_json(out / "plan.json")
        if saved.get("points") != chosen.to_json()["points"]:
            raise ValueError(f"resume: {out} was planned for budget {saved.get('budget')}, which "
                             f"chose another schedule than {chosen.budget}; give that budget, or "
                             "--overwrite to start again")  # fmt: skip
    chosen.save(out / "plan.json", name="--out")
    spiking = sum(1 for s in chosen.points.values() if s != "dense")
    _say(args, f"plan: {spiking}/{len(chosen.points)} points refined, predicted KL "
               f"{chosen.predicted_kl:.4g}, energy ratio {chosen.energy_ratio:.3g}x")  # fmt: skip
    init, calib_path = out / "init.pt", out / "calibration.json"
    if resume and init.exists() and calib_path.exists():
        calibration = _read_json(calib_path)
        if calibration.get("mode", args.calibrate) != args.calibrate:  # init.pt was made so
            raise ValueError(f"resume: {out} was calibrated with --calibrate "
                             f"{calibration['mode']}, not {args.calibrate}; give that, or "
                             "--overwrite to start again")  # fmt: skip
    else:
        student, calibration = _calibrated_student(args, teacher, chosen.points, windows, stage1)
        with atomic_write(calib_path, name="--out") as tmp:
            tmp.write_text(json.dumps(calibration, indent=1))
        with _full_disk_names_out(init):
            save_checkpoint(init, student, tokenizer or data.tokenizer)
    if "kl_calibrated" in calibration:  # not when --calibrate off or the plan spikes nowhere
        _say(args, f"calibration: KL {calibration['kl_planned_v']:.4g} at the planned V, "
                   f"{calibration['kl_calibrated']:.4g} calibrated; "
                   f"{'kept' if calibration['kept'] else 'not kept'}")  # fmt: skip
    initial, _, _ = load_checkpoint(init, map_location=args.device)
    initial_kl, _ = kl_and_loss(teacher, initial, windows)
    # 3. SBDS stage 2 on the planned student
    settings = {**loop_settings(args), "out": str(out / "student.pt")}
    student_path = out / "student.pt"
    config = DistillConfig(**settings, stage=2, teacher=args.teacher, student=str(init),
                           tokenizer=args.tokenizer)  # fmt: skip
    with _full_disk_names_out(student_path):
        result = distill(config, resume=resume and student_path.exists(),
                         progress=not args.no_progress)  # fmt: skip
    # 4. evaluate: KL on the measurement windows, energy on validation windows
    student, _, _ = load_checkpoint(student_path, map_location=args.device)
    trained_kl, _ = kl_and_loss(teacher, student, windows)
    val = data.windows("val", args.L, 2).to(args.device)[:, :-1]
    teacher_energy = energy.profile(teacher, val, hardware=args.hardware)

    def val_ratio(model: Any) -> float | None:  # teacher / model energy on the same windows
        cmp = energy.compare(energy.profile(model, val, hardware=args.hardware), teacher_energy)
        return None if cmp.savings is None else float(cmp.savings)

    # both measured points of the figure at counted ratios (before stage 2 it showed the plan's
    # predicted ratio beside a measured KL)
    ratio, initial_ratio = val_ratio(student), val_ratio(initial)
    summary = {
        "plan": chosen.to_json(), "calibration": {k: v for k, v in calibration.items()
                                                  if k != "planned_rates"},
        "initial_kl": initial_kl, "trained_kl": trained_kl,
        "initial_energy_ratio": initial_ratio,
        "val_loss": result["best_val"], "teacher_val_loss": result["teacher_val"],
        "unit": result["unit"], "energy_ratio": ratio, "hardware": args.hardware,
        "steps": args.steps,
    }  # fmt: skip
    with atomic_write(out / "result.json", name="--out") as tmp:
        tmp.write_text(json.dumps(summary, indent=1))
    measured = {"plan, before stage 2": (initial_ratio, initial_kl),
                "plan, after stage 2": (ratio, trained_kl)}  # fmt: skip
    measured = {k: v for k, v in measured.items() if v[0] is not None}
    with _full_disk_names_out(out / "pareto.png"):
        pareto_plot(m, [chosen], out / "pareto.png", measured=measured)
    shown = "-" if ratio is None else f"{ratio:.3g}x"
    # the plan meets the budget on its first-order estimate (the measurement windows); the
    # counted ratio on the validation windows can fall a little short: say so
    short = (args.budget_energy is not None and ratio is not None
             and ratio < args.budget_energy)  # fmt: skip
    missed = (f", below --budget-energy {args.budget_energy:g}x, which the plan met on its "
              "estimate from the measurement windows" if short else "")  # fmt: skip
    print(f"{student_path}: validation loss {result['best_val']:.4f} {result['unit']} (teacher "
          f"{result['teacher_val']:.4f}), energy ratio {shown} ({args.hardware}{missed}), KL "
          f"{chosen.predicted_kl:.3g} predicted / {initial_kl:.3g} before / {trained_kl:.3g} "
          "after stage 2")  # fmt: skip
    return 0
