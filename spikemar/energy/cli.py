"""``spikemar energy``: count and price a model's forward pass from the command line.

The command's two halves, for :mod:`spikemar.cli` to wire in::

    from spikemar.energy.cli import add_energy_arguments, energy_main
    p = subparsers.add_parser("energy", help=...); add_energy_arguments(p)
    p.set_defaults(func=energy_main)          # energy_main(args) -> exit code

It runs the packaged student (the model ``spikemar demo`` prices, by default), a tiny random MAR
LM (``--model demo``, byte-level tokens, :mod:`spikemar.energy.demo`) or a spikemar checkpoint
(its own tokenizer) on a text or random tokens; its first line names the model it prices. It
prints the per-layer table and writes JSON, Markdown and PNG reports on request;
``--compare-dense`` (or ``--teacher CKPT``) also profiles the dense twin (or the teacher) and
prints the comparison.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._argtypes import int_at_least_1 as _int_at_least_1
from .._argtypes import is_machine_failure
from .._io import atomic_write, cannot_write, check_output_path
from .breakeven import break_even
from .counter import SPIKE_DETECTIONS, profile
from .demo import VOCAB, demo_model, dense_demo_model, packaged_student_path
from .profiles import available_profiles, get_profile, memory_sibling
from .report import EnergyComparison, compare, compare_profiles

__all__ = ["add_energy_arguments", "energy_main"]


def add_energy_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Declare the options of ``spikemar energy`` on ``parser``."""
    src = parser.add_mutually_exclusive_group()
    src.add_argument(
        "--model",
        choices=("student", "demo", "demo-dense"),
        default="student",
        help="built-in model: 'student' (default), the packaged spiking student that "
        "`spikemar demo` runs; 'demo', a tiny random-weight spiking MAR LM (--d, --layers, --T); "
        "'demo-dense', its dense twin",
    )
    src.add_argument(
        "--checkpoint",
        type=Path,
        help="a spikemar checkpoint (spikemar train, convert), or a Hugging Face Mamba-2/Llamba "
        "directory or Hub id (its dense model); --text is encoded with its tokenizer",
    )
    parser.add_argument(
        "--teacher",
        type=Path,
        help="a checkpoint, or a Hugging Face Mamba-2/Llamba directory or Hub id (a converted "
        "student's teacher), to compare against (default with --compare-dense: the dense twin "
        "of --checkpoint, with its weights)",
    )
    data = parser.add_mutually_exclusive_group()
    data.add_argument(
        "--text",
        help="input text, encoded with the checkpoint's tokenizer (the demo model without one "
        "reads its UTF-8 bytes as token ids)",
    )
    data.add_argument("--text-file", type=Path, help="read the input text from this file")
    data.add_argument(
        "--random-tokens",
        type=_int_at_least_1,
        default=64,
        metavar="L",
        help="L random token ids of the model's vocabulary per sequence (default 64; used when "
        "no text is given)",
    )
    parser.add_argument("--batch", type=_int_at_least_1, default=1, help="sequences (default 1)")
    parser.add_argument(
        "--hardware",
        default="45nm-fp32",
        help=f"energy profile (default 45nm-fp32; built in: {', '.join(available_profiles())})",
    )
    parser.add_argument("--T", type=_int_at_least_1, default=4, help="demo micro-steps (4)")
    parser.add_argument("--d", type=_int_at_least_1, default=64, help="demo width (64)")
    parser.add_argument("--layers", type=_int_at_least_1, default=2, help="demo blocks (2)")
    parser.add_argument(
        "--spike-detection", choices=SPIKE_DETECTIONS, default="auto", help="(default auto)"
    )
    parser.add_argument(
        "--compare-dense",
        action="store_true",
        help="also profile the model's dense twin (same weights, no spikes) and print both",
    )
    parser.add_argument(
        "--memory",
        action="store_true",
        help="also price memory traffic (the profile's +mem sibling, e.g. 45nm-fp32+mem): "
        "compute and memory per layer, break-even firing rates, and with --compare-dense or "
        "--teacher the ratio under each profile",
    )
    parser.add_argument(
        "--json",
        type=Path,
        help="write the report as JSON here (with --memory its break-even rates, with a "
        "comparison the ratios printed)",
    )
    parser.add_argument(
        "--markdown", type=Path, help="write the report as Markdown here (with what is printed)"
    )
    parser.add_argument(
        "--png",
        type=Path,
        help="write energy by layer as a PNG here (with a comparison: both models per token)",
    )
    parser.add_argument(
        "--per-token", action="store_true", help="PNG per token instead of per forward pass"
    )
    parser.add_argument("--seed", type=int, default=0, help="weights and random tokens (0)")
    return parser


def _load_model(args: argparse.Namespace) -> tuple[nn.Module, Any, str]:
    """The model, its tokenizer (None for the byte-level demo) and a line naming it."""
    if args.checkpoint is None and args.model == "demo-dense":
        what = f"the dense twin of the random-weight demo MAR LM (d {args.d}, {args.layers} layers)"
        return dense_demo_model(args.d, args.layers, seed=args.seed), None, what
    if args.checkpoint is None and args.model == "demo":
        what = (
            f"the random-weight demo MAR LM (d {args.d}, {args.layers} layers, T {args.T}, "
            f"seed {args.seed})"
        )
        return demo_model(args.d, args.layers, args.T, seed=args.seed), None, what
    path = args.checkpoint
    if path is None:
        try:
            path = packaged_student_path()
        except FileNotFoundError as err:
            raise ValueError(str(err)) from err
        what = f"the packaged student {path.name} (the model `spikemar demo` runs)"
    else:
        what = f"the checkpoint {path}"
    # a Hugging Face directory needs its tokenizer only to encode --text
    text = args.text is not None or args.text_file is not None
    model, tokenizer = _checkpoint(path, "--checkpoint", tokenizer=text)
    return model, tokenizer, what


def _checkpoint(path: Path, flag: str, *, tokenizer: bool = True) -> tuple[nn.Module, Any]:
    """``(model in eval mode, its tokenizer)`` of a spikemar checkpoint file, or of a Hugging
    Face Mamba-2/Llamba directory or Hub id (:func:`spikemar.models.from_pretrained`: the
    dense model; its tokenizer where ``tokenizer``, else None); errors name ``flag``."""
    from ..checkpoint import load_checkpoint
    from ..models.hub import is_hub_id

    try:
        if path.is_dir() or (not path.exists() and is_hub_id(path)):
            from ..models import from_pretrained

            model = from_pretrained(path, tokenizer=tokenizer)
            return model.eval(), model.tokenizer
        model, own, _ = load_checkpoint(path)
        return model.eval(), own
    except (OSError, ValueError) as err:  # OSError: a missing file, a Hub id out of reach
        from ..models.hub import NO_TOKENIZER_HINT

        message = " ".join(str(err).split())
        # this command has no --tokenizer: a directory without one is priced on random tokens
        message = message.replace(NO_TOKENIZER_HINT, "; --text needs it, --random-tokens does not")
        name, sep, rest = message.partition(": ")
        if sep and name in ("checkpoint", "path", "path_or_id"):  # the loader's name for flag
            message = rest
        raise ValueError(f"{flag}: {message}") from err


def _teacher(args: argparse.Namespace, student: nn.Module) -> tuple[nn.Module, str]:
    """The model to compare against and its label."""
    if args.teacher is not None:
        return _checkpoint(args.teacher, "--teacher", tokenizer=False)[0], "teacher"
    from ..checkpoint import dense_twin

    if getattr(student.config, "spikes", None) is None:
        raise ValueError("--compare-dense: the model is dense already; give --teacher")
    return dense_twin(student), "dense twin"


def _input_ids(args: argparse.Namespace, tokenizer: Any, model_config: Any = None) -> torch.Tensor:
    text = args.text
    if args.text_file is not None:
        if not args.text_file.is_file():
            raise ValueError(f"--text-file: no such file {str(args.text_file)!r}")
        try:
            text = args.text_file.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"--text-file: {str(args.text_file)!r} is not UTF-8 text (byte "
                             f"{err.start} is {err.object[err.start]:#04x})") from None  # fmt: skip
    vocab = VOCAB if tokenizer is None else tokenizer.vocab_size
    if tokenizer is None and isinstance(getattr(model_config, "vocab_size", None), int):
        vocab = model_config.vocab_size  # a Hugging Face directory read without its tokenizer
    if text is not None:
        if not text:
            raise ValueError("--text: expected a non-empty text")
        try:
            ids = list(text.encode("utf-8")) if tokenizer is None else tokenizer.encode(text)
        except ValueError as err:  # the tokenizer's "text: ..." names the option here
            flag = "--text" if args.text_file is None else "--text-file"
            raise ValueError(f"{flag}: {str(err).removeprefix('text: ')}") from None
        return torch.tensor(ids, dtype=torch.long).expand(args.batch, -1).contiguous()
    g = torch.Generator().manual_seed(args.seed)
    return torch.randint(0, vocab, (args.batch, args.random_tokens), generator=g)


def _check_teacher_vocabulary(teacher: nn.Module, ids: torch.Tensor) -> None:
    vocab = getattr(getattr(teacher, "config", None), "vocab_size", None)
    if isinstance(vocab, int) and ids.numel() and int(ids.max()) >= vocab:
        raise ValueError(
            f"--teacher: its vocabulary ({vocab}) does not hold the input's token ids (up to "
            f"{int(ids.max())}); compare a student with its own teacher"
        )


def _ratio_lines(comparisons: tuple[EnergyComparison, ...], label: str) -> list[str]:
    """The student-vs-teacher ratio under the chosen profile and every registered one."""
    lines = [f"student vs {label}, energy ratio (student / {label}) under each profile:"]
    for cmp in comparisons:
        name = cmp.student.hardware.name
        if cmp.ratio is None:
            lines.append(f"  {name:<20} no ratio: {cmp.refusal}")
        else:
            lines.append(
                f"  {name:<20} {cmp.ratio:8.4f}   (student {cmp.student_pj / 1e3:,.2f} nJ, "
                f"{label} {cmp.teacher_pj / 1e3:,.2f} nJ per {cmp.basis})"
            )
    return lines


def energy_main(args: argparse.Namespace) -> int:
    """Run ``spikemar energy`` with parsed ``args``; returns the exit code (2 on bad input)."""
    try:
        try:
            get_profile(args.hardware)
        except ValueError as err:  # "hardware: unknown profile ..."
            raise ValueError(f"--{err}") from None
        mem_hw = memory_sibling(args.hardware) if args.memory else None
        _check_outputs(args)  # before any work: a bad path fails first and nothing is written
        model, tokenizer, what = _load_model(args)
        demo = args.checkpoint is None and args.model != "student"
        ids = _input_ids(args, tokenizer, None if demo else getattr(model, "config", None))
        teacher = None
        if args.compare_dense or args.teacher is not None:  # before any work: fail early
            teacher, label = _teacher(args, model)
            _check_teacher_vocabulary(teacher, ids)
        print(f"model: {what}")
        if args.text is None and args.text_file is None:
            print(f"input: {args.batch} × {args.random_tokens} random tokens (seed {args.seed}); "
                  "--text or --text-file prices real text")  # fmt: skip
        report = profile(model, ids, hardware=args.hardware, spike_detection=args.spike_detection)
        print(report.to_table())
        shown = report
        if mem_hw is not None and mem_hw is not report.hardware:
            shown = report.with_hardware(mem_hw)
            print()
            print(shown.to_table(memory=True))
        tables = []
        if mem_hw is not None:
            tables.append(break_even(shown))
            int8 = _int8_sibling(mem_hw)
            if mem_hw.prices_memory and int8 != mem_hw.name:
                # the int8 form: the same spikes with int8 weights and values, against an
                # int8 dense model of the same weights
                tables.append(break_even(shown.with_hardware(int8)))
            print()
            print("\n".join(t.to_table() for t in tables))
        comparison = None
        comparisons: tuple[EnergyComparison, ...] = ()
        if teacher is not None:
            rep_t = profile(teacher, ids, hardware=args.hardware)
            comparison = compare(report, rep_t, labels=("student", label))
            comparisons = (comparison,)
            print()
            print(comparison.to_table())
            if mem_hw is not None:
                comparisons = compare_profiles(report, rep_t, labels=("student", label))
                print()
                print("\n".join(_ratio_lines(comparisons, label)))
                if mem_hw is not report.hardware:
                    comparison = compare(shown, rep_t.with_hardware(mem_hw),
                                         labels=("student", label))  # fmt: skip

        def json_text() -> str:  # the report, with the break-even rates and ratios printed
            doc = shown.to_dict()
            if tables:
                doc["break_even"] = [t.to_dict() for t in tables]
            if comparisons:
                doc["comparisons"] = [_ratio_entry(c) for c in comparisons]
            return json.dumps(doc, indent=2, allow_nan=False) + "\n"

        def markdown_text() -> str:
            parts = [shown.to_markdown(), *(t.to_markdown() for t in tables)]
            if comparison is not None:
                parts.append(comparison.to_markdown())
            return "\n".join(parts)

        for flag, path, text in (("--json", args.json, json_text),
                                 ("--markdown", args.markdown, markdown_text)):  # fmt: skip
            if path is not None:
                with _naming(flag, path), atomic_write(path, fsync=False) as tmp:
                    tmp.write_text(text(), encoding="utf-8")
        if args.png is not None:
            # a comparison is drawn as printed: both models, per token
            with _naming("--png", args.png):
                if comparison is not None:
                    comparison.save_png(args.png)
                else:
                    shown.save_png(args.png, per_token=args.per_token)
    except ValueError as err:
        print(f"spikemar energy: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        if not is_machine_failure(err):
            raise
        # a full disk under a report: the run failed, the input was not at fault
        print(f"spikemar energy: error: {err}", file=sys.stderr)
        return 1
    return 0


def _ratio_entry(cmp: EnergyComparison) -> dict[str, Any]:
    """One comparison's ratio line as data (without the two reports)."""
    keep = ("hardware", "basis", "labels", "ratio", "savings", "refusal")
    d = cmp.to_dict()
    s, t = cmp.labels
    return {k: d[k] for k in keep} | {"student_pj": d[f"{s}_pj"], "teacher_pj": d[f"{t}_pj"]}


@contextlib.contextmanager
def _naming(flag: str, path: Path) -> Iterator[None]:
    """A report that cannot be written is one error naming its option and file: a full disk (a
    quota, a file-size limit, an I/O error) an OSError with its errno, for a failed run (exit
    1); a folder that refuses files a ValueError, for a mistake in the input (exit 2)."""
    try:
        yield
    except OSError as err:
        failed = cannot_write(err, path, flag)
        if not is_machine_failure(err):
            raise ValueError(str(failed)) from err
        raise failed from err


def _check_outputs(args: argparse.Namespace) -> None:
    """Each output path writable as a file (folders created), the PNG's named .png; errors
    name the option."""
    for flag in ("--json", "--markdown", "--png"):
        path = getattr(args, flag[2:])
        if path is not None:
            check_output_path(path, name=flag)
    if args.png is not None and args.png.suffix.lower() != ".png":
        raise ValueError(f"--png: expected a .png file name, got {str(args.png)!r}")


def _int8_sibling(hw) -> str:
    """The int8 memory profile to price an int8 dense model of the same weights against."""
    return "45nm-int8+mem+aer" if hw.spike_encoding == "address" else "45nm-int8+mem"
