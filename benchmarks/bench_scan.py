"""Time the selective scan (SSD) beside the Mamba-2 authors' PyTorch reference and the naive loop.

Rows, all on the same inputs in the same run:

- ``spikemar ssd_scan[Q=…]``: :func:`spikemar.ssm.ssd_scan`, once per ``--chunk-sizes`` value
  (by default once, with its own chunk size, :func:`spikemar.ssm.default_chunk_size`);
- ``mamba2 ssd_minimal_discrete[Q=…]``: ``ssd_minimal_discrete`` from ``mamba_ssm/modules/
  ssd_minimal.py`` (Listing 1 of the Mamba-2 paper), read at run time from the ``mamba-ssm`` source
  distribution on PyPI (``pip download --no-deps --no-binary :all:``) into a temporary folder; only
  its ``segsum`` and ``ssd_minimal_discrete`` functions are executed. It needs ``einops``
  (``pip install einops``, for the benchmark only; spikemar does not use it). If either cannot be
  had, the row says why and the rest still runs;
- ``naive recurrence``: :func:`spikemar.ssm.ssd_scan_naive`, one token at a time (fewer repeats:
  ``--naive-repeats``).

Modes: ``fwd`` (under ``torch.no_grad()``) and ``fwd+bwd`` (a call on inputs that require grad,
then ``y.backward(g)`` with a fixed random ``g``: the gradient of ``<y, g>`` with respect to x, a,
B and C).
Repetitions of the chunked scans are interleaved, so that drift on a shared machine hits them alike;
the naive loop is timed after them (its gigabytes of autograd history would disturb the others).
Before timing, every implementation's ``y`` is compared with spikemar's (column ``max |Δy|``).

    python benchmarks/bench_scan.py                  # batch 4, L 1024, 8 heads, 64/64, 2 threads
    python benchmarks/bench_scan.py --chunk-sizes default 32 48 128
    python benchmarks/bench_scan.py --quick          # a smoke run, seconds
    python benchmarks/bench_scan.py --no-reference   # do not fetch mamba-ssm

The Markdown table goes to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import ast
import gc
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _harness, run or imported by path
import _harness as harness

MAMBA_VERSION = "2.3.2.post1"
MODES = ("fwd", "fwd+bwd")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
REFERENCE = "mamba2 ssd_minimal_discrete"
NAIVE = "naive recurrence"
PACKAGES = ("einops",)  # the reference's dependency: its version goes into the header


@dataclass(frozen=True)
class Config:
    batch: int = 4
    L: int = 1024
    heads: int = 8
    head_dim: int = 64
    state: int = 64
    dtype: str = "float32"
    chunk_sizes: tuple[int | None, ...] = (None,)  # None: ssd_scan's default_chunk_size
    reference_chunk: int = 64
    repeats: int = 15
    warmup: int = 3
    naive_repeats: int = 3
    threads: int = 2
    seed: int = 0
    reference: bool = True  # fetch and time ssd_minimal_discrete
    naive: bool = True
    mamba_version: str = MAMBA_VERSION
    mamba_sdist: str | None = None  # a local mamba-ssm source tarball instead of fetching one
    progress: bool = True


QUICK = Config(batch=1, L=128, heads=2, head_dim=16, state=16, repeats=3, warmup=1, naive_repeats=1)


@dataclass
class Row(harness.TimedRow):
    impl: str
    mode: str
    repeats: int
    max_abs_dy: float | None = None
    speedup_vs_reference: float | None = None
    speedup_vs_naive: float | None = None


Scan = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


# -- the Mamba-2 reference, fetched at run time ---------------------------------------------------


def fetch_ssd_minimal(version: str, sdist: str | None = None) -> tuple[Callable | None, str]:
    """``ssd_minimal_discrete`` from the mamba-ssm sdist, or (None, why not)."""
    try:
        import einops  # noqa: F401  (the reference's own dependency)
    except ImportError:
        return None, (
            "einops is not installed; ssd_minimal_discrete needs it: `pip install einops` "
            "(for this benchmark only)"
        )
    with tempfile.TemporaryDirectory(prefix="mamba-ssm-") as tmp:
        if sdist is None:
            # --no-build-isolation + MAMBA_SKIP_CUDA_BUILD: pip reads the sdist's metadata with
            # the torch installed here and builds nothing
            env = {**os.environ, "MAMBA_SKIP_CUDA_BUILD": "TRUE", "MAMBA_FORCE_BUILD": "FALSE"}
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
            cmd += ["--no-build-isolation", "-q", "-d", tmp, f"mamba-ssm=={version}"]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
            except (OSError, subprocess.TimeoutExpired) as e:
                return None, f"could not fetch mamba-ssm=={version}: {e}"
            found = sorted(Path(tmp).glob("mamba_ssm-*.tar.gz"))
            if proc.returncode or not found:
                last = (proc.stderr.strip().splitlines() or ["no tarball downloaded"])[-1]
                return None, f"could not fetch mamba-ssm=={version} from PyPI: {last[:200]}"
            sdist = str(found[0])
        try:
            with tarfile.open(sdist) as tar:
                member = next(
                    m
                    for m in tar.getmembers()
                    if m.name.endswith("mamba_ssm/modules/ssd_minimal.py")
                )
                source = tar.extractfile(member).read().decode()
        except (OSError, tarfile.TarError, StopIteration) as e:
            return None, f"no mamba_ssm/modules/ssd_minimal.py in {Path(sdist).name}: {e}"
    return _exec_functions(source, ("segsum", "ssd_minimal_discrete"))


def _exec_functions(source: str, names: tuple[str, ...]) -> tuple[Callable | None, str]:
    """Run only the imports of torch/einops and the named functions of ``source``."""
    tree = ast.parse(source)
    keep = []
    for node in tree.body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            modules = [node.module] if isinstance(node, ast.ImportFrom) else []
            modules += [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            if all(m and m.split(".")[0] in ("torch", "einops") for m in modules):
                keep.append(node)
        elif isinstance(node, ast.FunctionDef) and node.name in names:
            keep.append(node)
    missing = set(names) - {n.name for n in keep if isinstance(n, ast.FunctionDef)}
    if missing:
        return None, f"ssd_minimal.py has no {sorted(missing)}"
    namespace: dict = {}
    exec(compile(ast.Module(body=keep, type_ignores=[]), "ssd_minimal.py", "exec"), namespace)
    return namespace["ssd_minimal_discrete"], ""


# -- the implementations ---------------------------------------------------------------------------


def implementations(cfg: Config) -> list[tuple[str, Scan | None, str]]:
    """(name, fn(x, a, B, C) -> y, reason it cannot run)."""
    from spikemar.ssm import default_chunk_size, ssd_scan, ssd_scan_naive

    out: list[tuple[str, Scan | None, str]] = []
    for q in cfg.chunk_sizes:
        label = f"{default_chunk_size(cfg.head_dim, cfg.state)}, default" if q is None else q
        out.append(
            (
                f"spikemar ssd_scan[Q={label}]",
                lambda x, a, B, C, q=q: ssd_scan(x, a, B, C, chunk_size=q)[0],
                "",
            )
        )
    name = f"{REFERENCE}[Q={cfg.reference_chunk}]"
    if cfg.reference:
        _progress(cfg, f"fetching mamba-ssm=={cfg.mamba_version} for ssd_minimal_discrete …")
        fn, why = fetch_ssd_minimal(cfg.mamba_version, cfg.mamba_sdist)
        if fn is not None and cfg.L % cfg.reference_chunk:
            fn, why = None, f"needs L % {cfg.reference_chunk} == 0 (L = {cfg.L})"
        if fn is None:
            print(f"{REFERENCE}: skipped: {why}", file=sys.stderr)
        q = cfg.reference_chunk
        out.append(
            (name, None if fn is None else (lambda x, a, B, C, f=fn: f(x, a, B, C, q)[0]), why)
        )
    else:
        out.append((name, None, "not requested (--no-reference)"))
    if cfg.naive:
        out.append((NAIVE, lambda x, a, B, C: ssd_scan_naive(x, a, B, C)[0], ""))
    return out


def make_inputs(cfg: Config) -> tuple[list[torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(cfg.seed)
    dtype = DTYPES[cfg.dtype]
    b, L, h, p, n = cfg.batch, cfg.L, cfg.heads, cfg.head_dim, cfg.state

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    x = randn(b, L, h, p)
    # a = A·Δt as in Mamba-2: Δt = softplus(·) around 0.01–0.1, A = −exp(·) per head
    dt_ = torch.nn.functional.softplus(randn(b, L, h) - 3.0)
    a = (-torch.exp(torch.rand(h, generator=g)).to(dtype) * dt_).contiguous()
    B, C = randn(b, L, h, n) / n**0.5, randn(b, L, h, n) / n**0.5
    return [x, a, B, C], randn(b, L, h, p)


# -- timing ----------------------------------------------------------------------------------------


def _time_once(fn: Scan, mode: str, inputs: list[torch.Tensor], g: torch.Tensor) -> float:
    for t in inputs:
        t.grad = None
    if mode == "fwd":
        with torch.no_grad():
            start = time.perf_counter()
            fn(*inputs)
            return (time.perf_counter() - start) * 1e3
    start = time.perf_counter()
    fn(*inputs).backward(g)
    return (time.perf_counter() - start) * 1e3


def measure(cfg: Config, rows: list[Row]) -> None:
    """Append to ``rows`` as it goes, so that an interrupted run keeps what it measured."""
    inputs, g = make_inputs(cfg)
    impls = implementations(cfg)
    with torch.no_grad():
        y_ref = impls[0][1](*inputs)
    for mode in MODES:
        for t in inputs:
            t.requires_grad_(mode == "fwd+bwd")
        live: list[tuple[Scan, Row]] = []
        for name, fn, why in impls:
            repeats = cfg.naive_repeats if name == NAIVE else cfg.repeats
            row = Row(name, mode, repeats)
            rows.append(row)
            if fn is None:
                row.skipped = why
                continue
            _progress(cfg, f"{mode}: {name} warm-up")
            try:
                if mode == "fwd":
                    with torch.no_grad():
                        row.max_abs_dy = float((fn(*inputs) - y_ref).abs().max())
                for _ in range(cfg.warmup if name != NAIVE else min(cfg.warmup, 1)):
                    _time_once(fn, mode, inputs, g)
            except Exception as e:  # a broken implementation costs its row, not the run
                row.skipped = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
                continue
            live.append((fn, row))
        # the chunked scans interleaved; the naive loop after them, on its own: its gigabytes of
        # autograd history would otherwise evict the others' memory between their calls
        chunked = [(fn, row) for fn, row in live if row.impl != NAIVE]
        gc.collect()
        for i in range(cfg.repeats):
            _progress(cfg, f"{mode}: repetition {i + 1}")
            for fn, row in chunked:
                row.times_ms.append(_time_once(fn, mode, inputs, g))
        for fn, row in live:
            if row.impl == NAIVE:
                for i in range(row.repeats):
                    _progress(cfg, f"{mode}: {NAIVE} repetition {i + 1}")
                    gc.collect()
                    row.times_ms.append(_time_once(fn, mode, inputs, g))


def summarize(rows: list[Row]) -> None:
    by_key = {(r.mode, r.impl): r for r in rows}
    for r in rows:
        r.summarize_times()
    for r in rows:
        if r.median_ms is None:
            continue
        for prefix, attr in ((REFERENCE, "speedup_vs_reference"), (NAIVE, "speedup_vs_naive")):
            other = next(
                (o for (m, name), o in by_key.items() if m == r.mode and name.startswith(prefix)),
                None,
            )
            if other is not None and other.median_ms:
                setattr(r, attr, other.median_ms / r.median_ms)


# -- report ----------------------------------------------------------------------------------------


def machine_info(cfg: Config, load_at_start: float | None = None) -> dict[str, str]:
    """The machine, as in :func:`_harness.machine_info`, with the einops version."""
    return harness.machine_info(
        cfg.threads, load_at_start, packages=PACKAGES, with_cpu_pressure=False
    )


def _fmt(v: float | None, spec: str) -> str:
    return harness.fmt(v, spec, nan_is_missing=False)  # a NaN max |Δy| is news, not a gap


def markdown(rows: list[Row], info: dict[str, str], cfg: Config, note: str = "") -> str:
    lines = [
        *harness.header_lines(info, PACKAGES),
        f"batch {cfg.batch}, L {cfg.L}, {cfg.heads} heads, head_dim {cfg.head_dim}, "
        f"state {cfg.state}, {cfg.dtype}; median of {cfg.repeats} calls after {cfg.warmup} "
        f"warm-up (naive: {cfg.naive_repeats}); ssd_minimal_discrete from mamba-ssm "
        f"{cfg.mamba_version}. × = that row's median / this row's median (> 1: this row is "
        "faster).",
        "",
    ]
    if note:
        lines += [note, ""]
    lines += [
        "| mode | implementation | median ms | IQR ms | min ms | × vs ssd_minimal_discrete "
        "| × vs naive | max \\|Δy\\| vs spikemar |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        head = f"| {r.mode} | {r.impl} |"
        if r.median_ms is None:
            lines.append(f"{head} {r.skipped or 'not measured'} | | | | | |")
            continue
        lines.append(
            f"{head} {r.median_ms:.1f} | {r.q25_ms:.1f}–{r.q75_ms:.1f} | {r.min_ms:.1f} "
            f"| {_fmt(r.speedup_vs_reference, '.2f')} | {_fmt(r.speedup_vs_naive, '.1f')} "
            f"| {_fmt(r.max_abs_dy, '.1e') if r.mode == 'fwd' else ''} |"
        )
    return "\n".join(lines)


def _progress(cfg: Config, msg: str) -> None:
    if cfg.progress:
        print(msg, file=sys.stderr, flush=True)


def run(cfg: Config) -> tuple[list[Row], bool]:
    """Measure ``cfg``; returns (rows, interrupted)."""
    rows, interrupted = harness.measure_rows(measure, cfg, cfg.threads)
    summarize(rows)
    return rows, interrupted


def parse_args(argv: list[str] | None = None) -> tuple[Config, str | None]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    d = Config()
    ap.add_argument("--batch", type=int, default=d.batch)
    ap.add_argument("--L", type=int, default=d.L, help="sequence length (tokens)")
    ap.add_argument("--heads", type=int, default=d.heads)
    ap.add_argument("--head-dim", type=int, default=d.head_dim)
    ap.add_argument("--state", type=int, default=d.state)
    ap.add_argument("--dtype", choices=list(DTYPES), default=d.dtype)
    ap.add_argument(
        "--chunk-sizes",
        nargs="+",
        default=["default"],
        metavar="Q",
        help="one spikemar row per chunk size; 'default': ssd_scan's own choice (the default)",
    )
    ap.add_argument("--reference-chunk", type=int, default=d.reference_chunk)
    ap.add_argument("--repeats", type=int, default=d.repeats, help="timed calls per row")
    ap.add_argument("--warmup", type=int, default=d.warmup, help="untimed calls per row first")
    ap.add_argument("--naive-repeats", type=int, default=d.naive_repeats)
    ap.add_argument("--threads", type=int, default=d.threads, help="torch.set_num_threads")
    ap.add_argument("--no-reference", action="store_true", help="do not fetch mamba-ssm")
    ap.add_argument("--no-naive", action="store_true", help="skip the (slow) naive recurrence")
    ap.add_argument("--mamba-version", default=d.mamba_version)
    ap.add_argument("--mamba-sdist", metavar="PATH", help="a local mamba-ssm .tar.gz to read")
    ap.add_argument("--json", metavar="PATH", help="also write the raw results here")
    ap.add_argument("--quick", action="store_true", help="a tiny smoke configuration")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    base = QUICK if a.quick else d
    explicit = {
        "threads": a.threads,
        "dtype": a.dtype,
        "reference": not a.no_reference,
        "naive": not a.no_naive,
        "mamba_version": a.mamba_version,
        "mamba_sdist": a.mamba_sdist,
        "progress": not a.no_progress,
    }
    if not a.quick:
        explicit |= {
            "batch": a.batch,
            "L": a.L,
            "heads": a.heads,
            "head_dim": a.head_dim,
            "state": a.state,
            "chunk_sizes": tuple(_chunk_size(ap, q) for q in a.chunk_sizes),
            "reference_chunk": a.reference_chunk,
            "repeats": a.repeats,
            "warmup": a.warmup,
            "naive_repeats": a.naive_repeats,
        }
    cfg = Config(**{**asdict(base), **explicit})
    sizes = (cfg.batch, cfg.L, cfg.heads, cfg.head_dim, cfg.state, cfg.repeats)
    sizes += tuple(q for q in cfg.chunk_sizes if q is not None)
    if min(sizes) < 1 or cfg.warmup < 0 or cfg.naive_repeats < 1:
        ap.error("sizes, chunk sizes and repeats must be >= 1, --warmup >= 0")
    return cfg, a.json


def _chunk_size(ap: argparse.ArgumentParser, text: str) -> int | None:
    if text == "default":
        return None
    if not text.isdigit() or int(text) < 1:
        ap.error(f"--chunk-sizes: expected 'default' or positive integers, got {text!r}")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    cfg, json_path = parse_args(argv)
    load_at_start = harness.load_average()
    rows, interrupted = run(cfg)
    info = machine_info(cfg, load_at_start)
    print(markdown(rows, info, cfg, harness.INTERRUPTED_NOTE if interrupted else ""))
    return harness.finish(json_path, info, cfg, rows, interrupted)


if __name__ == "__main__":
    sys.exit(main())
