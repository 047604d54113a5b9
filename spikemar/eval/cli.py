"""``spikemar eval``: zero-shot tasks with energy beside every score, or the perplexity of a text.

The command's two halves, for :mod:`spikemar.cli` to wire in (``add_eval_arguments(parser)``,
``eval_main(args) -> exit code``).

Tasks (lm-evaluation-harness, ``HF_DATASETS_OFFLINE=1`` is enough for the local ones)::

    spikemar eval --checkpoint A.pt --checkpoint B.pt \\
        --tasks shakespeare_nextline,shakespeare_speaker,shakespeare_rolling --out runs/eval

writes ``eval.json``, ``eval.md`` (one row per checkpoint: accuracy ± stderr per task and on
average, rolling bits/byte, energy per token under each hardware profile, firing rate) and
``eval.png`` (average accuracy against energy per token). Task names are lm_eval's (``piqa``,
``arc_easy``, ``arc_challenge``, ``hellaswag``, ``winogrande``, ``lambada_openai``: their data
comes from the Hugging Face Hub), spikemar's local ones, or those of ``--include-path DIR``.

A text::

    spikemar eval --checkpoint A.pt --text FILE [--window 64] --out runs/ppl

writes ``perplexity.json``, ``perplexity.md`` and ``perplexity.png`` (the per-position loss
curves): nats/token and bits/byte over the whole file as one stream, and in windows with
``--window``, each with the energy per token of the passes that scored it (``--no-energy``:
without) and the firing rate.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .._argtypes import add_tokenizer_argument, is_machine_failure
from .._argtypes import device_argument as _device_argument
from .._argtypes import int_at_least_0 as _int_at_least_0
from .._argtypes import int_at_least_1 as _int_at_least_1
from .._io import Terminated, atomic_write, cannot_write, check_output_folder, reworded
from .local_tasks import LOCAL_TASKS, TASKS_DIR

__all__ = [
    "TaskDataUnreachable",
    "add_eval_arguments",
    "eval_main",
    "evaluate_checkpoints",
    "resolve_tasks",
]

# how an error about characters outside a character tokenizer's alphabet says to set unk here
# (the harness's message says lm_eval's way: harness.UNK_HINT)
_UNK_FLAG_HINT = " (--unk ' ' replaces them)"
PACKAGED = Path(__file__).resolve().parents[1] / "assets" / "mar_shakespeare.pt"


def add_eval_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Declare the options of ``spikemar eval`` on ``parser``."""
    parser.add_argument(
        "--checkpoint",
        type=Path,
        action="append",
        help="a spikemar checkpoint file, or a Hugging Face Mamba-2/Llamba directory or Hub id; "
        "repeat to compare several in one table (default: the packaged student)",
    )
    parser.add_argument(
        "--label",
        action="append",
        help="a name per --checkpoint (default: the file's name, or its path where names repeat)",
    )
    add_tokenizer_argument(parser, "every --checkpoint's")
    parser.add_argument(
        "--tasks",
        default=",".join(LOCAL_TASKS),
        help="comma-separated lm_eval task names, patterns (arc_*) or task YAML files (default: "
        "spikemar's three local tasks)",
    )
    parser.add_argument(
        "--include-path",
        type=Path,
        action="append",
        default=[],
        help="a folder of task YAMLs of your own (repeatable; spikemar's local tasks are "
        "always included)",
    )
    parser.add_argument(
        "--limit", type=_int_at_least_1, help="score only the first N documents of each task"
    )
    parser.add_argument(
        "--num-fewshot",
        type=_int_at_least_0,
        default=None,
        help="few-shot examples (default: the task's)",
    )
    parser.add_argument("--text", type=Path, help="score this text file instead of tasks")
    parser.add_argument(
        "--window",
        type=_int_at_least_1,
        help="with --text: also score in windows of this many tokens; with tasks: score rolling "
        "documents in windows",
    )
    parser.add_argument(
        "--train-length",
        type=_int_at_least_1,
        default=None,
        help="mark this training length on the loss curve (default: the checkpoint's, if known)",
    )
    parser.add_argument("--batch-size", type=_int_at_least_1, default=16, help="(default 16)")
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16", "auto"),
        help="the weights' dtype (default: float32 for a Hugging Face directory, a checkpoint "
        "file's own; auto: the checkpoint's own, as lm_eval hf's dtype=auto)",
    )
    parser.add_argument(
        "--device", type=_device_argument, default="cpu", help="torch device (default cpu)"
    )
    parser.add_argument(
        "--unk",
        help="a character of a character tokenizer's alphabet standing in for unknown ones "
        "(standard tasks hold digits and symbols the Shakespeare alphabet lacks)",
    )
    parser.add_argument("--no-energy", action="store_true", help="do not count operations (faster)")
    parser.add_argument(
        "--hardware",
        action="append",
        help="energy profile(s) shown in the Markdown table and the PNG (repeatable; default "
        "45nm-fp32, 45nm-fp32+mem and loihi; the JSON holds every profile)",
    )
    parser.add_argument("--out", type=Path, default=Path("spikemar_eval"), help="output folder")
    return parser


def resolve_tasks(names: list[str], include: list[Path]) -> tuple[list[str], Any]:
    """``(task names, lm_eval TaskManager)``; unknown names are one ValueError listing them. A
    glob pattern (``shakespeare_*``) stands for the tasks it matches, in order, each once, as
    in lm_eval's command (``simple_evaluate`` itself takes no patterns); a name ending in
    ``.yaml`` is the path of a task YAML (after the named tasks), which must exist.

    lm_eval's own ~15,000 task configs are not all indexed (that takes tens of seconds): a
    task, group or tag is named literally in its YAML or Python file, so a plain text search
    (about a second) finds the folders that can define a name that is not local, and only
    those are indexed; a name found nowhere is unknown. Should those folders not define it
    (a group spread over several folders), the whole index is built after all."""
    from lm_eval.tasks import TaskManager

    for folder in include:
        if not folder.is_dir():
            raise ValueError(f"--include-path: no folder at {folder}")
    files = [n for n in names if n.endswith((".yaml", ".yml"))]  # a task's YAML, as in lm_eval
    for name in files:
        if not Path(name).is_file():
            raise ValueError(f"--tasks: no task file at {name} (a name ending in .yaml is the "
                             "path of an lm_eval task YAML)")  # fmt: skip
    names = [n for n in names if n not in files]
    paths = [str(TASKS_DIR), *(str(p) for p in include)]
    manager = TaskManager(include_path=paths, include_defaults=False)
    unknown = [n for n in names if not manager.match_tasks([n])]
    folders = [_lm_eval_folders_naming(n) for n in unknown]
    if unknown and all(folders):
        extra = sorted({str(f) for fs in folders for f in fs})
        manager = TaskManager(include_path=paths + extra, include_defaults=False)
        unknown = [n for n in names if not manager.match_tasks([n])]
        if unknown:
            manager = TaskManager(include_path=paths)
            unknown = [n for n in names if not manager.match_tasks([n])]
    if unknown:
        raise ValueError(
            f"--tasks: unknown task(s) {unknown}; spikemar's local tasks are "
            f"{', '.join(LOCAL_TASKS)}; `lm_eval ls tasks` lists lm_eval's, --include-path adds "
            "your own"
        )
    expanded: list[str] = []
    for name in names:
        expanded += [m for m in manager.match_tasks([name]) if m not in expanded]
    return expanded + files, manager


def _lm_eval_folders_naming(name: str) -> list[Path]:
    """The outermost folders of lm_eval's task tree holding a YAML or Python file that names
    ``name`` as a whole word (for a glob pattern: that contains its longest literal part)."""
    import re

    import lm_eval.tasks

    parts = re.split(r"[*?\[\]]", name)
    literal = max(parts, key=len)
    if len(parts) == 1:  # a plain name: not as part of a longer one (piqa, not global_piqa)
        pattern = re.compile(rb"(?<![\w-])" + re.escape(name.encode()) + rb"(?![\w-])")
    else:
        pattern = re.compile(re.escape(literal.encode()))
    root = Path(lm_eval.tasks.__file__).parent
    found: list[Path] = []
    for folder, subfolders, files in os.walk(root):
        subfolders.sort()
        if Path(folder) == root:
            continue
        for f in files:
            if f.endswith((".yaml", ".yml", ".py")):
                with open(os.path.join(folder, f), "rb") as fh:
                    if pattern.search(fh.read()):
                        found.append(Path(folder))
                        subfolders.clear()  # the folder is indexed whole, subfolders included
                        break
    return found


class TaskDataUnreachable(ConnectionError):
    """A task's data is on the Hugging Face Hub and neither the Hub nor the local cache has it."""

    def __init__(self, names: list[str], err: Exception) -> None:
        offline = [v for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
                   if os.environ.get(v, "").lower() in ("1", "true", "yes", "on")]  # fmt: skip
        why = f"{' and '.join(offline)} set" if offline else "no network?"
        local = [n for n in names if n in LOCAL_TASKS]
        remote = [n for n in names if n not in LOCAL_TASKS]
        super().__init__(
            f"--tasks: the data of {', '.join(remote) or ', '.join(local)} is unreachable "
            f"({why}: {' '.join(str(err).split())}); lm_eval's standard tasks download it from "
            "the Hugging Face Hub: run once on a machine with a network (it is then cached under "
            "~/.cache/huggingface), or score spikemar's local tasks "
            f"({', '.join(LOCAL_TASKS)}) or your own with --include-path"
        )


def _write_text(path: Path, text: str, written: list[Path]) -> None:
    """Write ``text`` atomically (an interrupted run leaves the old file or none, never half)
    and add ``path`` to ``written``; a failed write names --out and the file."""
    with atomic_write(path, fsync=False, name="--out") as tmp:
        tmp.write_text(text, encoding="utf-8")
    written.append(path)


def _write_png(save: Callable[[Path], Path], path: Path, written: list[Path]) -> None:
    """``save(path)`` (a figure's own atomic writer) and add ``path`` to ``written``; a full
    disk names --out and the file, with its errno, as :func:`_write_text`'s writes do."""
    try:
        written.append(save(path))
    except OSError as err:
        if not is_machine_failure(err):
            raise
        raise cannot_write(err, path, "--out") from err


def _labels(args: argparse.Namespace, checkpoints: list[Path]) -> list[str]:
    if args.label is None:  # the file's name; its path where names repeat (runs/a/model.pt)
        stems = [p.stem for p in checkpoints]
        return [stem if stems.count(stem) == 1 else str(p)
                for stem, p in zip(stems, checkpoints, strict=True)]  # fmt: skip
    if len(args.label) != len(checkpoints):
        raise ValueError(
            f"--label: {len(args.label)} labels for {len(checkpoints)} checkpoints; give one "
            "per --checkpoint or none"
        )
    return list(args.label)


def _check_checkpoints(paths: list[Path]) -> None:
    from ..models.hub import is_hub_id

    for p in paths:
        # a Hub id (owner/name) is left to from_pretrained, which says if it is unreachable
        if not p.exists() and not is_hub_id(p):
            raise ValueError(f"--checkpoint: no file or directory at {p}")


def evaluate_checkpoints(
    checkpoints: list[Path],
    labels: list[str],
    tasks: list[str],
    *,
    include: list[Path] = (),
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 16,
    device: str = "cpu",
    unk: str | None = None,
    window: int | None = None,
    count_energy: bool = True,
    columns: list[str] | None = None,
    tokenizer: str | None = None,
    dtype: str | None = None,
):
    """Run ``tasks`` on every checkpoint through lm_eval; returns the :class:`EvalTable`.
    ``tokenizer``: every checkpoint's tokenizer from there instead; ``dtype``: its weights in
    this dtype (see :class:`SpikemarLM`)."""
    try:
        import lm_eval
    except ImportError as err:
        raise ValueError(
            f"--tasks: lm-evaluation-harness is not installed ({err}); pip install 'spikemar[eval]'"
        ) from err
    from .harness import UNK_HINT, SpikemarLM
    from .report import EvalTable, row_from_lm_eval

    names, manager = resolve_tasks(tasks, list(include))
    rows = []
    for path, label in zip(checkpoints, labels, strict=True):
        lm = SpikemarLM(
            checkpoint=path, tokenizer=tokenizer, batch_size=batch_size, device=device, unk=unk,
            window=window, count_energy=count_energy, dtype=dtype,
        )  # fmt: skip
        print(f"spikemar eval: scoring {label} on {', '.join(names)}", file=sys.stderr)
        start = time.perf_counter()
        try:
            with _programs_without_stderr():
                results = lm_eval.simple_evaluate(
                    model=lm, tasks=names, task_manager=manager, limit=limit,
                    num_fewshot=num_fewshot, log_samples=False, bootstrap_iters=1000,
                )  # fmt: skip
        except ConnectionError as err:  # what `datasets` raises for data it cannot fetch
            raise TaskDataUnreachable(names, err) from err
        except ValueError as err:  # the harness says lm_eval's way to set unk; this is --unk
            if UNK_HINT not in str(err):
                raise
            raise ValueError(str(err).replace(UNK_HINT, _UNK_FLAG_HINT)) from err
        seconds = time.perf_counter() - start
        energy = lm.energy_report() if count_energy else None
        rows.append(row_from_lm_eval(label, str(path), results, energy, seconds=seconds))
        _say_replaced(label, unk, lm.replaced_chars)
    return EvalTable(rows, columns)


@contextlib.contextmanager
def _programs_without_stderr() -> Iterator[None]:
    """Within the block, the programs this process starts do not inherit its stderr (closed at
    exec; git opens /dev/null in its place): lm_eval records the working folder's commit with
    ``git describe``, whose "fatal: not a git repository" reached the terminal outside a
    checkout. This process's own writes to stderr (progress, warnings, errors) are unchanged,
    and so is a program started with its stderr captured, as lm_eval's other ones are (torch's
    environment report)."""
    try:
        inherited = os.get_inheritable(2)
    except OSError:  # no stderr to hand on
        yield
        return
    os.set_inheritable(2, False)
    try:
        yield
    finally:
        os.set_inheritable(2, inherited)


def _say_replaced(label: str, unk: str | None, chars: set[str]) -> None:
    """Warn, once per model, which characters outside its tokenizer's alphabet ``unk`` stood
    in for."""
    if chars:
        print(f"{label}: characters outside the tokenizer's alphabet were scored as {unk!r}: "
              f"{''.join(sorted(chars))!r}", file=sys.stderr)  # fmt: skip


def _train_length(path: Path) -> int | None:
    from ..checkpoint import load_checkpoint

    if not path.is_file():
        return None  # a Hugging Face directory records no training length
    payload = load_checkpoint(path)[2]
    config = (payload.get("train") or {}).get("config") or {}
    value = config.get("L")
    return value if isinstance(value, int) else None


def _run_text(
    args: argparse.Namespace,
    checkpoints: list[Path],
    labels: list[str],
    written: list[Path],
    columns: list[str] | None = None,
) -> None:
    import json

    from ..data import read_text
    from .perplexity import check_unk, replace_unknown, save_curves, text_perplexity
    from .report import DEFAULT_COLUMNS, energy_cells, energy_summary, unpriced_note
    from .scoring import Scorer, load_model

    try:
        text = read_text(args.text)
    except (OSError, ValueError) as err:  # the reader's "path:" is --text here
        raise type(err)("--text: " + str(err).removeprefix("path: ")) from err
    results = []
    energies: list[dict | None] = []
    count = not args.no_energy
    profiles = list(columns or DEFAULT_COLUMNS) if count else []
    head = ["model", "mode", "tokens", "nats/token", "bits/byte", "perplexity"]
    head += [f"E/token {p}" for p in profiles] + (["firing rate"] if count else [])
    table = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    notes: set[str] = set()
    for path, label in zip(checkpoints, labels, strict=True):
        model, tokenizer = load_model(path, args.tokenizer, args.dtype)
        unk = check_unk(tokenizer, args.unk)
        _say_replaced(label, unk, replace_unknown(tokenizer, text, unk)[1])
        modes = [None] + ([args.window] if args.window else [])
        for window in modes:
            # the energy of the passes that produced this score, beside it (as for tasks)
            scorer = Scorer(model, int(tokenizer.vocab_size), batch_size=args.batch_size,
                            device=args.device, count_energy=count)  # fmt: skip
            try:
                r = text_perplexity(model, tokenizer, text, window=window, scorer=scorer, unk=unk)
            except ValueError as err:  # "text: characters [...] are not in the vocabulary"
                if not str(err).startswith("text: "):
                    raise
                hint = _UNK_FLAG_HINT if hasattr(tokenizer, "chars") else ""
                raise ValueError(f"--{err}{hint}") from err
            energy = energy_summary(scorer.energy_report()) if count else None
            name = label if window is None else f"{label}, windows of {window}"
            results.append((name, r))
            energies.append(energy)
            cells = [label, "one stream" if window is None else f"windows of {window}",
                     str(r.tokens), f"{r.nats_per_token:.4f}", f"{r.bits_per_byte:.4f}",
                     f"{r.perplexity:.3f}"]  # fmt: skip
            if count:
                cells += energy_cells(energy, profiles, notes)
            table.append("| " + " | ".join(cells) + " |")
            print(f"{name}: {r.summary()}")
    train_length = args.train_length or _train_length(checkpoints[0])
    out = args.out
    _make_out(out)
    payload = {
        "schema": "spikemar-perplexity-1",
        "text": str(args.text),
        "results": [
            {"label": n, **r.to_dict(), "energy": e}
            for (n, r), e in zip(results, energies, strict=True)
        ],
    }
    markdown = "\n".join(table) + "\n"
    if count:
        markdown += (
            "\nEnergy per token position of the passes that produced each score, counted by "
            "spikemar.energy and priced by each profile (every profile's figure and what it leaves "
            "unpriced are in perplexity.json); firing rate: non-zero spikes per neuron per "
            "micro-step over all spike points.\n" + unpriced_note(notes)
        )
    _write_text(out / "perplexity.json", json.dumps(payload, indent=1) + "\n", written)
    _write_text(out / "perplexity.md", markdown, written)
    _write_png(lambda p: save_curves(results, p, train_length=train_length),
               out / "perplexity.png", written)  # fmt: skip
    print("wrote " + ", ".join(str(p) for p in written))


def _make_out(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise reworded(err, f"--out: cannot make the folder {str(out)!r} ({err.strerror})") from err


def _flagged(err: Exception, args: argparse.Namespace) -> str:
    """An error on one line; the library's ``tokenizer:`` is --tokenizer's where it was given,
    and an argument the command has as an option is named as its flag (``checkpoint:``,
    ``unk:``: ``--checkpoint:``, ``--unk:``); ``text:`` is a task's text unless --text."""
    from ..cli import _with_flags
    from ..models.hub import checkpoint_or_tokenizer_line

    message = checkpoint_or_tokenizer_line(
        str(err), args.tokenizer is not None, args.checkpoint or ()
    )
    return _with_flags(message, args, text="text" if args.text is not None else "tasks")


def eval_main(args: argparse.Namespace) -> int:
    """Run ``spikemar eval`` with parsed ``args``; returns the exit code (2 on bad input).
    Ctrl-C or SIGTERM (as :class:`spikemar._io.Terminated`) prints one line and is re-raised
    for :func:`spikemar.cli.main` to exit 130 or 143."""
    written: list[Path] = []
    try:
        checkpoints = list(args.checkpoint or [PACKAGED])
        _check_checkpoints(checkpoints)
        labels = _labels(args, checkpoints)
        columns = None
        if args.hardware:
            from ..energy import get_profile

            try:
                columns = [get_profile(h).name for h in args.hardware]
            except ValueError as err:
                raise ValueError(f"--{err}") from err  # "hardware: unknown profile ..."
        # before any scoring (it was found out after all of it); made when results are written
        check_output_folder(args.out, name="--out")
        if args.text is not None:
            _run_text(args, checkpoints, labels, written, columns)
            return 0
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        if not tasks:
            raise ValueError("--tasks: expected at least one task name")
        table = evaluate_checkpoints(
            checkpoints, labels, tasks, include=args.include_path, limit=args.limit,
            num_fewshot=args.num_fewshot, batch_size=args.batch_size, device=args.device,
            unk=args.unk, window=args.window, count_energy=not args.no_energy,
            columns=columns, tokenizer=args.tokenizer, dtype=args.dtype,
        )  # fmt: skip
        out = args.out
        _make_out(out)
        _write_text(out / "eval.json", table.to_json() + "\n", written)
        markdown = table.to_markdown()
        _write_text(out / "eval.md", markdown, written)
        scored = [r.average_accuracy()[0] is not None or table.bits_per_byte(r) is not None
                  for r in table.rows]  # fmt: skip
        if not args.no_energy and any(scored):
            _write_png(table.save_png, out / "eval.png", written)
        print(markdown)
        print("wrote " + ", ".join(str(p) for p in written))
    except ConnectionError as err:  # task data or a Hub model out of reach: not the input's fault
        print(f"spikemar eval: error: {_flagged(err, args)}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as err:  # OSError: a missing or unreadable file
        failed = is_machine_failure(err)  # a full disk: the run failed, not the input
        done = ", ".join(str(p) for p in written) if failed and written else ""
        print(f"spikemar eval: error: {_flagged(err, args)}"
              + (f"; wrote only {done}" if done else ""), file=sys.stderr)  # fmt: skip
        return 1 if failed else 2
    except KeyboardInterrupt as err:
        # Ctrl-C, or SIGTERM (spikemar.cli turns it into Terminated): the outputs are written
        # whole at the end (atomically) or not at all, so there is nothing to clean up
        why = "SIGTERM" if isinstance(err, Terminated) else "Ctrl-C"
        done = ", ".join(str(p) for p in written)
        print(
            f"spikemar eval: stopped by {why}; "
            + (f"wrote only {done}" if written else "no results written"),
            file=sys.stderr,
        )
        raise
    return 0
