"""Small offline evaluation tasks in lm-evaluation-harness's YAML format, from Tiny Shakespeare.

The standard zero-shot tasks (PIQA, ARC, HellaSwag, WinoGrande, LAMBADA) need the Hugging Face
Hub; these need nothing but the files in ``spikemar/eval/tasks/`` and run with
``HF_DATASETS_OFFLINE=1``. All three are built from the *validation* split of Tiny Shakespeare
(the last 10 % of the text: the end of *The Taming of the Shrew* and *The Tempest*), which no
spikemar checkpoint trains on:

    shakespeare_nextline   which of four verse lines comes next? (the true next line and three
                           lines of similar length from elsewhere in the split; acc, acc_norm)
    shakespeare_speaker    who speaks next? the dialogue so far, then four speaker names from
                           the same stretch of the play (character-name cloze; acc, acc_norm)
    shakespeare_rolling    perplexity of whole passages (~2,000 characters each, cut at speech
                           boundaries): word_perplexity, byte_perplexity, bits_per_byte

Chance is 25 % for both multiple-choice tasks. The JSONL files are written once by
:func:`build_shakespeare_tasks` (seeded: a rebuild from the same text gives the same bytes) and
shipped with the package; the YAML files beside them load them through a ``custom_dataset``
function (``spikemar_tasks.py`` in the same folder), because lm_eval resolves a relative
``data_files`` path against the working directory, not the YAML's folder.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["LOCAL_TASKS", "TASKS_DIR", "build_shakespeare_tasks"]

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
LOCAL_TASKS = ("shakespeare_nextline", "shakespeare_speaker", "shakespeare_rolling")
TRAIN_FRACTION = 0.9  # nanoGPT's split, as spikemar.data

_SPEECH = re.compile(r"\n\n([A-Za-z][A-Za-z ']*):\n")
_Made = tuple[str, list[str]]  # a multiple-choice example: context, choices (the answer first)


def _validation_text(text: str) -> str:
    return text[int(len(text) * TRAIN_FRACTION) :]


def _context_before(text: str, end: int, chars: int) -> str:
    """The text before ``end``, about ``chars`` long, starting at a line start."""
    start = max(0, end - chars)
    nl = text.find("\n", start)
    start = nl + 1 if 0 <= nl < end - 1 and start > 0 else start
    return text[start:end].lstrip("\n")


def _multiple_choice(
    candidates: list, rng: random.Random, n: int, make: Callable[[Any], _Made | None]
) -> list[dict]:
    """Up to ``n`` examples from ``candidates`` in a seeded random order: ``make(candidate)``
    gives (context, choices with the answer first), or None for a candidate that yields no
    example; the choices are then shuffled and the answer's place is the label."""
    rng.shuffle(candidates)
    out = []
    for candidate in candidates:
        if len(out) == n:
            break
        made = make(candidate)
        if made is None:
            continue
        context, choices = made
        answer = choices[0]
        rng.shuffle(choices)
        out.append({"context": context, "choices": choices, "label": choices.index(answer)})
    return out


def _nextline_examples(val: str, rng: random.Random, n: int) -> list[dict]:
    # verse lines: not blank, not a speaker header, with a line before them in the same speech
    lines = []  # (start offset, line)
    pos = 0
    for line in val.split("\n"):
        lines.append((pos, line))
        pos += len(line) + 1
    verse = [
        i
        for i, (_, line) in enumerate(lines)
        if i > 0 and len(line) >= 12 and not line.endswith(":") and lines[i - 1][1]
    ]

    def make(i: int) -> _Made | None:
        start, line = lines[i]
        if start < 400:
            return None
        similar = [
            j
            for j in verse
            if j != i
            and abs(len(lines[j][1]) - len(line)) <= max(4, len(line) // 5)
            and lines[j][1] != line
        ]
        if len(similar) < 3:
            return None
        choices = [line] + [lines[j][1] for j in rng.sample(similar, 3)]
        if len(set(choices)) < 4:
            return None
        return _context_before(val, start, 400), choices

    return _multiple_choice(verse, rng, n, make)


def _speaker_examples(val: str, rng: random.Random, n: int) -> list[dict]:
    heads = [(m.start(), m.group(1)) for m in _SPEECH.finditer(val)]

    def make(k: int) -> _Made | None:
        start, name = heads[k]
        # distractors: other speakers within 40 speeches either side (the same scene or play)
        near = sorted({nm for _, nm in heads[max(0, k - 40) : k + 40]} - {name})
        if len(near) < 3:
            return None
        # the dialogue up to the blank line before the next header
        context = _context_before(val, start + 2, 600)
        return context, [f"{c}:" for c in (name, *rng.sample(near, 3))]

    candidates = [k for k, (start, _) in enumerate(heads) if start >= 600]
    return _multiple_choice(candidates, rng, n, make)


def _rolling_documents(val: str, chars: int) -> list[dict]:
    # consecutive passages cut at speech boundaries; the first one starts at the first speech
    bounds = [m.start() + 2 for m in _SPEECH.finditer(val)]
    docs, start = [], bounds[0]
    for b in bounds[1:]:
        if b - start >= chars:
            docs.append({"text": val[start:b].rstrip("\n")})
            start = b
    return docs


def build_shakespeare_tasks(
    text_path: str | os.PathLike,
    out_dir: str | os.PathLike = TASKS_DIR,
    *,
    n_examples: int = 300,
    passage_chars: int = 2000,
    seed: int = 0,
) -> dict[str, Path]:
    """Write the three tasks' JSONL files (``{task}.jsonl``) from the Tiny Shakespeare text at
    ``text_path`` into ``out_dir``; returns {task: path}. Deterministic in its arguments."""
    path = Path(text_path)
    if not path.is_file():
        raise FileNotFoundError(f"text_path: no text file at {path}")
    if n_examples < 1 or passage_chars < 100:
        raise ValueError(
            f"n_examples, passage_chars: expected >= 1 and >= 100, got {n_examples}, "
            f"{passage_chars}"
        )
    val = _validation_text(path.read_text(encoding="utf-8"))
    if len(_SPEECH.findall(val)) < 20:
        raise ValueError(
            f"text_path: {path} does not look like Tiny Shakespeare (speeches headed 'NAME:')"
        )
    data = {
        "shakespeare_nextline": _nextline_examples(val, random.Random(seed), n_examples),
        "shakespeare_speaker": _speaker_examples(val, random.Random(seed + 1), n_examples),
        "shakespeare_rolling": _rolling_documents(val, passage_chars),
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for task, rows in data.items():
        target = out / f"{task}.jsonl"
        target.write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
        )
        written[task] = target
    return written
