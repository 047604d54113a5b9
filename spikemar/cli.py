"""spikemar's command line: ``spikemar <command> [options]``.

Commands: ``demo`` (the packaged spiking student: text, spikes, energy), ``raster`` (an ATMN
layer or a small Linear+ATMN network on a built-in input, one PNG with rasters, firing rates and
membranes), ``train`` and ``generate`` (language models on text), ``distill`` (MAR's two
stages), ``energy`` (SOP energy reports), ``export`` (Loihi: Lava and NIR).

Each command defined here is a pair: ``_add_<name>(subparsers)`` declares its options and sets
``func=_run_<name>``, which takes the parsed arguments and returns an exit code. A command that
lives in a sub-package (``energy``, ``distill``, ``export``, ``demo``) is one
:func:`_delegated` line naming its module's two functions. Each is an entry in ``_COMMANDS``.

Errors: a bad argument is one line (``spikemar train: error: argument --lr: ...``) and exit 2;
a mistake found later (a missing file, an existing ``--out``) is one line and exit 2; a run that
fails (a diverged training, a Lava run, a full disk) one line and exit 1; Ctrl-C exits 130,
SIGTERM 143, even while a command is still importing its module. No traceback unless
``--debug`` or ``SPIKEMAR_DEBUG=1``. ``--help`` shows every default.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

# Nothing here imports torch (or a command's module) when this module is imported: that takes
# seconds, and only inside main() does a Ctrl-C or SIGTERM end in an exit code instead of a
# traceback. The commands import what they need when the parser is built or when they run.
from ._argtypes import (
    add_sampling_arguments,
    add_tokenizer_argument,
    default_new_tokens,
    is_machine_failure,
)
from ._argtypes import finite_positive_float as _finite_positive_float
from ._argtypes import int_at_least_1 as _int_at_least_1
from ._argtypes import positive_float as _positive_float

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["build_parser", "main"]


def _neuron_kinds() -> dict[str, type]:
    from .models.common import NEURONS  # the one table of neuron kinds

    return NEURONS


def _default_tau() -> float:
    """The models' default τ (SpikeConfig's, so ``spikemar train --tau`` too): a picture of the
    neuron shows the neuron the models run unless asked otherwise."""
    from .models.common import SpikeConfig

    return SpikeConfig().tau


class _UsageError(Exception):
    """A combination of arguments that argparse cannot check on its own."""


class _HelpFormatter(argparse.HelpFormatter):
    """Every option's default in ``--help`` (unless its help already states it), options
    without help text included."""

    @staticmethod
    def _default_worth_showing(action: argparse.Action) -> bool:
        # by identity: a default of 0 or 0.0 equals False, and is worth showing
        unset = (None, False, argparse.SUPPRESS)
        return bool(action.option_strings) and not any(action.default is u for u in unset)

    def _format_action(self, action: argparse.Action) -> str:
        if action.help is None and self._default_worth_showing(action):
            action = copy.copy(action)  # argparse prints no help line for help=None
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help
        if text and "default" not in text and self._default_worth_showing(action):
            text += " (default: %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (the usage block is what ``--help`` is for) and defaults
    in the help; sub-commands' parsers are of this class too."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _named(name: str, summary: str):
    """Mark ``_add_<name>`` with its command's name and one-line help, so that the parser can
    list a command without importing what it needs (see :func:`build_parser`)."""

    def mark(add):
        add.command, add.summary = name, summary
        return add

    return mark


# -- raster -------------------------------------------------------------------------------------


@_named("raster", "plot spikes, firing rates and membranes of an ATMN layer or small network")
def _add_raster(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "raster",
        help=_add_raster.summary,
        description=(
            "Run a spiking neuron on a built-in input and write one PNG: raster (+1 and -1 "
            "spikes in two colours), per-neuron firing rates, membrane traces, and per-layer "
            "rates with --network. Single layer: a ramp of static activations from -3V to +3V, "
            "delta-injected over T micro-steps. --network: a 3-layer Linear+neuron net with "
            "seeded weights on a smooth multi-channel signal."
        ),
    )
    p.add_argument("--neuron", choices=_neuron_kinds(), default="atmn", help="neuron kind")
    p.add_argument(
        "--T",
        type=_int_at_least_1,
        default=None,
        help="micro-steps T (default 4; ternary-single: 1, its only meaningful value)",
    )
    p.add_argument(
        "--tau",
        type=_positive_float,
        default=None,
        help=f"membrane time constant tau > 0 (default {_default_tau():g}, as the models'; "
        "ternary-single has none)",
    )
    p.add_argument(
        "--v-threshold",
        type=_finite_positive_float,
        default=0.5,
        help="threshold V > 0",
    )
    p.add_argument("--network", action="store_true", help="a 3-layer Linear+neuron network")
    p.add_argument("--seed", type=int, default=0, help="seed of the network weights")
    p.add_argument("--out", type=Path, default=Path("spikemar_raster.png"), help="PNG to write")
    p.add_argument("--dpi", type=_int_at_least_1, default=120, help="resolution of the PNG")
    p.set_defaults(func=_run_raster)
    return p


def _make_neuron(kind: str, tau: float | None, v_threshold: float) -> nn.Module:
    """A neuron of ``kind`` in multi-step mode (it takes T from its input's first dimension)
    that keeps its membrane for the trace panel."""
    common = {"step_mode": "m", "store_v_seq": True, "learnable_threshold": False}
    if kind == "ternary-single":
        if tau is not None:
            raise _UsageError(
                "argument --tau: ternary-single carries no membrane between micro-steps "
                "(tau = inf); leave --tau out"
            )
        return _neuron_kinds()[kind](v_threshold, **common)
    return _neuron_kinds()[kind](_default_tau() if tau is None else tau, v_threshold, **common)


@dataclass
class _SpikeStats:
    pos: int
    neg: int
    size: int

    @classmethod
    def of(cls, spikes: torch.Tensor) -> _SpikeStats:
        return cls(int((spikes > 0).sum()), int((spikes < 0).sum()), spikes.numel())

    def __add__(self, other: _SpikeStats) -> _SpikeStats:
        return _SpikeStats(self.pos + other.pos, self.neg + other.neg, self.size + other.size)

    def summary(self) -> str:
        return (
            f"firing rate +{self.pos / self.size:.3f} / −{self.neg / self.size:.3f} "
            f"spikes per neuron per micro-step; {self.pos + self.neg} spikes "
            f"(+{self.pos} / −{self.neg}) of {self.size} neuron-micro-steps"
        )


def _run_raster(args: argparse.Namespace) -> int:
    import torch

    from spikemar import viz

    if args.neuron == "ternary-single":
        if args.T not in (None, 1):
            raise _UsageError(
                f"argument --T: ternary-single keeps no membrane between micro-steps, so under "
                f"δ-injection only micro-step 0 can fire and T = {args.T} would draw "
                f"{args.T - 1} empty micro-steps; leave --T out (T = 1) or use --neuron atmn"
            )
        args.T = 1
    elif args.T is None:
        args.T = 4
    neuron = _make_neuron(args.neuron, args.tau, args.v_threshold)
    viz.check_figure_path(args.out, name="--out")  # last of the checks: it makes the folder
    torch.manual_seed(args.seed)
    tau_text = "∞" if math.isinf(neuron.tau) else f"{neuron.tau:g}"
    setting = f"{args.neuron}, T = {args.T}, τ = {tau_text}, V = {args.v_threshold:g}"
    if args.network:
        fig, stats = _raster_network(args, neuron, setting)
    else:
        fig, stats = _raster_single(args, neuron, setting)
    path = viz.save_figure(fig, args.out, dpi=args.dpi, name="--out")
    print(path)
    print(f"raster ({setting}{', network' if args.network else ''}): {stats.summary()}")
    return 0


def _raster_single(args: argparse.Namespace, neuron: nn.Module, setting: str):
    import torch

    from spikemar import viz
    from spikemar.neurons import delta_inject

    V = args.v_threshold
    ramp = torch.linspace(-3.0, 3.0, 49) * V  # one neuron per static activation, steps of V/8
    with torch.no_grad():
        spikes = neuron(delta_inject(ramp, args.T))
        decoded = neuron.decode(spikes)

    fig = viz.new_figure((13, 9))
    grid = fig.add_gridspec(2, 2, width_ratios=(3, 2), height_ratios=(3, 2))
    ax_raster = fig.add_subplot(grid[0, 0])
    ax_rates = fig.add_subplot(grid[0, 1], sharey=ax_raster)
    ax_trace = fig.add_subplot(grid[1, :])
    fig.suptitle(f"{setting}: a ramp of static inputs I from −3V to +3V, δ-injected")

    viz.raster(spikes, ax_raster, neuron_label="neuron (its static input I)", title="spike raster")
    ticks = [i for i in range(0, 49, 8)]
    ax_raster.set_yticks(ticks, [f"{ramp[i].item() / V:+.0f}V" for i in ticks])
    viz.plot_firing_rates(
        spikes, ax_rates, horizontal=True, neuron_label="", title="firing rate per neuron"
    )
    ax_rates.tick_params(labelleft=False)

    # Three inputs that show a +1 burst, a sub-threshold decay and a −1 burst.
    picks = [int(torch.argmin((ramp - target * V).abs())) for target in (2.25, 0.75, -1.75)]
    viz.membrane_trace(
        neuron,
        spikes,
        neurons=picks,
        neuron_names=[
            f"I = {ramp[i].item() / V:+.2f}V → decodes to {decoded[i].item() / V:+.2f}V"
            for i in picks
        ],
        ax=ax_trace,
        title="membrane of three neurons",
    )
    return fig, _SpikeStats.of(spikes)


def _smooth_signal(positions: int, channels: int, amplitude: float) -> torch.Tensor:
    """[positions, channels]: sines of different frequencies and phases, a stand-in for the
    activations of a token sequence."""
    import torch

    ell = torch.arange(positions, dtype=torch.float32)[:, None] / positions
    k = torch.arange(channels, dtype=torch.float32)[None, :]
    return amplitude * torch.sin(2 * math.pi * (1 + k % 4) * ell + 0.7 * k)


def _raster_network(args: argparse.Namespace, first: nn.Module, setting: str):
    import torch
    from spikingjelly.activation_based import functional
    from torch import nn

    from spikemar import viz
    from spikemar.neurons import ATMN, delta_inject

    widths = (16, 48, 48, 32)
    neurons = [first] + [_make_neuron(args.neuron, args.tau, args.v_threshold) for _ in widths[2:]]
    layers: list[nn.Module] = []
    for fan_in, fan_out, neuron in zip(widths[:-1], widths[1:], neurons, strict=True):
        linear = nn.Linear(fan_in, fan_out)
        # Scaled so that a layer's input is a few V for inputs/spikes of order one.
        nn.init.normal_(linear.weight, std=2.0 * args.v_threshold / math.sqrt(fan_in))
        nn.init.zeros_(linear.bias)
        layers += [linear, neuron]
    net = nn.Sequential(*layers)
    positions = 16
    signal = _smooth_signal(positions, widths[0], 1.0)
    x_seq = delta_inject(signal, args.T)  # [T, positions, channels]

    layer_rates = viz.layer_firing_rates(net, x_seq)
    # Once more, layer by layer, to keep every layer's spikes (and membrane) for the plots.
    functional.reset_net(net)
    spikes = []
    with torch.no_grad():
        h = x_seq
        for module in net:
            h = module(h)
            if isinstance(module, ATMN):
                spikes.append(h)

    fig = viz.new_figure((18, 10))
    grid = fig.add_gridspec(2, 3, height_ratios=(3, 2))
    fig.suptitle(
        f"{setting}: 3 × (Linear + neuron), seed {args.seed}, "
        f"{positions} positions of a smooth signal, each δ-injected over T micro-steps"
    )
    stats = _SpikeStats(0, 0, 0)
    for k, (name, s) in enumerate(zip(layer_rates, spikes, strict=True)):
        stats = stats + _SpikeStats.of(s)
        by_position = s.permute(1, 0, 2).reshape(-1, s.shape[-1])  # [positions·T, channels]
        viz.raster(
            by_position,
            fig.add_subplot(grid[0, k]),
            time_label=f"position ℓ × micro-step t ({args.T} per position)",
            neuron_label="channel",
            title=f"layer {k + 1} (module '{name}')",
            boundary_every=args.T,
            ternary=args.neuron != "binary",
        )
    hidden = spikes[1]
    viz.plot_firing_rates(
        viz.firing_rates(hidden, batch_dims=1),
        fig.add_subplot(grid[1, 0]),
        neuron_label="channel of layer 2",
        title="layer 2 firing rate per channel (over positions and micro-steps)",
    )
    position = positions // 2
    busiest = (hidden[:, position] != 0).sum(dim=0).argsort(descending=True)[:3].tolist()
    n_channels = hidden.shape[-1]
    viz.membrane_trace(
        neurons[1],
        hidden,
        neurons=[position * n_channels + c for c in busiest],
        neuron_names=[f"channel {c}" for c in busiest],
        ax=fig.add_subplot(grid[1, 1]),
        title=f"layer 2 membrane at position {position}",
    )
    viz.plot_layer_firing_rates(
        {f"layer {k + 1}": r for k, r in enumerate(layer_rates.values())},
        fig.add_subplot(grid[1, 2]),
        title="mean firing rate per layer",
    )
    return fig, stats


# -- train / generate -----------------------------------------------------------------------------


@_named("train", "train a language model (spiking MAR, its dense twin, or a Transformer) on text")
def _add_train(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train",
        help=_add_train.summary,
        description="Train from scratch on a UTF-8 text file (default: Tiny Shakespeare from the "
        "shared data folder), with a progress bar, validation and checkpoints; --resume "
        "continues an interrupted run exactly; runs data-parallel under torchrun.",
    )
    from .training import add_loop_arguments

    p.add_argument("--model", choices=("mar", "mar-dense", "transformer"), default="mar",
                   help="spiking MAR LM, its dense twin, or a Transformer")  # fmt: skip
    add_loop_arguments(p, out="runs/model.pt")
    p.add_argument("--d-model", type=_int_at_least_1, default=128, help="model width")
    p.add_argument("--n-layers", type=_int_at_least_1, default=4, help="layers")
    p.add_argument("--n-heads", type=_int_at_least_1, default=4,
                   help="attention heads (Transformer, and MAR's attn layers)")  # fmt: skip
    p.add_argument(
        "--layers",
        default=None,
        help="MAR mixer per layer, comma-separated from ssm,attn,lti (default: ssm)",
    )
    p.add_argument("--T", type=_int_at_least_1, default=4, help="ATMN micro-steps (mar)")
    p.add_argument("--tau", type=_positive_float, default=_default_tau(), help="ATMN τ (mar)")
    p.add_argument("--v-threshold", type=_finite_positive_float, default=0.5,
                   help="initial V (mar)")  # fmt: skip
    p.set_defaults(func=_run_train)
    return p


def _run_train(args: argparse.Namespace) -> int:
    from .training import TrainConfig, loop_settings, train

    model_config: dict = {"d_model": args.d_model, "n_layers": args.n_layers}
    if args.model == "transformer":
        model_config["n_heads"] = args.n_heads
    else:
        if args.layers:
            model_config["layers"] = [k.strip() for k in args.layers.split(",")]
            if "attn" in model_config["layers"]:
                model_config["n_attn_heads"] = args.n_heads
        if args.model == "mar":
            model_config["spikes"] = {"T": args.T, "tau": args.tau,
                                      "v_threshold": args.v_threshold}  # fmt: skip
    from .training import TrainingDivergedError

    try:
        config = TrainConfig(model=args.model, model_config=model_config, **loop_settings(args))
        result = train(config, resume=args.resume, progress=not args.no_progress)
    except TrainingDivergedError:
        raise
    except (ValueError, TypeError, OSError) as err:
        if is_machine_failure(err):  # a full disk: the run failed, the input was not at fault
            # save_checkpoint's "checkpoint: cannot write PATH (reason)" is --out's here
            from ._io import reworded

            raise reworded(err, _with_flags(str(err), args, checkpoint="out")) from err
        message = str(err)
        if message.startswith("head_dim: "):  # the SSM's head size, which train does not set
            message = "d_model: the SSM's head size " + message.removeprefix("head_dim: ")
        raise _UsageError(_with_flags(message, args, path="data", n_attn_heads="n_heads")) from err
    skipped = f" ({result['skipped']} non-finite steps skipped)" if result["skipped"] else ""
    print(f"{result['checkpoint']}: best validation loss {result['best_val']:.4f} "
          f"nats/char{skipped}")  # fmt: skip
    return 0


def _with_flags(message: str, args: argparse.Namespace, **aliases: str) -> str:
    """A library message names the argument (``out: ...``); on the command line name the flag
    (``--out``), through ``aliases`` where the names differ (``path`` of the data: ``--data``),
    where the command has that flag (``args``' options); other messages are left as they are."""
    name, sep, rest = message.partition(": ")
    flag = aliases.get(name, name)
    if sep and name.isidentifier() and flag in vars(args):
        return f"--{flag.replace('_', '-')}: {rest}"
    return message


@_named("generate", "sample text from a checkpoint")
def _add_generate(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "generate",
        help=_add_generate.summary,
        description="Continue a prompt with a trained model: the prompt read in one pass "
        "(prefill), then token by token through its recurrent state (SSM state or KV cache).",
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        help="a checkpoint of spikemar train/distill/convert, or a Hugging Face Mamba-2/Llamba "
        "directory or Hub id",
    )
    add_tokenizer_argument(p, "the checkpoint's")
    add_sampling_arguments(
        p, prompt="\n", max_new_tokens=200, seed=0, unit="tokens", fit_context=True
    )
    p.set_defaults(func=_run_generate)
    return p


def _run_generate(args: argparse.Namespace) -> int:
    import torch

    from .checkpoint import load_checkpoint
    from .eval.scoring import load_model
    from .models.fused_step import unsupported_reason
    from .models.generation import context_limit
    from .models.hub import checkpoint_or_tokenizer_line
    from .tokenizer import generate_text

    prompt = args.prompt.replace("\\n", "\n")
    if not prompt:
        raise _UsageError("--prompt: expected at least one character")
    try:
        if Path(args.checkpoint).is_file() and args.tokenizer is None:
            model, tokenizer, _ = load_checkpoint(args.checkpoint)
        else:  # a Hugging Face directory or Hub id with its tokenizer, or another tokenizer
            model, tokenizer = load_model(args.checkpoint, args.tokenizer)
        # a prompt it cannot spell: one line before anything is built
        prompt_tokens = len(getattr(tokenizer, "prefix_ids", ())) + len(tokenizer.encode(prompt))
        n_new = args.max_new_tokens
        if n_new is None:  # 200, or what a Transformer's max_len leaves after the prompt
            n_new = default_new_tokens(200, prompt_tokens, context_limit(model))
        text = generate_text(
            model,
            tokenizer,
            prompt,
            n_new,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            generator=torch.Generator().manual_seed(args.seed),
            # one C call per token where the model allows (no hooks to keep on the command line)
            fused=unsupported_reason(model) is None,
        )  # stops at the tokenizer's end-of-text token, where it has one
    except (ValueError, OSError) as err:
        # the library names its argument (checkpoint, prompt, max_new_tokens): name the flag
        message = checkpoint_or_tokenizer_line(
            str(err), args.tokenizer is not None, [args.checkpoint]
        )
        raise _UsageError(_with_flags(message, args, text="prompt")) from err
    print(text)
    return 0


# -- commands that live in their sub-packages ----------------------------------------------------


def _delegated(
    name: str, module: str, arguments: str, run: str, *, help: str, description: str
) -> Callable[[argparse._SubParsersAction], argparse.ArgumentParser]:
    """``spikemar <name>``, whose options (``arguments(parser)``) and body (``run(args)`` → exit
    code) live in ``module``, imported when the parser is built."""

    def add(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
        home = importlib.import_module(module, __package__)
        p = subparsers.add_parser(name, help=help, description=description)
        getattr(home, arguments)(p)
        p.set_defaults(func=getattr(home, run))
        return p

    return _named(name, help)(add)


_add_demo = _delegated(
    "demo", ".showcase", "add_demo_arguments", "demo_main",
    help="the packaged spiking MAR student: generate text, draw its spikes, price its energy",
    description="Run the spiking MAR LM packaged with spikemar (or --checkpoint): say how it was "
    "made, generate text, draw the rasters and firing rates of its spike points into one PNG, "
    "and print its energy report beside its dense teacher.",
)  # fmt: skip
_add_energy = _delegated(
    "energy", ".energy.cli", "add_energy_arguments", "energy_main",
    help="SOP energy report (ACs, MACs, firing rates, pJ) of a model on text or random input",
    description="Count accumulates and multiply-accumulates per layer, with ternary spikes "
    "counted as one AC each, and price them under a hardware profile.",
)  # fmt: skip
_add_distill = _delegated(
    "distill", ".distill.cli", "add_distill_arguments", "distill_main",
    help="MAR distillation: stage 1 (Transformer → dense SSM), stage 2 (dense → spiking)",
    description="Distil a student from a teacher checkpoint with the SBDS loss, with a progress "
    "bar, validation and checkpoints; --resume continues exactly; runs under torchrun "
    "(DistributedDataParallel) unchanged.",
)  # fmt: skip
_add_convert = _delegated(
    "convert", ".convert", "add_convert_arguments", "convert_main",
    help="MAR-ify a pretrained SSM LM: spike points in, thresholds calibrated to a firing rate",
    description="Insert MAR's spike points into a Hugging Face Mamba-2/Llamba model (or a "
    "spikemar SSM checkpoint), calibrate per-channel thresholds on text to a target firing "
    "rate, save the student, and print the change in loss and energy per token.",
)  # fmt: skip
_add_refine = _delegated(
    "refine", ".refine.cli", "add_refine_arguments", "refine_main",
    help="module-aware refinement: measure each spike point, plan under a budget, distil",
    description="Refine a dense SSM teacher module by module: measure each spike point's KL "
    "and energy saved, choose a schedule for --budget-energy or --budget-kl (exact knapsack), "
    "train the planned student with SBDS stage 2 and evaluate it; --resume continues.",
)  # fmt: skip
_add_export = _delegated(
    "export", ".hardware.cli", "add_export_arguments", "export_main",
    help="Loihi: what runs on chip vs host; write netx HDF5 (--lava) and NIR (--nir)",
    description="Report which modules of a model run on Loihi and which stay on the host; "
    "export a Linear/Conv2d + neuron network to Lava (netx HDF5 with ATMN layers) and NIR.",
)  # fmt: skip
_add_eval = _delegated(
    "eval", ".eval.cli", "add_eval_arguments", "eval_main",
    help="zero-shot tasks (lm-evaluation-harness) or a text's perplexity, with energy per token",
    description="Score checkpoints on lm_eval tasks (spikemar's offline Tiny Shakespeare tasks by "
    "default) and write one table (JSON, Markdown) with accuracy +- stderr, perplexity, energy "
    "per token under each hardware profile and firing rates, plus an accuracy-vs-energy PNG; "
    "--text FILE gives nats/token, bits/byte and the loss by position instead.",
)  # fmt: skip


# -- the command line ---------------------------------------------------------------------------

_COMMANDS: tuple[Callable[[argparse._SubParsersAction], argparse.ArgumentParser], ...] = (
    _add_demo,
    _add_raster,
    _add_train,
    _add_generate,
    _add_energy,
    _add_distill,
    _add_convert,
    _add_refine,
    _add_export,
    _add_eval,
)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("spikemar")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The ``spikemar`` parser. With ``argv``, only the command it names gets its options (and
    imports its module): the others are listed by name and help, so a command starts without
    importing, say, transformers for ``distill``, and one whose module fails to import does not
    take the others down. Without ``argv``, every command is complete."""
    parser = _Parser(
        prog="spikemar",
        description="spikemar: spiking language models after MAR (arXiv 2601.21503).",
    )
    parser.add_argument("--version", action="version", version=f"spikemar {_version()}")
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    names = [add.command for add in _COMMANDS]
    positional = [a for a in argv if not a.startswith("-")] if argv is not None else []
    chosen = positional[0] if positional and positional[0] in names else None
    for add in _COMMANDS:
        if argv is not None and add.command != chosen:
            subparsers.add_parser(add.command, help=add.summary, add_help=False)
            continue
        sub = add(subparsers)
        # SUPPRESS: a sub-command's default must not undo `spikemar --debug COMMAND`
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                         help=_DEBUG_HELP)  # fmt: skip
        sub.set_defaults(_parser=sub)
    return parser


_DEBUG_HELP = "show the Python traceback of an error (or set SPIKEMAR_DEBUG=1)"
# a user's mistake (a bad value, a missing or existing file) as opposed to a failure of the run
_USER_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError, IsADirectoryError,
                NotADirectoryError, PermissionError)  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); return the exit code.

    A bad argument ends in ``SystemExit(2)`` with one line naming it. Any other error is one
    line on stderr: exit 2 for a mistake in the input (a missing or corrupt file, a bad value),
    1 for a run that failed (diverged, a Lava run, a full disk); Ctrl-C 130, SIGTERM 143, from
    the start (while the command's module is still being imported too). ``--debug`` or
    ``SPIKEMAR_DEBUG=1`` re-raises instead, with the traceback.
    """
    from ._io import sigterm_as_interrupt

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("SPIKEMAR_DEBUG", "") not in ("", "0")
    # SIGTERM is an exception from here on: building the parser imports the command's module
    # (torch, transformers: seconds), and an interrupt there must end as one later does
    with sigterm_as_interrupt():
        try:
            parser = build_parser(argv)
            args, unknown = parser.parse_known_args(argv)
        except KeyboardInterrupt as err:
            if debug or "--debug" in argv:  # not parsed yet
                raise
            return _interrupted(err)
        if unknown:  # argparse would blame `spikemar`; the command's own --help lists its options
            after = unknown[0] in argv[argv.index(args.command) + 1 :]
            (args._parser if after else parser).error(
                f"unrecognized arguments: {' '.join(unknown)}"
            )
        return _run(args, debug or getattr(args, "debug", False))


def _interrupted(err: KeyboardInterrupt) -> int:
    from ._io import Terminated

    return 143 if isinstance(err, Terminated) else 130


def _run(args: argparse.Namespace, debug: bool) -> int:
    """Run the parsed command; its errors as :func:`main` says."""
    try:
        return int(args.func(args))
    except _UsageError as err:
        if debug and err.__cause__ is not None:
            raise err.__cause__ from None
        args._parser.error(str(err))
    except KeyboardInterrupt as err:
        if debug:
            raise
        return _interrupted(err)
    except Exception as err:
        if debug:
            raise
        user = isinstance(err, _USER_ERRORS)
        message = " ".join(str(err).split()) or type(err).__name__
        if not (user or is_machine_failure(err) or type(err).__module__.startswith("spikemar")):
            # not one of spikemar's own errors: say what it is and where to see more
            message = f"{type(err).__name__}: {message} (--debug shows the traceback)"
        print(f"{args._parser.prog}: error: {message}", file=sys.stderr)
        return 2 if user else 1
    return 2  # not reached: error() exits


if __name__ == "__main__":
    sys.exit(main())
