"""A converted Mamba-2 at ~130 M parameters: per-token generation and prefill, spikemar against
transformers on the same (random) weights, beside the physical floor.

The model is transformers' ``Mamba2ForCausalLM`` with state-spaces/mamba2-130m's configuration
(vocabulary 50288, width 768, 24 layers, state 128, head dim 64, tied head; random weights: no
download), read into spikemar with ``models.pretrained`` (``config_from_hf`` +
``state_dict_from_hf``). Rows:

* generation, per token, batch 1 and 8: spikemar's dense model (``MARLM.step``), its spiking
  student (MAR's spike points, T = 4, thresholds at their initial value: the work per token does
  not depend on them on the CPU, where a spike point computes W·decode), and transformers'
  ``generate`` (greedy, its cache). Per-token time = (time for N2 tokens − time for N1 tokens) /
  (N2 − N1), so the prompt's prefill cancels.
* the physical floor at batch 1: the bytes of weights a token must read (every parameter once,
  float32) at the copy bandwidth measured in the same run (bytes read + written per second of a
  256 MB ``copy_``).
* prefill: one parallel forward over ``--prefill`` tokens, spikemar against transformers.

Run: ``python benchmarks/bench_pretrained.py [--threads 2] [--quick]`` (``--quick``: a tiny
config, for a smoke test). Record ``uptime`` with the numbers; compare ratios within one run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

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


def copy_bandwidth(mb: int = 256, repeats: int = 5) -> float:
    """Bytes read + written per second by ``dst.copy_(src)`` (median of ``repeats``)."""
    src = torch.ones(mb * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t)
    return 2 * src.numel() * 4 / statistics.median(times)


def spikemar_step_time(model, batch: int, n1: int, n2: int, vocab: int) -> float:
    """Seconds per token of ``model.step`` after a 4-token prompt (differences of two runs)."""
    prompt = torch.randint(0, vocab, (batch, 4), generator=torch.Generator().manual_seed(0))

    def run(n: int) -> float:
        with torch.no_grad():
            start = time.perf_counter()
            state = model.init_state(batch)
            logits = None
            for t in range(prompt.shape[1]):
                logits, state = model.step(prompt[:, t], state)
            for _ in range(n):
                logits, state = model.step(logits.argmax(-1), state)
            return time.perf_counter() - start

    run(2)  # warm-up: kernels built, caches touched
    return (min(run(n2) for _ in range(2)) - min(run(n1) for _ in range(2))) / (n2 - n1)


def hf_generate_time(hf, batch: int, n1: int, n2: int, vocab: int) -> float:
    prompt = torch.randint(0, vocab, (batch, 4), generator=torch.Generator().manual_seed(0))

    def run(n: int) -> float:
        with torch.no_grad():
            start = time.perf_counter()
            hf.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                        pad_token_id=0, eos_token_id=None)  # fmt: skip
            return time.perf_counter() - start

    run(2)
    return (min(run(n2) for _ in range(2)) - min(run(n1) for _ in range(2))) / (n2 - n1)


def forward_time(fn, repeats: int = 2) -> float:
    with torch.no_grad():
        fn()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--tokens", type=int, nargs=2, default=[8, 24], metavar=("N1", "N2"))
    p.add_argument("--prefill", type=int, default=2048)
    p.add_argument("--quick", action="store_true", help="a tiny config (smoke test)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import Mamba2Config, Mamba2ForCausalLM

    from spikemar.convert import spiking_student
    from spikemar.models import MARLM, SpikeConfig
    from spikemar.models.pretrained import config_from_hf, state_dict_from_hf

    settings = QUICK if args.quick else MAMBA2_130M
    torch.manual_seed(0)
    hf = Mamba2ForCausalLM(Mamba2Config(**settings)).eval()
    config = config_from_hf(hf.config.to_dict())
    dense = MARLM(config)
    dense.load_state_dict(state_dict_from_hf(config, hf.state_dict()))
    dense.eval()
    student = spiking_student(dense, SpikeConfig(T=4, tau=1.0))
    vocab = config.vocab_size
    n_params = sum(t.numel() for t in dense.parameters())
    weight_bytes = 4 * n_params
    bandwidth = copy_bandwidth(64 if args.quick else 256)
    floor = weight_bytes / bandwidth
    print(f"# {n_params / 1e6:.1f} M parameters ({weight_bytes / 2**20:.0f} MiB float32), "
          f"{args.threads} threads, copy bandwidth {bandwidth / 1e9:.1f} GB/s, "
          f"load {os.getloadavg()[0]:.2f}")  # fmt: skip
    x = torch.randint(0, vocab, (1, 16))
    with torch.no_grad():
        diff = (dense(x) - hf(x).logits).abs().max().item()
    print(f"# max |Δlogit| spikemar dense vs transformers: {diff:.2e}")
    n1, n2 = args.tokens
    print(
        "| batch | spikemar dense ms/token | spiking student ms/token | transformers generate "
        "ms/token | dense / floor | transformers / dense | student / dense |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for batch in args.batches:
        d = spikemar_step_time(dense, batch, n1, n2, vocab)
        s = spikemar_step_time(student, batch, n1, n2, vocab)
        h = hf_generate_time(hf, batch, n1, n2, vocab)
        floor_cell = f"{d / floor:.2f}" if batch == 1 else "-"
        print(
            f"| {batch} | {1e3 * d:.1f} | {1e3 * s:.1f} | {1e3 * h:.1f} | {floor_cell} | "
            f"{h / d:.2f} | {s / d:.2f} |"
        )
    print(f"# floor at batch 1: {1e3 * floor:.1f} ms/token (weights once at the copy bandwidth)")
    tokens = torch.randint(0, vocab, (1, args.prefill))
    t_dense = forward_time(lambda: dense(tokens))
    t_student = forward_time(lambda: student(tokens))
    t_hf = forward_time(lambda: hf(tokens))
    print(f"# prefill {args.prefill} tokens: spikemar dense {t_dense:.2f} s, spiking "
          f"{t_student:.2f} s, transformers {t_hf:.2f} s (transformers / dense "
          f"{t_hf / t_dense:.2f})")  # fmt: skip
    print(f"# load after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
