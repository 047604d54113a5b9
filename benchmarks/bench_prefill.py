"""Reading a prompt: spikemar's ``prefill`` (one parallel pass) against feeding it token by token,
and against transformers, on a converted Mamba-2 at ~130 M parameters; and greedy evaluation
(lm-evaluation-harness's ``generate_until``) through prefill + steps against re-running the
forward pass per new token.

The model is the one of ``bench_pretrained.py`` (transformers' ``Mamba2ForCausalLM`` with
state-spaces/mamba2-130m's configuration, random weights, read into spikemar; its spiking
student with T = 4). Rows of one Markdown table, all from one run, per prompt length P:

* **time to the first token**: the logits after a prompt of P tokens (batch 1) —
  ``MARLM.prefill`` (what ``generate`` now runs: the chunked scan from the state), P calls of
  ``MARLM.step`` (what ``generate`` ran before), P calls of the fused step
  (:class:`spikemar.models.fused_step.FusedStep`), and transformers' ``generate`` with
  ``max_new_tokens=1`` (its parallel prefill, torch path: no mamba_ssm kernels on the CPU);
  min of ``--repeats`` after a warm-up call (transformers: one timed call after one untimed);
* **greedy evaluation**: :meth:`spikemar.eval.scoring.Scorer.greedy_until` on one context of P
  tokens, ``--new`` tokens, no stop: the recurrent path (prefill + one step per token) against
  the path a model with a context limit takes (the forward pass over the sequence so far per new
  token: what SSM models ran before), min of ``--repeats``; then eight requests of P tokens,
  their steps one request at a time (batch size 1) or all eight at once (batch size 8).

    nice python benchmarks/bench_prefill.py                  # P = 64, 512: a few minutes
    python benchmarks/bench_prefill.py --quick               # a tiny config: seconds
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as harness
from bench_pretrained import build


def best(fn, repeats: int, warm: bool = True) -> float:
    """Seconds of the fastest of ``repeats`` calls, after one untimed call (``warm``)."""
    times = []
    with torch.no_grad():
        if warm:
            fn()
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return min(times)


def ms(seconds: float) -> str:
    """Three significant digits, in ms below a second, else in s."""
    return f"{1e3 * seconds:.3g} ms" if seconds < 1 else f"{seconds:.3g} s"


def stepped(step, model, prompt):
    state = model.init_state(prompt.shape[0], in_place=True)
    logits = None
    for t in range(prompt.shape[1]):
        logits, state = step(prompt[:, t], state)
    return logits


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, nargs="+", default=[64, 512])
    p.add_argument("--new", type=int, default=16, help="greedy evaluation: new tokens")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-transformers", action="store_true")
    p.add_argument("--quick", action="store_true", help="a tiny config (smoke test)")
    args = p.parse_args(argv)
    for name in ("repeats", "threads", "new"):
        if getattr(args, name) < 1:
            p.error(f"--{name}: expected an int >= 1, got {getattr(args, name)}")
    if any(n < 1 for n in args.prompts):
        p.error(f"--prompts: expected ints >= 1, got {args.prompts}")
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    hf, dense, student = build(args.quick)
    vocab = dense.config.vocab_size
    print(f"# {sum(t.numel() for t in dense.parameters()) / 1e6:.1f} M parameters, "
          f"{args.threads} threads, float32, batch 1; load {load:.2f} at the start\n")  # fmt: skip
    print("| row | P | spikemar dense | spiking student | transformers | other / prefill |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    g = torch.Generator().manual_seed(0)
    for n in args.prompts:
        prompt = torch.randint(0, vocab, (1, n), generator=g)
        with torch.no_grad():  # same logits, to rounding: the comparison is of equal work
            a = dense.prefill(prompt)[0]
            b = stepped(dense.step, dense, prompt)
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-3), (a - b).abs().max()
        table(n, prompt, dense, student, None if args.no_transformers else hf, args)
    after = os.getloadavg()[0]
    print(f"\n# load {load:.2f} before, {after:.2f} after, CPU pressure (60 s) "
          f"{harness.cpu_pressure()}; min of {args.repeats} after a warm-up "
          "call (transformers: one run after one, its generate); 'other / prefill': the row's "
          "dense time over prefill's")  # fmt: skip
    return 0


def table(n: int, prompt: torch.Tensor, dense, student, hf, args) -> None:
    """The rows of one prompt length."""
    from spikemar.eval.scoring import Scorer
    from spikemar.models.fused_step import FusedStep

    models = (dense, student)
    fused = {m: FusedStep(m, 1) for m in models}
    ways = {
        "prefill": lambda m: m.prefill(prompt),
        "step per token": lambda m: stepped(m.step, m, prompt),
        "fused step per token": lambda m: stepped(fused[m], m, prompt),
    }
    rows = {name: {m: best(lambda: fn(m), args.repeats) for m in models}  # noqa: B023
            for name, fn in ways.items()}  # fmt: skip
    hf_s = None
    if hf is not None:

        def first_token():
            hf.generate(prompt, max_new_tokens=1, do_sample=False, pad_token_id=0,
                        eos_token_id=None)  # fmt: skip

        hf_s = best(first_token, 1)
    base = rows["prefill"][dense]
    for name, cells in rows.items():
        hf_cell, ratio = "–", f"{cells[dense] / base:.2f}"
        if name == "prefill":
            hf_cell = "–" if hf_s is None else ms(hf_s)
            ratio = "1" if hf_s is None else f"transformers {hf_s / base:.2f}"
        print(f"| time to first token, {name} | {n} | {ms(cells[dense])} | "
              f"{ms(cells[student])} | {hf_cell} | {ratio} |")  # fmt: skip
    ids = prompt[0].tolist()
    times = {}
    for label, limit in (("prefill + steps", None), ("forward per new token", 10**9)):
        scorer = Scorer(dense, dense.config.vocab_size, max_length=limit)
        times[label] = best(
            lambda s=scorer: s.greedy_until([ids], decode=str, max_new_tokens=args.new),
            args.repeats,
        )
    for label, t in times.items():
        ratio = t / times["prefill + steps"]
        print(f"| greedy evaluation, {args.new} new tokens, {label} | {n} | {ms(t)} | – | – | "
              f"{ratio:.2f} |")  # fmt: skip
    # eight requests: their steps one request at a time, or eight at once
    g = torch.Generator().manual_seed(n)
    many = [torch.randint(0, dense.config.vocab_size, (n,), generator=g).tolist()
            for _ in range(8)]  # fmt: skip
    batched = {}
    for size in (1, 8):
        scorer = Scorer(dense, dense.config.vocab_size, batch_size=size)
        batched[size] = best(
            lambda s=scorer: s.greedy_until(many, decode=str, max_new_tokens=args.new),
            args.repeats,
        )
    for size, t in batched.items():
        print(f"| greedy evaluation, 8 requests × {args.new} new tokens, batch {size} | {n} | "
              f"{ms(t)} | – | – | {t / times['prefill + steps']:.2f} |")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
