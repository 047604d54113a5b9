"""spikemar's projection kernel (``spikemar.ssm.Linear`` on the CPU, no grad) against torch's
``F.linear`` on the same weights, beside the machine's read bandwidth, per number of rows.

The weights are one token's worth of a converted 130 M Mamba-2 (state-spaces/mamba2-130m's
shapes: 24 × in_proj [3352, 768] and out_proj [768, 1536], the tied head [50288, 768]; 516 MB
float32, far beyond any cache), so every call streams them from memory as generation does. Per
row count: both kernels over all 49 matrices, ``--rounds`` rounds interleaved, medians; the read
bandwidth is ``torch.sum`` over the same bytes in the same rounds (the rate a weight-streaming
kernel could reach). The ratio column is what justifies ``spikemar.ssm.linear.MAX_FAST_ROWS``:
the kernel is used up to the row count where it stops beating ``F.linear``.

Run::

    nice python benchmarks/bench_linear.py            # ~1 min on 2 quiet cores
    python benchmarks/bench_linear.py --quick         # small shapes: seconds
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness

from spikemar.ssm.linear import MAX_FAST_ROWS, linear_cpu

SHAPES = [(3352, 768)] * 24 + [(768, 1536)] * 24 + [(50288, 768)]
QUICK_SHAPES = [(328, 64), (64, 128), (512, 64)]


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def measure(shapes: list[tuple[int, int]], rows: list[int], rounds: int) -> list[dict]:
    """Seconds per pass over all ``shapes`` for the kernel, F.linear and a sum over the bytes."""
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(n, k, generator=g) / k**0.5 for n, k in shapes]
    flat = torch.cat([w.reshape(-1) for w in weights])  # the same bytes, for the read rate
    nbytes = flat.numel() * flat.element_size()
    out = []
    for m in rows:
        xs = {k: torch.randn(m, k, generator=g) for _, k in shapes}
        runs = {
            "spikemar": lambda xs=xs: [linear_cpu(xs[w.shape[1]], w) for w in weights],
            "torch": lambda xs=xs: [F.linear(xs[w.shape[1]], w) for w in weights],
            "read": lambda: flat.sum(),
        }
        for fn in runs.values():  # warm: build, page in
            fn()
        times = {name: [] for name in runs}
        for _ in range(rounds):
            for name, fn in runs.items():
                times[name].append(_time(fn))
        med = {name: statistics.median(ts) for name, ts in times.items()}
        out.append({"rows": m, "bytes": nbytes, **med})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 12, 16, 32])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="small shapes, 3 rounds")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    load = _harness.load_average()
    shapes = QUICK_SHAPES if args.quick else SHAPES
    results = measure(shapes, args.rows, 3 if args.quick else args.rounds)
    info = _harness.machine_info(args.threads, load)
    print("\n".join(_harness.header_lines(info)))
    mb = results[0]["bytes"] / 1e6
    print(f"{len(shapes)} matrices, {mb:.1f} MB float32; medians of {args.rounds} interleaved "
          f"rounds; MAX_FAST_ROWS = {MAX_FAST_ROWS}\n")  # fmt: skip
    print("| rows | spikemar ms | GB/s | F.linear ms | GB/s | read ms (sum) | GB/s "
          "| F.linear / spikemar | spikemar / read |")  # fmt: skip
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        b = r["bytes"]
        print(f"| {r['rows']} | {r['spikemar'] * 1e3:.2f} | {b / r['spikemar'] / 1e9:.1f} | "
              f"{r['torch'] * 1e3:.2f} | {b / r['torch'] / 1e9:.1f} | {r['read'] * 1e3:.2f} | "
              f"{b / r['read'] / 1e9:.1f} | {r['torch'] / r['spikemar']:.2f} | "
              f"{r['spikemar'] / r['read']:.2f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
