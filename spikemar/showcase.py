"""``spikemar demo``: the shipped spiking MAR student at work, with nothing to train or fetch.

On the checkpoint packaged in ``spikemar/assets`` (or any ``--checkpoint``) it

1. says how the checkpoint was made (command, data, seed, losses: its ``provenance``),
2. generates text with the spiking model (token by token through its recurrent state),
3. runs the model on that text with every spike point recording and draws one PNG: ternary
   rasters of three spike points and the firing rate of every spike point (+1 and −1 apart),
4. prints the energy report of the spiking model beside its dense teacher under a hardware
   profile.

The packaged student (``spikemar/assets``) comes with the dense teacher it was distilled from
(a dense SSM LM trained from scratch, packaged too): the demo prints the teacher's validation
loss beside the student's and prices both. For another ``--checkpoint`` the teacher is
``--teacher``, else the one its provenance names beside it; without one the comparison is with
the student's *dense twin* (its own weights without spike points: the architecture's dense
cost, not a trained model's quality) and says so.
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from ._argtypes import add_sampling_arguments

__all__ = ["SHIPPED_CHECKPOINT", "add_demo_arguments", "demo_main", "shipped_checkpoint"]

SHIPPED_CHECKPOINT = "mar_shakespeare.pt"
SHIPPED_TEACHER = "mar_shakespeare_teacher.pt"


def shipped_checkpoint(name: str = SHIPPED_CHECKPOINT) -> Path:
    """The path of a packaged checkpoint: the student (default) or :data:`SHIPPED_TEACHER`."""
    path = Path(str(resources.files("spikemar") / "assets" / name))
    if not path.is_file():
        raise FileNotFoundError(f"--checkpoint: the packaged checkpoint is missing at {path} "
                                "(a broken install?); give --checkpoint PATH")  # fmt: skip
    return path


def _teacher_path(args: argparse.Namespace, student: Path, provenance: dict) -> Path | None:
    """``--teacher``, else the file the student's provenance names (beside the student)."""
    if args.teacher is not None:
        return args.teacher
    named = (provenance or {}).get("teacher", {})
    name = named.get("file") if isinstance(named, dict) else None
    if name and (student.parent / name).is_file():
        return student.parent / name
    return None


def add_demo_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p = parser
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="a spiking MAR checkpoint (default: the packaged Tiny Shakespeare "
                        "student)")  # fmt: skip
    add_sampling_arguments(p, prompt="ROMEO:\n", max_new_tokens=300, seed=1, unit="characters")
    p.add_argument("--teacher", type=Path, default=None,
                   help="the dense teacher to compare with (default: the one the checkpoint's "
                        "provenance names, packaged with the shipped student; without one, the "
                        "student's dense twin)")  # fmt: skip
    p.add_argument("--hardware", default="45nm-fp32", help="energy profile")
    p.add_argument("--out", type=Path, default=Path("spikemar_demo.png"), help="the PNG")
    return p


def _spike_points(model: torch.nn.Module) -> dict[str, Any]:
    from .models.common import SpikePoint

    return {name: m for name, m in model.named_modules() if isinstance(m, SpikePoint)}


def _unit(tokenizer) -> str:
    """What one token id is: a character (Tiny Shakespeare's tokenizer) or a BPE token."""
    from .tokenizer import CharTokenizer

    return "character" if isinstance(tokenizer, CharTokenizer) else "token"


def _shown(result: Any) -> str:
    """A provenance ``result``: a sentence (``spikemar train``) or a dict of figures
    (``spikemar convert``), the nested ones left out."""
    if not isinstance(result, dict):
        return str(result)
    shown = {key: value for key, value in result.items() if not isinstance(value, dict | list)}
    return ", ".join(
        f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
        for key, value in shown.items()
    )


def _figure(model, tokenizer, ids: torch.Tensor, points: dict[str, Any], title: str):
    from . import viz

    for point in points.values():
        point.record = True
    try:
        with torch.no_grad():
            model(ids)
        spikes = {name: p.spikes[:, 0] for name, p in points.items()}  # [T, L, channels]
    finally:
        for point in points.values():
            point.record, point.spikes = False, None
    T = next(iter(spikes.values())).shape[0]
    names = list(spikes)
    # the first layer's mixer input and FFN hidden spikes, the last layer's mixer output spikes
    first = [n for n in names if n.startswith(names[0].split(".mixer")[0].split(".ffn")[0])]
    # (no FFN, as in a converted Mamba-2: the first layer's other spike point)
    hidden = [n for n in first if n.endswith("spike_hidden")] or first[1:] or first
    out = [n for n in names if n.endswith("spike_out")] or names
    shown = [names[0], hidden[0], out[-1]]
    L = min(ids.shape[1], 24)
    fig = viz.new_figure((18, 10))
    grid = fig.add_gridspec(2, 3, height_ratios=(3, 2))
    fig.suptitle(title)
    for k, name in enumerate(shown):
        s = spikes[name][:, -L:, :64]  # the last L tokens, the first 64 channels
        by_position = s.permute(1, 0, 2).reshape(-1, s.shape[-1])  # [L·T, channels]
        ax = viz.raster(by_position, fig.add_subplot(grid[0, k]), neuron_label="channel",
                        time_label=f"{_unit(tokenizer)} × micro-step ({T} per {_unit(tokenizer)})",
                        title=f"spike point {name}", boundary_every=T)  # fmt: skip
        # one label per token: a BPE token's text may be several characters (or part of one)
        labels = [repr(tokenizer.decode([t]))[1:-1] for t in ids[0, -L:].tolist()]
        ax.set_xticks([i * T + (T - 1) / 2 for i in range(L)], labels, fontsize=8)
    rates = {name: viz.firing_rates(s, batch_dims=1) for name, s in spikes.items()}
    title = "firing rate of every spike point (per micro-step)"
    viz.plot_layer_firing_rates(rates, fig.add_subplot(grid[1, :]), title=title)
    fig.axes[-1].tick_params(axis="x", labelrotation=60, labelsize=7)
    return fig, rates


def demo_main(args: argparse.Namespace) -> int:
    from . import viz
    from .checkpoint import dense_twin, load_checkpoint
    from .energy import compare, get_profile, headline, profile

    try:
        get_profile(args.hardware)
        if args.temperature < 0:
            raise ValueError(f"--temperature: expected >= 0, got {args.temperature}")
        path = args.checkpoint or shipped_checkpoint()
        model, tokenizer, payload = load_checkpoint(path)
        if getattr(model.config, "spikes", None) is None:
            raise ValueError(f"--checkpoint: {path} holds a dense model; the demo shows spikes")
        prompt = torch.tensor(tokenizer.encode(args.prompt.replace("\\n", "\n")))
        if prompt.numel() == 0:
            raise ValueError("--prompt: expected at least one character")
        teacher_path = _teacher_path(args, Path(path), payload.get("provenance"))
        teacher_model = teacher_payload = None
        if teacher_path is not None:
            # the file named by --teacher, not --checkpoint
            teacher_model, teacher_tokenizer, teacher_payload = load_checkpoint(
                teacher_path, name="--teacher"
            )
            if getattr(teacher_model.config, "spikes", True) is not None:
                raise ValueError(f"--teacher: {teacher_path} is not a dense MAR LM")
            if teacher_tokenizer != tokenizer:
                raise ValueError(f"--teacher: {teacher_path} has another vocabulary")
        # last of the checks (it makes --out's folder), before any work
        viz.check_figure_path(args.out, name="--out")
    except (ValueError, OSError) as err:
        message = str(err)
        if message.startswith(("checkpoint: ", "hardware: ")):
            message = "--" + message
        elif message.startswith("text: "):
            message = "--prompt: " + message.removeprefix("text: ")
        print(f"spikemar demo: error: {message}", file=sys.stderr)
        return 2
    made = payload.get("provenance")
    print(f"checkpoint: {path}")
    if made:
        print(f"  made by:  {made.get('command', '?')}")
        print(f"  data:     {made.get('data', '?')}   seed: {made.get('seed', '?')}")
        print(f"  result:   {_shown(made.get('result', '?'))}")
    s = model.config.spikes
    n_params = sum(p.numel() for p in model.parameters())
    print(f"  model:    spiking MAR LM, {model.config.n_layers} layers, d_model "
          f"{model.config.d_model}, {n_params / 1e6:.2f} M parameters; ATMN T = {s.T}, "
          f"τ = {s.tau}")  # fmt: skip
    if teacher_model is not None:
        taught = (teacher_payload or {}).get("provenance") or {}
        print(f"teacher:    {teacher_path}")
        if taught:
            print(f"  made by:  {taught.get('command', '?')}")
            print(f"  result:   {taught.get('result', '?')}")
    else:
        print("teacher:    none given: energy is compared with the student's dense twin (its own "
              "weights without spike points), which prices the dense architecture but is not a "
              "trained model")  # fmt: skip
    print()

    generator = torch.Generator().manual_seed(args.seed)
    out = model.generate(prompt, args.max_new_tokens, temperature=args.temperature,
                         top_k=args.top_k, top_p=args.top_p, generator=generator)  # fmt: skip
    print(tokenizer.decode(out))
    print()

    ids = out[None, -512:]
    points = _spike_points(model)
    fig, rates = _figure(model, tokenizer, ids, points,
                         f"{path.name}: spikes of the spiking MAR LM on its own text "
                         f"({ids.shape[1]} {_unit(tokenizer)}s)")  # fmt: skip
    viz.save_figure(fig, args.out, name="--out")
    mean = sum(r.mean_total for r in rates.values()) / len(rates)
    print(f"{args.out}: rasters and firing rates of {len(points)} spike points "
          f"(mean firing rate {mean:.3f} per micro-step)\n")  # fmt: skip

    student = profile(model, ids, hardware=args.hardware)
    if teacher_model is not None:
        teacher = profile(teacher_model, ids, hardware=args.hardware)
        labels = ("spiking MAR", "dense teacher")
    else:
        teacher = profile(dense_twin(model), ids, hardware=args.hardware)
        labels = ("spiking MAR", "its dense twin")
    table = compare(student, teacher, labels=labels).to_table()  # its first line: the ratio
    print(table)
    counts = (f"over its {ids.shape[1]} {_unit(tokenizer)}s: {student.total_acs:,} ACs + "
              f"{student.total_macs:,} MACs against {teacher.total_macs:,} MACs")  # fmt: skip
    hw = get_profile(args.hardware)
    if hw.prices_memory or hw.memory_included:
        # the table's first line is already the memory-inclusive figure: the compute-only and
        # with-memory headline would call this profile "compute only" and print it twice
        print(f"\n{table.splitlines()[0]} ({counts})")
    else:
        print(f"\n{headline(student, teacher, compute=args.hardware, labels=labels)} ({counts})")
    return 0
