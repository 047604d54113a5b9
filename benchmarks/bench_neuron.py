"""Time the ATMN neuron's backends beside their peers, forward and forward + backward.

Each spikemar backend (every name in ``spikemar.neurons.available_backends()``, plus 'auto') runs
the multi-step module ``ATMN(step_mode='m')`` over ``x_seq`` [T, N]; in the same run, on the same
input, SpikingJelly 2.0's ``LIFNode`` and ``TernaryLIFNode(v_reset=None)`` and norse's ``LIF``.
Repetitions are interleaved across implementations (rep 1 of every one, then rep 2, …) so that
drift of a noisy machine hits all of them alike. Stateful neurons are reset before every call.

Reported per row: median, interquartile range and minimum in ms; speed-up relative to
``ATMN[torch]`` and to SpikingJelly's ``LIFNode`` (their time / this time, > 1 is faster);
achieved bandwidth under the minimal-traffic model of ``benchmarks/README.md`` (forward 2·T·N·b
bytes, forward + backward 5·T·N·b) and its fraction of a ``tensor.copy_`` bandwidth measured in
the same run (64 MiB; at least 1 GiB on CUDA, where a shorter copy is dominated by its launch).

    python benchmarks/bench_neuron.py                          # T=4, N=2^20, 2 threads, CPU
    python benchmarks/bench_neuron.py --T 4 8 16 --N 65536 1048576 --json out.json
    python benchmarks/bench_neuron.py --quick                  # seconds: a smoke run
    python benchmarks/bench_neuron.py --compare-kernels OLD/spikemar/neurons/_cpu  # C before/after

The Markdown table goes to stdout; progress to stderr. Ctrl-C prints what has been measured.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _harness, run or imported by path
import _harness as harness

REFERENCE = "ATMN[torch]"
PEER_PACKAGES = ("spikingjelly", "norse")
LIF_PEER = "sj.LIFNode"
DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
MODES = ("fwd", "fwd+bwd")
# Bytes moved per element of x_seq, in units of the element size b: the minimal-traffic model.
# Forward reads x and writes s. Backward reads grad_s, reads x again (or a saved h of the same
# size) to evaluate the surrogate at h_t, and writes grad_x. O(N) membrane terms are ignored.
TRAFFIC_ELEMENTS = {"fwd": 2, "fwd+bwd": 5}
COPY_BYTES = 64 * 2**20
# on a GPU a 64 MiB copy lasts some tens of µs, of which the launch and the synchronisation
# around the host's clock would be a sizeable part (a low copy bandwidth, so a flattering
# '% of copy'): there the copy moves at least this much
CUDA_COPY_BYTES = 2**30


@dataclass(frozen=True)
class Config:
    T: tuple[int, ...] = (4,)
    N: tuple[int, ...] = (2**20,)
    repeats: int = 15
    warmup: int = 3
    threads: int = 2
    devices: tuple[str, ...] = ("cpu",)
    dtype: str = "float32"
    tau: float = 2.0
    v_threshold: float = 1.0
    copy_bytes: int = COPY_BYTES
    seed: int = 0
    progress: bool = True
    # spikemar backends to time; None: every name in available_backends(), then 'auto'
    backends: tuple[str, ...] | None = None

    def backend_names(self) -> list[str]:
        from spikemar.neurons import available_backends

        return list(self.backends) if self.backends else [*available_backends(), "auto"]


QUICK = Config(T=(2,), N=(4096,), repeats=3, warmup=1, copy_bytes=4 * 2**20)


@dataclass
class Row(harness.TimedRow):
    device: str
    dtype: str
    T: int
    N: int
    impl: str
    mode: str
    repeats: int
    spike_rate: float | None = None
    # filled in by summarize()
    traffic_bytes: int | None = None
    gb_per_s: float | None = None
    copy_fraction: float | None = None
    speedup_vs_reference: float | None = None
    speedup_vs_lif: float | None = None


@dataclass
class Impl:
    """A neuron under test: ``call(x_seq) -> spikes`` and a ``reset()`` run before each call."""

    name: str
    module: nn.Module
    call: Callable[[torch.Tensor], torch.Tensor]

    def reset(self) -> None:
        from spikingjelly.activation_based import functional

        functional.reset_net(self.module)
        self.module.zero_grad(set_to_none=True)


# -- the implementations ----------------------------------------------------------------------


def spikemar_impls(cfg: Config, device: str, probe: torch.Tensor) -> list[Impl | tuple[str, str]]:
    """One ATMN module per registered backend and one for 'auto' (named after the backend it
    picks for ``probe``); ``(name, reason)`` for a backend that cannot run ``probe``."""
    from spikemar.neurons import ATMN, available_backends

    out: list[Impl | tuple[str, str]] = []
    for backend in cfg.backend_names():
        module = ATMN(tau=cfg.tau, v_threshold=cfg.v_threshold, step_mode="m", backend=backend)
        module = module.to(device)
        p = module.parameters_tuple()
        name = f"ATMN[{backend}]"
        try:
            impl = _resolve(backend, probe, p)
        except RuntimeError as e:  # e.g. a CUDA backend asked to run a CPU tensor
            out.append((name, str(e)))
            continue
        if backend == "auto":
            chosen = [b for b in available_backends() if _resolves_to(b, probe, p, impl)]
            name = f"ATMN[auto→{chosen[0]}]" if chosen else name
        out.append(Impl(name, module, module))
    return out


def _resolve(backend: str, probe: torch.Tensor, p) -> Callable:
    from spikemar.neurons.backends import resolve_backend

    return resolve_backend(backend, probe, p)


def _resolves_to(backend: str, probe: torch.Tensor, p, impl: Callable) -> bool:
    try:
        return _resolve(backend, probe, p) is impl
    except RuntimeError:
        return False


def peer_impls(cfg: Config, device: str) -> list[Impl | tuple[str, str]]:
    out: list[Impl | tuple[str, str]] = []
    try:
        from spikingjelly.activation_based import neuron
    except ImportError as e:
        out += [(LIF_PEER, f"spikingjelly not importable: {e}"), ("sj.TernaryLIFNode", str(e))]
    else:
        lif = neuron.LIFNode(tau=cfg.tau, v_threshold=cfg.v_threshold, step_mode="m").to(device)
        ternary = neuron.TernaryLIFNode(
            tau=float(cfg.tau), v_threshold=float(cfg.v_threshold), v_reset=None, step_mode="m"
        ).to(device)
        out += [Impl(LIF_PEER, lif, lif), Impl("sj.TernaryLIFNode", ternary, ternary)]
    try:
        import norse.torch as norse
    except ImportError as e:
        out.append(("norse.LIF", f"norse not importable: {e}"))
    else:
        # norse's LIF is a time-first multi-step module returning (spikes, final state); with no
        # state passed it starts from a fresh one on every call, so it needs no reset.
        lif = norse.LIF(norse.LIFParameters(v_th=torch.as_tensor(cfg.v_threshold))).to(device)
        out.append(Impl("norse.LIF", lif, lambda x, m=lif: m(x)[0]))
    return out


# -- timing -----------------------------------------------------------------------------------


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _time_once(impl: Impl, mode: str, x: torch.Tensor, g: torch.Tensor, device: str) -> float:
    """One call in ms; resetting the neuron and clearing gradients are outside the clock."""
    impl.reset()
    x.grad = None
    _sync(device)
    if mode == "fwd":
        with torch.no_grad():
            start = time.perf_counter()
            spikes = impl.call(x)
            _sync(device)
            elapsed = time.perf_counter() - start
    else:
        start = time.perf_counter()
        spikes = impl.call(x)
        # the gradient of (spikes * g).sum(), handed in directly: no extra multiply and reduction
        spikes.backward(g)
        _sync(device)
        elapsed = time.perf_counter() - start
    del spikes
    return elapsed * 1e3


def copy_bandwidth(nbytes: int, device: str, repeats: int, warmup: int) -> float:
    """Median bandwidth of ``dst.copy_(src)`` in GB/s, counting the bytes read plus written."""
    src = torch.rand(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    times = []
    for i in range(warmup + repeats):
        _sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return 2 * src.numel() * src.element_size() / statistics.median(times) / 1e9


def measure(cfg: Config, rows: list[Row], copy_gbps: dict[str, float]) -> None:
    """Append to ``rows`` as it goes, so that an interrupted run keeps what it measured."""
    from tqdm import tqdm

    torch.manual_seed(cfg.seed)
    dtype = DTYPES[cfg.dtype]
    cases = [(d, T, N) for d in cfg.devices for T in cfg.T for N in cfg.N]
    n_impls = len(cfg.backend_names()) + 3  # the three peers
    total = len(cases) * len(MODES) * n_impls * (cfg.warmup + cfg.repeats)
    bar = tqdm(total=total, disable=not cfg.progress, file=sys.stderr, unit="call")
    try:
        for device in cfg.devices:
            if device not in copy_gbps:
                bar.set_description(f"copy bandwidth {device}")
                nbytes = cfg.copy_bytes
                if device.startswith("cuda"):
                    nbytes = max(nbytes, CUDA_COPY_BYTES)
                copy_gbps[device] = copy_bandwidth(nbytes, device, max(cfg.repeats, 5), cfg.warmup)
            for T in cfg.T:
                for N in cfg.N:
                    _measure_case(cfg, device, dtype, T, N, rows, bar)
    finally:
        bar.close()


def _measure_case(cfg, device, dtype, T, N, rows, bar) -> None:
    x = torch.randn(T, N, device=device, dtype=dtype)
    g = torch.randn(T, N, device=device, dtype=dtype)
    impls = spikemar_impls(cfg, device, x) + peer_impls(cfg, device)
    for mode in MODES:
        x.requires_grad_(mode == "fwd+bwd")
        live: list[tuple[Impl, Row]] = []
        for impl in impls:
            if isinstance(impl, tuple):
                name, reason = impl
                rows.append(Row(device, cfg.dtype, T, N, name, mode, cfg.repeats, skipped=reason))
                bar.update(cfg.warmup + cfg.repeats)
                continue
            row = Row(device, cfg.dtype, T, N, impl.name, mode, cfg.repeats)
            rows.append(row)
            bar.set_description(f"{device} T={T} N={N} {mode} warm-up")
            try:
                for _ in range(cfg.warmup):
                    _time_once(impl, mode, x, g, device)
                    bar.update()
                with torch.no_grad():
                    impl.reset()
                    row.spike_rate = float((impl.call(x) != 0).float().mean())
            except Exception as e:  # a broken implementation costs its row, not the run
                row.skipped = harness.failure(e)
                bar.update(cfg.warmup + cfg.repeats)
                continue
            live.append((impl, row))
        bar.set_description(f"{device} T={T} N={N} {mode}")
        gc.collect()
        for _ in range(cfg.repeats):
            for impl, row in list(live):
                try:
                    row.times_ms.append(_time_once(impl, mode, x, g, device))
                except Exception as e:
                    row.skipped, row.times_ms = harness.failure(e), []
                    live.remove((impl, row))
                bar.update()
        x.grad = None


# -- summary and report -----------------------------------------------------------------------


def summarize(rows: list[Row], copy_gbps: dict[str, float]) -> None:
    by_key = {(r.device, r.dtype, r.T, r.N, r.mode, r.impl): r for r in rows}
    for r in rows:
        if not r.summarize_times():
            continue
        b = DTYPES[r.dtype].itemsize
        r.traffic_bytes = TRAFFIC_ELEMENTS[r.mode] * r.T * r.N * b
        r.gb_per_s = r.traffic_bytes / (r.median_ms * 1e-3) / 1e9
        if r.device in copy_gbps:
            r.copy_fraction = r.gb_per_s / copy_gbps[r.device]
        for ref, attr in ((REFERENCE, "speedup_vs_reference"), (LIF_PEER, "speedup_vs_lif")):
            other = by_key.get((r.device, r.dtype, r.T, r.N, r.mode, ref))
            if other is not None and other.times_ms:
                setattr(r, attr, statistics.median(other.times_ms) / r.median_ms)


def machine_info(cfg: Config, load_at_start: float | None = None) -> dict[str, str]:
    """The machine, as in :func:`_harness.machine_info`, with the peers' versions and the GPU."""
    return harness.machine_info(
        cfg.threads,
        load_at_start,
        packages=PEER_PACKAGES,
        gpu=any(d.startswith("cuda") for d in cfg.devices),
    )


def markdown(
    rows: list[Row], info: dict[str, str], copy_gbps: dict[str, float], note: str = ""
) -> str:
    lines = [
        *harness.header_lines(info, PEER_PACKAGES),
        "Copy bandwidth (`tensor.copy_`, read + write, median): "
        + ", ".join(f"{d} {v:.1f} GB/s" for d, v in copy_gbps.items()),
        "",
    ]
    if note:
        lines += [note, ""]
    lines += [
        "| device | T | N | mode | implementation | median ms | IQR ms | min ms "
        f"| × vs {REFERENCE} | × vs {LIF_PEER} | GB/s | % of copy | spike rate |",
        "| --- | ---: | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    fmt = harness.fmt
    for r in rows:
        partial = f" (n={len(r.times_ms)})" if 0 < len(r.times_ms) < r.repeats else ""
        head = f"| {r.device} | {r.T} | {_pow2(r.N)} | {r.mode} | {r.impl}{partial} |"
        if r.median_ms is None:
            reason = r.skipped or "not measured (interrupted)"
            lines.append(f"{head} {reason} | | | | | | | |")
            continue
        lines.append(
            f"{head} {r.median_ms:.2f} | {r.q25_ms:.2f}–{r.q75_ms:.2f} | {r.min_ms:.2f} "
            f"| {fmt(r.speedup_vs_reference, '.2f')} | {fmt(r.speedup_vs_lif, '.2f')} "
            f"| {fmt(r.gb_per_s, '.1f')} | {fmt(_pct(r.copy_fraction), '.1f', '%')} "
            f"| {fmt(r.spike_rate, '.2f')} |"
        )
    return "\n".join(lines)


def _pct(v: float | None) -> float | None:
    return None if v is None else 100 * v


def _pow2(n: int) -> str:
    return f"2^{n.bit_length() - 1}" if n > 0 and n & (n - 1) == 0 else str(n)


def run(cfg: Config) -> tuple[list[Row], dict[str, float], bool]:
    """Measure ``cfg``; returns (rows, copy bandwidth per device in GB/s, interrupted)."""
    copy_gbps: dict[str, float] = {}
    rows, interrupted = harness.measure_rows(measure, cfg, cfg.threads, copy_gbps)
    summarize(rows, copy_gbps)
    return rows, copy_gbps, interrupted


def parse_args(argv: list[str] | None = None) -> tuple[Config, str | None, str | None]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    d = Config()
    ap.add_argument("--T", type=int, nargs="+", default=list(d.T), help="micro-steps")
    ap.add_argument("--N", type=int, nargs="+", default=list(d.N), help="neurons per step")
    ap.add_argument("--repeats", type=int, default=d.repeats, help="timed calls per row")
    ap.add_argument("--warmup", type=int, default=d.warmup, help="untimed calls per row")
    ap.add_argument("--threads", type=int, default=d.threads, help="torch.set_num_threads")
    ap.add_argument("--device", nargs="+", choices=["cpu", "cuda"], default=list(d.devices))
    ap.add_argument("--dtype", choices=list(DTYPES), default=d.dtype)
    ap.add_argument(
        "--backends",
        nargs="+",
        metavar="NAME",
        help="spikemar backends to time (default: all of available_backends(), then 'auto')",
    )
    ap.add_argument(
        "--compare-kernels",
        metavar="CPU_DIR",
        help="instead: time the C kernels built from CPU_DIR (another checkout's "
        "spikemar/neurons/_cpu) and from this one in one process, interleaved",
    )
    ap.add_argument("--json", metavar="PATH", help="also write the raw results here")
    ap.add_argument("--quick", action="store_true", help="a tiny smoke configuration")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    devices = tuple(a.device)
    if "cuda" in devices and not torch.cuda.is_available():
        print("cuda: not available here; measuring the other devices only", file=sys.stderr)
        devices = tuple(x for x in devices if x != "cuda")
    if not devices:
        ap.error("no device to measure")
    from spikemar.neurons import available_backends

    known = [*available_backends(), "auto"]
    backends = tuple(a.backends) if a.backends else None
    if backends and not set(backends) <= set(known):
        ap.error(f"--backends: expected names from {known}, got {list(backends)}")
    if a.quick:
        cfg = Config(
            **{**asdict(QUICK), "devices": devices, "threads": a.threads, "backends": backends}
        )
    else:
        cfg = Config(
            T=tuple(a.T),
            N=tuple(a.N),
            repeats=a.repeats,
            warmup=a.warmup,
            threads=a.threads,
            devices=devices,
            dtype=a.dtype,
            backends=backends,
        )
    if min(cfg.T) < 1 or min(cfg.N) < 1 or cfg.repeats < 1 or cfg.warmup < 0:
        ap.error("--T, --N and --repeats must be >= 1, --warmup >= 0")
    return Config(**{**asdict(cfg), "progress": not a.no_progress}), a.json, a.compare_kernels


def _kernel_calls(lib, b: dict, backward: bool) -> Callable[[], None]:
    """One ATMN forward (and backward) through ``lib``'s entry points on the buffers of ``b``."""

    def run_once() -> None:
        x, vth, T, N, B, d, n = b["x"], b["vth"], b["T"], b["N"], b["B"], b["decay"], b["threads"]
        lib.atmn_forward_f32(x.data_ptr(), None, vth.data_ptr(), T, N, 0, B, d, 1,
                             b["spikes"].data_ptr(), b["v_last"].data_ptr(), None, n)  # fmt: skip
        if backward:  # the rectangle surrogate of width 1: pa = 0.5, pb = 1
            lib.atmn_backward_f32(x.data_ptr(), None, vth.data_ptr(), T, N, 0, B, d, 1, 0, 0,
                                  0.5, 1.0, b["gs"].data_ptr(), None, None, b["g_x"].data_ptr(),
                                  None, b["partial"].data_ptr(), n)  # fmt: skip

    return run_once


def compare_kernels(cfg: Config, old_dir: str) -> str:
    """The ATMN forward and forward + backward kernels (float32, shared threshold) of two builds,
    called through the same ctypes entry points, repetitions interleaved: a before/after of a
    change to the C sources free of the drift between two processes. Markdown table."""
    from spikemar.neurons import cpu_backend

    torch.set_num_threads(cfg.threads)
    libs = {
        "before": cpu_backend.build_kernels_from(old_dir),
        "after": cpu_backend.build_kernels_from(Path(cpu_backend.__file__).parent / "_cpu"),
    }
    load = harness.load_average()
    lines = [
        f"Kernels of {old_dir} (before) and of this checkout (after), {cfg.threads} threads, "
        f"{cfg.repeats} interleaved repetitions, load {load if load is None else f'{load:.1f}'}",
        "",
        "| T | N | mode | before median / min ms | after median / min ms | after/before medians |",
        "| ---: | ---: | --- | ---: | ---: | ---: |",
    ]
    for T in cfg.T:
        for N in cfg.N:
            g = torch.Generator().manual_seed(cfg.seed)
            B = max(1024, min(8192, (1 << 15) // T))  # cpu_backend's block for a shared V
            bufs = {
                "x": torch.randn(T, N, generator=g),
                "gs": torch.randn(T, N, generator=g),
                "vth": torch.tensor(cfg.v_threshold),
                "spikes": torch.empty(T, N),
                "g_x": torch.empty(T, N),
                "v_last": torch.empty(N),
                "partial": torch.zeros(cfg.threads, B, dtype=torch.float64),
                "T": T, "N": N, "B": B, "decay": 1.0 / cfg.tau, "threads": cfg.threads,
            }  # fmt: skip
            for mode in MODES:
                fns = {k: _kernel_calls(lib, bufs, mode == "fwd+bwd") for k, lib in libs.items()}
                times: dict[str, list[float]] = {k: [] for k in fns}
                for _ in range(cfg.warmup):
                    for f in fns.values():
                        f()
                for _ in range(cfg.repeats):
                    for k, f in fns.items():
                        t0 = time.perf_counter()
                        f()
                        times[k].append((time.perf_counter() - t0) * 1e3)
                med = {k: statistics.median(v) for k, v in times.items()}
                lo = {k: min(v) for k, v in times.items()}
                lines.append(
                    f"| {T} | {_pow2(N)} | {mode} | {med['before']:.2f} / {lo['before']:.2f} | "
                    f"{med['after']:.2f} / {lo['after']:.2f} | {med['after'] / med['before']:.3f} |"
                )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    cfg, json_path, old_kernels = parse_args(argv)
    if old_kernels:
        print(compare_kernels(cfg, old_kernels))
        return 0
    load_at_start = harness.load_average()
    rows, copy_gbps, interrupted = run(cfg)
    info = machine_info(cfg, load_at_start)
    print(markdown(rows, info, copy_gbps, harness.INTERRUPTED_NOTE if interrupted else ""))
    extra = {"copy_gb_per_s": copy_gbps, "traffic_model_elements": TRAFFIC_ELEMENTS}
    return harness.finish(json_path, info, cfg, rows, interrupted, **extra)


if __name__ == "__main__":
    sys.exit(main())
