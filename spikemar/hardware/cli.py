"""``spikemar export``: the Loihi view of a model from the command line.

The command's two halves, for :mod:`spikemar.cli` to wire in::

    from spikemar.hardware.cli import add_export_arguments, export_main
    p = subparsers.add_parser("export", help=...); add_export_arguments(p)
    p.set_defaults(func=export_main)          # export_main(args) -> exit code

It prints which modules run on chip and which stay on the host (with counts), writes the netx
HDF5 file (``--lava``) and the NIR file (``--nir``) of a network of Linear/Conv2d + neuron
blocks, and with ``--check-steps N`` runs the exported file in Lava's simulator and compares its
spikes with spikemar's fixed-point model. For a MAR checkpoint ``--lava DIR`` writes its on-chip
segments (:mod:`spikemar.hardware.mar_export`); ``--nir`` stops with an error that names the
first module that has to stay on the host, and why.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import time
from pathlib import Path

import torch

from .._argtypes import int_at_least_1 as _int_at_least_1
from .._argtypes import is_machine_failure
from .._io import cannot_write, check_output_path

__all__ = ["add_export_arguments", "export_main"]


def add_export_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Declare the options of ``spikemar export`` on ``parser``."""
    parser.add_argument(
        "--checkpoint",
        type=Path,
        help="a spikemar checkpoint (spikemar train / distill); default: the built-in 3-layer "
        "Linear+ATMN demo network (64-128-128-10)",
    )
    parser.add_argument(
        "--lava",
        type=Path,
        metavar="PATH",
        help="write the netx HDF5 file here; for a MAR checkpoint a folder: one file per spike "
        "point and the projections it feeds, and manifest.json",
    )
    parser.add_argument("--nir", type=Path, metavar="PATH", help="write the NIR file here")
    parser.add_argument(
        "--check-steps",
        type=_int_at_least_1,
        default=None,
        metavar="N",
        help="with --lava: run the file for N steps in Lava's fixed-point simulator on random "
        "ternary input and compare with spikemar's fixed-point model (needs .ci/lava-env)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the demo network and input")
    return parser


def _load(args: argparse.Namespace):
    if args.checkpoint is None:
        from .demo import demo_network

        return demo_network(seed=args.seed), (64,)
    from ..checkpoint import load_checkpoint

    model, _, _ = load_checkpoint(args.checkpoint, name="--checkpoint")
    return model, None


def export_main(args: argparse.Namespace) -> int:
    """Run ``spikemar export`` with parsed ``args``; returns the exit code (2 on bad input)."""
    from .chip import chip_report
    from .fixed_point import FixedPointOverflowError, UnsupportedModuleError, lower
    from .lava_export import LavaRunError, LavaUnavailableError, export_lava, run_lava
    from .nir_export import export_nir

    try:
        if args.check_steps is not None and args.lava is None:
            raise ValueError("--check-steps: give --lava PATH too")
        model, input_shape = _load(args)
        # every refusal before the report is printed and before anything is written
        if input_shape is None:
            if args.check_steps is not None:
                raise ValueError("--check-steps: only for block networks (not a language model)")
            if args.nir is not None:
                try:
                    lower(model)  # a language model: raises, naming the first module on the host
                except UnsupportedModuleError as err:
                    raise UnsupportedModuleError(f"--nir: {err}") from err
            if args.lava is not None:
                _check_segment_folder(args.lava)
        else:
            for flag in ("--lava", "--nir"):
                if getattr(args, flag[2:]) is not None:
                    check_output_path(getattr(args, flag[2:]), name=flag)
        print(chip_report(model, input_shape).to_table())
        if input_shape is None:
            if args.lava is not None:
                _export_mar(model, args)
            return 0
        if args.lava is not None:
            t0 = time.perf_counter()
            with _naming("--lava", args.lava):
                fixed = export_lava(model, args.lava, input_shape)
            print(f"\nwrote {args.lava} (netx HDF5, {time.perf_counter() - t0:.2f} s)")
            for fb in fixed.blocks:
                clamps = fixed.clamp_counts[fb.path]["threshold"]
                print(f"  block {fb.path}: scale {fb.scale:.4g}, {fb.block.neuron}, "
                      f"{clamps} thresholds clamped")  # fmt: skip
            if args.check_steps is not None:
                _check(fixed, args, input_shape, run_lava)
        if args.nir is not None:
            with _naming("--nir", args.nir):
                export_nir(model, args.nir, input_shape)
            print(f"wrote {args.nir} (NIR)")
    except (UnsupportedModuleError, FixedPointOverflowError, ValueError, OSError) as err:
        print(f"spikemar export: error: {err}", file=sys.stderr)
        # a full disk is a failed run (as a Lava run that fails), not a mistake in the input
        return 1 if is_machine_failure(err) else 2
    except (LavaUnavailableError, LavaRunError) as err:
        print(f"spikemar export: error: {err}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as err:  # h5py, nir: main dependencies, but an install can lack them
        print(f"spikemar export: error: the {err.name!r} package is missing (netx files need h5py, "
              "NIR files nir and nirtorch: `pip install h5py nir nirtorch`, or reinstall "
              "spikemar, which depends on them)", file=sys.stderr)  # fmt: skip
        return 1
    return 0


@contextlib.contextmanager
def _naming(flag: str, path: Path):
    """The library names its argument ``path``; on the command line that is ``flag``. A full
    disk that a writer did not name (a MAR export's folder or manifest.json) names ``flag`` and
    its ``path``. An OSError keeps its errno: a full disk stays a failed run."""
    try:
        yield
    except (ValueError, OSError) as err:
        message = str(err)
        if message.startswith("path: "):
            renamed = type(err)(f"{flag}: {message.removeprefix('path: ')}")
        elif is_machine_failure(err):
            renamed = cannot_write(err, path, flag)
        else:
            raise
        if isinstance(err, OSError):
            renamed.errno = err.errno
        raise renamed from err


def _check_segment_folder(path: Path) -> None:
    """A language model's ``--lava`` is a folder (a netx file per on-chip segment): refuse a
    netx file's name (it would have become a folder of that name) or an existing file."""
    if path.suffix.lower() in (".h5", ".hdf5", ".net"):
        raise ValueError(
            "--lava: a language model exports a folder (a netx HDF5 file per on-chip segment, "
            f"and manifest.json); got a file name {str(path)!r}"
        )
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"--lava: {str(path)!r} is a file; a language model exports a "
                                 "folder")  # fmt: skip


def _export_mar(model, args: argparse.Namespace) -> None:
    from .mar_export import export_mar_lava

    vocab = model.config.vocab_size
    tokens = torch.randint(0, vocab, (4, 64), generator=torch.Generator().manual_seed(args.seed))
    made = not args.lava.exists()
    try:
        with _naming("--lava", args.lava):
            manifest = export_mar_lava(model, args.lava, tokens)
    except BaseException:
        # a full disk or Ctrl-C part-way: segments without manifest.json are no export; a
        # folder this run made goes (one that was there holds what it held, and the new files)
        if made:
            shutil.rmtree(args.lava, ignore_errors=True)
        raise
    print(
        f"\nwrote {len(manifest['segments'])} on-chip segments to {args.lava}/ (netx HDF5 "
        "each, manifest.json; payload scales calibrated on 4 × 64 random tokens)"
    )
    for s in manifest["segments"]:
        print(f"  {s['file']}: {', '.join(s['projections'])} (k {s['k']:.4g}, "
              f"weight scale {s['weight_scale']:.4g})")  # fmt: skip


def _check(fixed, args: argparse.Namespace, input_shape, run_lava) -> None:
    gen = torch.Generator().manual_seed(args.seed)
    steps = args.check_steps
    active = torch.rand(steps, *input_shape, generator=gen) < 0.3
    sign = torch.where(torch.rand(steps, *input_shape, generator=gen) < 0.5, -1.0, 1.0)
    inputs = active * sign
    expected = fixed(inputs[:, None])[:, 0]
    t0 = time.perf_counter()
    got = run_lava(args.lava, inputs, steps)
    seconds = time.perf_counter() - t0
    same = int((got == expected).sum())
    print(
        f"Lava fixed point vs spikemar fixed point over {steps} steps: {same}/{got.numel()} "
        f"outputs equal ({'bit for bit' if same == got.numel() else 'MISMATCH'}), "
        f"{int(got.abs().sum())} output spikes; "
        f"{seconds:.1f} s including Lava's start-up"
    )
    if same != got.numel():
        raise ValueError("--check-steps: Lava's spikes differ from the fixed-point model")
