"""A converted Mamba-2 at ~130 M parameters: per-token generation and prefill, spikemar against
transformers on the same (random) weights, beside the physical floor.

The model is transformers' ``Mamba2ForCausalLM`` with state-spaces/mamba2-130m's configuration
(vocabulary 50288, width 768, 24 layers, state 128, head dim 64, tied head; random weights: no
download), read into spikemar with ``models.pretrained`` (``config_from_hf`` +
``state_dict_from_hf``). Rows of one Markdown table, all from one run:

* **generation**, per token, at each ``--batches`` size: spikemar's dense model fed its own
  greedy token, as ``generate`` does, its spiking student (MAR's spike points, T = 4,
  thresholds at their initial value: the work per token does not depend on them on the CPU,
  where a spike point computes W·decode) and transformers' ``generate`` (greedy, its cache).
  spikemar's two rows per batch: ``MARLM.step`` (the modules, hooks and all: ``generate``'s
  default) and the fused step (:class:`spikemar.models.fused_step.FusedStep`, one C call per
  token: ``generate(..., fused=True)``). Every token is timed on its own: spikemar's calls by the
  clock around them, transformers' by a logits processor that notes the time at each token (so
  the time of one token includes everything ``generate`` does per token). ``--rounds``
  interleaved rounds (dense, student, fused dense, fused student, transformers, then again);
  medians over all tokens of all rounds.
* the **physical floor** per token: the bytes of weights a token must read (every parameter
  once, float32; the tied head once) at the copy bandwidth measured in the same run (bytes read
  + written per second of a 256 MB ``copy_``, the best of 5). A batch shares one read of the
  weights, so the floor is the same per step at every batch. Two ratios to it: **dense / floor**
  against the best copy of the whole run (one copy at the start, one before each timed run of
  each model), and **dense / floor, paired**: each timed run's median against the copy measured
  just before it, the median over the rounds. The machine's bandwidth moves (on the 2-core VM of
  benchmarks/RESULTS.md the copies of one run spread 22-34 GB/s), so the first pits a typical
  step against the best moment of the memory system and the second a step against the memory
  system of its moment; both are printed.
* ``--paired-tokens N`` adds one line: the fused dense step at batch 1 for N tokens, each
  right after a single 256 MB copy, so every step is set against the memory system of its own
  moment: the median over tokens of (step time / floor at the copy just before it), and the
  median step against the best of those N copies. On a VM whose bandwidth moves with other
  tenants' work, this separates the step's own cost from the machine's weather.
* **prefill**: one parallel forward over ``--prefill`` tokens (spikemar's chunked scan against
  transformers' forward), min of ``--prefill-repeats``.

Run (the whole table in one go, Markdown on stdout; minutes on 2 quiet cores, most of them in
transformers' CPU generate, which runs its torch fallback without mamba_ssm's kernels)::

    nice python benchmarks/bench_pretrained.py                # batch 1 and 8, prefill 2048
    python benchmarks/bench_pretrained.py --quick             # a tiny config: seconds

Record ``uptime`` with the numbers (the header prints the load before and after); compare ratios
within one run.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _harness, run or imported by path
import _harness as harness

MAMBA2_130M = {
    "vocab_size": 50288,
    "hidden_size": 768,
    "num_hidden_layers": 24,
    "state_size": 128,
    "head_dim": 64,
    "num_heads": 24,
    "expand": 2,
    "n_groups": 1,
    "conv_kernel": 4,
    "chunk_size": 256,
    "tie_word_embeddings": True,
}
QUICK = {**MAMBA2_130M, "vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 2,
         "state_size": 16, "head_dim": 16, "num_heads": 8, "chunk_size": 64}  # fmt: skip
PROMPT = 4  # prompt tokens before the timed ones


def copy_bandwidth(mb: int = 256, repeats: int = 5) -> float:
    """Bytes read + written per second by ``dst.copy_(src)`` (the best of ``repeats``: the
    machine's bandwidth, which a weight-streaming step could reach)."""
    src = torch.ones(mb * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t)
    return 2 * src.numel() * 4 / min(times)


def _prompt(batch: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, PROMPT), generator=torch.Generator().manual_seed(0))


def spikemar_token_times(
    model, batch: int, tokens: int, vocab: int, fused: bool = False
) -> list[float]:
    """Seconds of each of ``tokens`` greedy steps after the prompt: ``model.step`` calls, or
    ``fused``: a FusedStep's (built before the prompt, as ``generate(fused=True)`` builds one)."""
    from spikemar.models.fused_step import FusedStep

    prompt = _prompt(batch, vocab)
    times = []
    with torch.no_grad():
        step = FusedStep(model, batch) if fused else model.step
        state = model.init_state(batch, in_place=True)  # as generate's: updated in place
        for t in range(PROMPT):
            logits, state = step(prompt[:, t], state)
        for _ in range(tokens):
            start = time.perf_counter()
            logits, state = step(logits.argmax(-1), state)
            times.append(time.perf_counter() - start)
    return times


def hf_token_times(hf, batch: int, tokens: int, vocab: int) -> list[float]:
    """Seconds between consecutive tokens of one transformers ``generate`` call (greedy, its
    cache): a logits processor notes the time as each token's logits arrive."""
    from transformers import LogitsProcessor, LogitsProcessorList

    stamps: list[float] = []

    class Clock(LogitsProcessor):
        def __call__(self, input_ids, scores):
            stamps.append(time.perf_counter())
            return scores

    with torch.no_grad():
        hf.generate(_prompt(batch, vocab), max_new_tokens=tokens + 1, min_new_tokens=tokens + 1,
                    do_sample=False, pad_token_id=0, eos_token_id=None,
                    logits_processor=LogitsProcessorList([Clock()]))  # fmt: skip
    return [b - a for a, b in itertools.pairwise(stamps)]


def forward_time(fn, repeats: int) -> float:
    with torch.no_grad():
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return min(times)


def build(quick: bool):
    """(transformers model, spikemar dense, spiking student) on the same random weights."""
    from transformers import Mamba2Config, Mamba2ForCausalLM

    from spikemar.convert import spiking_student
    from spikemar.models import MARLM, SpikeConfig
    from spikemar.models.pretrained import config_from_hf, state_dict_from_hf

    torch.manual_seed(0)
    hf = Mamba2ForCausalLM(Mamba2Config(**(QUICK if quick else MAMBA2_130M))).eval()
    config = config_from_hf(hf.config.to_dict())
    dense = MARLM(config)
    dense.load_state_dict(state_dict_from_hf(config, hf.state_dict()))
    dense.eval()
    student = spiking_student(dense, SpikeConfig(T=4, tau=1.0)).eval()
    return hf, dense, student


def paired_tokens(dense, weight_bytes: int, tokens: int, copy_mb: int) -> tuple[float, float]:
    """``tokens`` fused steps at batch 1, each right after one timed copy of ``copy_mb`` MB:
    (median over tokens of step / floor at its copy, median step / floor at the best copy)."""
    from spikemar.models.fused_step import FusedStep

    src = torch.ones(copy_mb * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    ratios, steps, best = [], [], 0.0
    with torch.no_grad():
        step = FusedStep(dense, 1)
        state = dense.init_state(1, in_place=True)
        logits, state = step(torch.tensor([1]), state)
        for _ in range(tokens):
            t = time.perf_counter()
            dst.copy_(src)
            bandwidth = 2 * src.numel() * 4 / (time.perf_counter() - t)
            best = max(best, bandwidth)
            t = time.perf_counter()
            logits, state = step(logits.argmax(-1), state)
            steps.append(time.perf_counter() - t)
            ratios.append(steps[-1] * bandwidth / weight_bytes)
    return statistics.median(ratios), statistics.median(steps) * best / weight_bytes


def _ratio(a: float | None, b: float | None) -> str:
    return "–" if a is None or b is None else f"{a / b:.2f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--tokens", type=int, default=8, help="timed tokens per model and round")
    hf_help = "timed tokens of transformers' generate per round (slow on CPUs)"
    p.add_argument("--hf-tokens", type=int, default=3, help=hf_help)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--prefill", type=int, default=2048, help="prefill tokens (0: no prefill row)")
    p.add_argument("--prefill-repeats", type=int, default=1)
    p.add_argument("--no-transformers", action="store_true", help="spikemar's rows only")
    p.add_argument("--paired-tokens", type=int, default=0,
                   help="also: N fused dense steps, each right after a copy (0: none)")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="a tiny config (smoke test)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    hf, dense, student = build(args.quick)
    vocab = dense.config.vocab_size
    n_params = sum(t.numel() for t in dense.parameters())
    weight_bytes = 4 * n_params
    copy_mb = 8 if args.quick else 256
    bandwidth = copy_bandwidth(copy_mb)  # and before every timed run: the best is the floor's
    floor = weight_bytes / bandwidth
    x = torch.randint(0, vocab, (1, 16))
    with torch.no_grad():
        diff = (dense(x) - hf(x).logits).abs().max().item()
    print(f"# {n_params / 1e6:.1f} M parameters ({weight_bytes / 2**20:.0f} MiB float32), "
          f"{args.threads} threads, copy bandwidth {bandwidth / 1e9:.1f} GB/s → floor "
          f"{1e3 * floor:.1f} ms per token (weights once); max |Δlogit| spikemar dense vs "
          f"transformers {diff:.1e}; load {load_before:.2f} at the start")  # fmt: skip
    print()
    print("| row | batch | spikemar dense | spiking student | transformers | dense / floor "
          "| dense / floor, paired | transformers / dense | student / dense |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    runs = {"dense": (dense, False), "student": (student, False),
            "fused dense": (dense, True), "fused student": (student, True)}  # fmt: skip
    for batch in args.batches:
        times: dict[str, list[float]] = {name: [] for name in (*runs, "hf")}
        paired: dict[str, list[float]] = {name: [] for name in runs}  # per round: median / floor
        for model, fused in runs.values():  # warm-up: kernels built, caches touched
            spikemar_token_times(model, batch, 2, vocab, fused)
        for _ in range(args.rounds):
            for name, (model, fused) in runs.items():
                # the memory system of this moment (a copy reads whatever else the machine does)
                now = copy_bandwidth(copy_mb)
                bandwidth = max(bandwidth, now)
                run = spikemar_token_times(model, batch, args.tokens, vocab, fused)
                times[name] += run
                paired[name].append(statistics.median(run) * now / weight_bytes)
            if not args.no_transformers:
                times["hf"] += hf_token_times(hf, batch, args.hf_tokens, vocab)
            floor = weight_bytes / bandwidth
        med = {name: statistics.median(v) if v else None for name, v in times.items()}
        h = med["hf"]
        hf_cell = "–" if h is None else f"{1e3 * h:.3g}"
        rows = (("model.step", "dense", "student"), ("fused step", "fused dense", "fused student"))
        for label, dense_name, student_name in rows:
            d, s = med[dense_name], med[student_name]
            print(f"| generation ({label}), ms/token | {batch} | {1e3 * d:.3g} | {1e3 * s:.3g} | "
                  f"{hf_cell} | {d / floor:.2f} | {statistics.median(paired[dense_name]):.2f} | "
                  f"{_ratio(h, d)} | {s / d:.2f} |", flush=True)  # fmt: skip
    if args.prefill:
        tokens = torch.randint(0, vocab, (1, args.prefill))
        r = args.prefill_repeats
        t_dense = forward_time(lambda: dense(tokens), r)
        t_student = forward_time(lambda: student(tokens), r)
        t_hf = None if args.no_transformers else forward_time(lambda: hf(tokens), r)
        hf_cell = "–" if t_hf is None else f"{t_hf:.3g}"  # 3 digits: a short prefill is ms
        print(f"| prefill {args.prefill} tokens, s | 1 | {t_dense:.3g} | {t_student:.3g} | "
              f"{hf_cell} | – | – | {_ratio(t_hf, t_dense)} | "
              f"{t_student / t_dense:.2f} |")  # fmt: skip
    if args.paired_tokens:
        each, against_best = paired_tokens(dense, weight_bytes, args.paired_tokens, copy_mb)
        print()
        print(f"# fused dense step, batch 1, {args.paired_tokens} tokens each right after a "
              f"copy: step / floor at its copy, median {each:.2f}; median step / floor at the "
              f"best of those copies {against_best:.2f}")  # fmt: skip
    print()
    print(
        f"# load {load_before:.2f} before, {os.getloadavg()[0]:.2f} after, CPU pressure (60 s) "
        f"{harness.cpu_pressure()}; medians of "
        f"{args.rounds} rounds × {args.tokens} tokens (transformers' × {args.hf_tokens}); "
        f"copy bandwidth best of the start and every timed run {bandwidth / 1e9:.1f} GB/s → "
        f"floor {1e3 * floor:.1f} ms (dense / floor of a row: the best up to that row; paired: "
        "each run against the copy just before it, the median over rounds)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
