"""argparse types shared by the ``spikemar`` commands: argparse turns their ArgumentTypeError
into "argument --X: <message>", naming the argument and what was expected; and what the
commands share in telling a mistake in the input from a failed run."""

from __future__ import annotations

import argparse
import errno
import math

__all__ = [
    "add_sampling_arguments",
    "add_tokenizer_argument",
    "check_device",
    "default_new_tokens",
    "device_argument",
    "finite_positive_float",
    "int_at_least_0",
    "int_at_least_1",
    "is_machine_failure",
    "non_negative_float",
    "positive_float",
]


# the machine ran out of room or failed under a write: nothing the user typed was wrong
_MACHINE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO})


def is_machine_failure(err: BaseException) -> bool:
    """Whether ``err`` is an OSError of the machine rather than of the input (a full disk or
    quota, a file-size limit, an I/O error): a command reports it as a failed run (exit 1),
    not as a usage error that ``--help`` could mend."""
    return isinstance(err, OSError) and err.errno in _MACHINE_ERRNOS


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = low - 1
    if value < low:
        raise argparse.ArgumentTypeError(f"expected an int >= {low}, got {text!r}")
    return value


def int_at_least_0(text: str) -> int:
    return _int_at_least(text, 0)


def int_at_least_1(text: str) -> int:
    return _int_at_least(text, 1)


def _float(text: str, accept, expected: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan  # fails every test below
    if not accept(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def positive_float(text: str) -> float:
    return _float(text, lambda v: v > 0, "a number > 0")  # NaN fails v > 0


def finite_positive_float(text: str) -> float:
    return _float(text, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")


def non_negative_float(text: str) -> float:
    return _float(text, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")


def probability_in_0_1(text: str) -> float:
    return _float(text, lambda v: 0 < v <= 1, "a number in (0, 1]")


def check_device(device: object, *, name: str = "device") -> str:
    """``device`` as a string that torch accepts and that can run here, else a ValueError naming
    ``name``: a typo, ``cuda`` on a CPU-only build or without a visible GPU, ``cuda:N`` beyond
    the GPUs there are. Checked when a command line or a config is read, not at the first step."""
    import torch

    if not isinstance(device, str | torch.device):
        raise ValueError(f"{name}: expected a device such as 'cpu' or 'cuda', got {device!r}")
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ValueError(
            f"{name}: {str(device)!r} is not a device; expected cpu, cuda or cuda:N"
        ) from None
    if parsed.type == "cpu":
        return str(parsed)
    if parsed.type == "cuda":
        if torch.version.cuda is None:
            raise ValueError(f"{name}: {str(device)!r}, but this PyTorch is a CPU-only build "
                             f"(torch {torch.__version__}); use --device cpu")  # fmt: skip
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"{name}: {str(device)!r}, but no CUDA GPU is visible")
        if parsed.index is not None and parsed.index >= count:
            raise ValueError(f"{name}: {str(device)!r}, but only {count} CUDA GPU(s) are "
                             f"visible (cuda:0 to cuda:{count - 1})")  # fmt: skip
        return str(parsed)
    if parsed.type == "mps" and torch.backends.mps.is_available():
        return str(parsed)
    raise ValueError(f"{name}: {str(device)!r} cannot run spikemar here; expected cpu, cuda or "
                     "cuda:N")  # fmt: skip


def device_argument(text: str) -> str:
    """argparse type of ``--device``: :func:`check_device` when the command line is parsed."""
    try:
        return check_device(text, name="device")
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix("device: ")) from None


def add_sampling_arguments(
    p: argparse.ArgumentParser,
    *,
    prompt: str,
    max_new_tokens: int,
    seed: int,
    unit: str,
    fit_context: bool = False,
) -> None:
    """The sampling options of ``spikemar generate`` and ``spikemar demo`` (their defaults and
    the word for what is generated, ``unit``, differ). ``fit_context``: ``--max-new-tokens``
    defaults to None, which the command resolves with :func:`default_new_tokens` (a model
    with a bounded context gets no more than it holds)."""
    shown = "a newline" if prompt == "\n" else repr(prompt)
    p.add_argument("--prompt", default=prompt, help=f"text to continue (default: {shown})")
    if fit_context:
        p.add_argument("--max-new-tokens", type=int_at_least_1, default=None,
                       help=f"{unit} to generate (default: {max_new_tokens}, or as many as a "
                            "Transformer's context of max_len positions leaves after the "
                            "prompt)")  # fmt: skip
    else:
        p.add_argument("--max-new-tokens", type=int_at_least_1, default=max_new_tokens,
                       help=f"{unit} to generate")  # fmt: skip
    p.add_argument("--temperature", type=non_negative_float, default=0.8,
                   help="sampling temperature (0: greedy)")  # fmt: skip
    p.add_argument("--top-k", type=int_at_least_1, default=None,
                   help=f"sample from the k most likely {unit} only (default: all)")  # fmt: skip
    p.add_argument("--top-p", type=probability_in_0_1, default=None,
                   help=f"sample from the smallest set of most likely {unit} whose probability "
                        "reaches P (nucleus sampling; default: all)")  # fmt: skip
    p.add_argument("--seed", type=int, default=seed, help="seed of the sampling")


def default_new_tokens(default: int, prompt_tokens: int, context: int | None) -> int:
    """``--max-new-tokens`` left out: ``default``, or fewer where the model's context
    (``context`` positions, None: unbounded) leaves less room after a prompt of
    ``prompt_tokens`` (the last new token is not fed back, so it needs no place); at least 1,
    so a prompt that fills the context still gets generation's own error."""
    if context is None:
        return default
    return max(1, min(default, context - prompt_tokens + 1))


def add_tokenizer_argument(parser: argparse.ArgumentParser, whose: str) -> None:
    """``--tokenizer DIR|FILE|OWNER/NAME``: where to take ``whose`` tokenizer from when its
    checkpoint ships none (``spikemar.models.hub.resolve_tokenizer`` reads it)."""
    parser.add_argument(
        "--tokenizer", default=None, metavar="DIR|FILE|OWNER/NAME",
        help=f"{whose} tokenizer where its checkpoint ships none (or another is wanted): a "
             "directory, a tokenizer.json or a Hub id (state-spaces/mamba2-130m uses "
             "EleutherAI/gpt-neox-20b's)",
    )  # fmt: skip
