"""``spikemar distill --stage 1|2``: MAR's distillation stages from the command line.

The command's two halves, for :mod:`spikemar.cli` to wire in: :func:`add_distill_arguments`
declares the options, :func:`distill_main` runs them and returns an exit code. Runs under
``torchrun`` unchanged (DistributedDataParallel; the batch is the global batch).
"""

from __future__ import annotations

import argparse
from typing import Any

from .._argtypes import (
    add_tokenizer_argument,
    int_at_least_1,
    is_machine_failure,
    non_negative_float,
    positive_float,
)
from ..models.hub import command_line_hint
from ..training import add_loop_arguments, loop_settings

__all__ = ["add_distill_arguments", "distill_main"]


def add_distill_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Declare the options of ``spikemar distill`` on ``parser``."""
    p = parser
    p.add_argument("--stage", type=int, choices=(1, 2), required=True,
                   help="1: Transformer (or a MAR hybrid's attention layers) → dense SSM; "
                        "2: dense SSM → spiking MAR")  # fmt: skip
    p.add_argument("--teacher", required=True,
                   help="the teacher: a spikemar checkpoint, a Hugging Face model directory, "
                        "or a Hub id owner/name (fetched where there is a network)")  # fmt: skip
    add_tokenizer_argument(p, "the teacher's")
    p.add_argument("--teacher-dtype", choices=("float32", "bfloat16", "float16"),
                   default="float32",
                   help="the frozen teacher's weights and arithmetic (bfloat16: half the "
                        "memory; its outputs enter the loss in float32)")  # fmt: skip
    add_loop_arguments(p, out="runs/student.pt")
    loss = p.add_argument_group("SBDS loss")
    loss.add_argument("--alpha", type=non_negative_float, default=0.2, help="forward KL weight")
    loss.add_argument("--beta", type=non_negative_float, default=0.7, help="reverse KL weight")
    loss.add_argument("--temperature", type=positive_float, default=1.0)
    loss.add_argument("--feature", choices=("prenorm", "postnorm", "none"), default="prenorm",
                      help="hidden-state alignment term (none: off)")  # fmt: skip
    loss.add_argument("--gamma", type=non_negative_float, default=1.0,
                      help="weight of the feature term (1 in the paper's formula)")  # fmt: skip
    loss.add_argument("--ce", type=non_negative_float, default=0.0,
                      help="weight of plain next-token cross-entropy")  # fmt: skip
    loss.add_argument("--align-steps", type=int, default=None,
                      help="stage 1: steps of teacher-forced hidden-state alignment before "
                           "distillation (default: a quarter of --steps)")  # fmt: skip
    student = p.add_argument_group("student")
    student.add_argument("--d-model", type=int_at_least_1, default=None,
                         help="student width (default: the teacher's; in stage 2 only with "
                              "--no-init-from-teacher)")  # fmt: skip
    student.add_argument("--d-state", type=int_at_least_1, default=None)
    student.add_argument("--head-dim", type=int_at_least_1, default=None)
    student.add_argument("--neuron", choices=("atmn", "binary", "ternary-single"), default=None,
                         help="stage 2: spiking neuron (default atmn)")  # fmt: skip
    student.add_argument("--T", type=int_at_least_1, default=None, help="stage 2: micro-steps")
    student.add_argument("--tau", type=positive_float, default=None, help="stage 2: ATMN τ")
    student.add_argument("--v-threshold", type=positive_float, default=None,
                         help="stage 2: initial threshold V₀")  # fmt: skip
    student.add_argument("--student", default=None,
                         help="stage 2: start from this spiking checkpoint (spikemar convert's "
                              "output; its dense twin must be the teacher)")  # fmt: skip
    student.add_argument("--no-init-from-teacher", action="store_true",
                         help="start the student from random weights")  # fmt: skip
    return p


def distill_main(args: argparse.Namespace) -> int:
    from .trainer import DistillConfig, distill

    student: dict[str, Any] = {}
    for name in _SHAPE_FLAGS:
        if getattr(args, name) is not None:
            student[name] = getattr(args, name)
    spikes = {k: getattr(args, k) for k in _SPIKE_FLAGS if getattr(args, k) is not None}
    if spikes:
        if args.stage == 1:
            args._parser.error("--neuron/--T/--tau/--v-threshold: stage 1's student is dense")
        student["spikes"] = spikes
    try:
        config = DistillConfig(
            **loop_settings(args), stage=args.stage, teacher=args.teacher, alpha=args.alpha,
            beta=args.beta, temperature=args.temperature, gamma=args.gamma, ce=args.ce,
            feature=None if args.feature == "none" else args.feature,
            align_steps=args.align_steps, student_config=student,
            init_from_teacher=not args.no_init_from_teacher, student=args.student,
            tokenizer=args.tokenizer, teacher_dtype=args.teacher_dtype,
        )  # fmt: skip
        result = distill(config, resume=args.resume, progress=not args.no_progress)
    except (ValueError, OSError) as err:  # OSError: a missing file, a bad --out, a Hub id
        if is_machine_failure(err):  # a full disk: the run failed, the input was not at fault
            # save_checkpoint's "checkpoint: cannot write PATH (reason)" is --out's here
            message = str(err)
            if message.startswith("checkpoint: "):
                message = "--out: " + message.removeprefix("checkpoint: ")
            from .._io import reworded

            raise reworded(err, _flag_message(message, args)) from err
        args._parser.error(_flag_message(str(err), args))
    # Ctrl-C and SIGTERM reach the command, which exits 130 or 143
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"{result['checkpoint']}: best validation loss {result['best_val']:.4f} "
              f"{result['unit']} "
              f"(teacher {result['teacher_val']:.4f})")  # fmt: skip
    return 0


# the flags that make the library's student_config
_SHAPE_FLAGS = ("d_model", "d_state", "head_dim")
_SPIKE_FLAGS = ("neuron", "T", "tau", "v_threshold")
_STUDENT_FLAGS = _SHAPE_FLAGS + _SPIKE_FLAGS

# the library's argument names that this command's flags call otherwise
_FLAGS = {"teacher": "--teacher", "student": "--student", "path": "--data", "text": "--data",
          "data": "--data", "out": "--out"}  # fmt: skip


def _flag_message(message: str, args: argparse.Namespace) -> str:
    """A library error as the command line says it: the flag for the argument the library
    names (``teacher: …`` → ``--teacher: …``; a tokenizer's problem is --tokenizer's where it
    was given, else the teacher's, which --tokenizer can mend), with the command's way out of
    a checkpoint without a tokenizer in place of the Python API's."""
    message = " ".join(command_line_hint(message).split())  # one line (torch's are several)
    name, sep, rest = message.partition(": ")
    if sep and name == "tokenizer":
        return f"{'--tokenizer' if args.tokenizer is not None else '--teacher'}: {rest}"
    given = [f"--{flag.replace('_', '-')}" for flag in _STUDENT_FLAGS
             if getattr(args, flag, None) is not None]  # fmt: skip
    if sep and name == "student_config" and given:  # the flags that made the library's dict
        return f"{'/'.join(given)}: {rest}"
    if sep and name in _FLAGS:
        return f"{_FLAGS[name]}: {rest}"
    flag = f"--{name.replace('_', '-')}"  # a library argument that is a flag of its own name
    if sep and name.isidentifier() and flag in args._parser._option_string_actions:
        return f"{flag}: {rest}"
    return message
