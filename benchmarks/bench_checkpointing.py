"""Activation checkpointing in a training step: what it saves and what it costs, spikemar beside
transformers on the same Mamba-2 weights.

A random transformers ``Mamba2ForCausalLM`` (``--width``, ``--layers``, vocabulary ``--vocab``,
head dim 64, state 64) and spikemar's conversion of it (``models.pretrained``) plus its spiking
student (MAR's spike points, T = 4), each trained one step (forward, cross-entropy, backward) on
``--batch`` × ``--L`` tokens, with and without activation checkpointing: spikemar's
``gradient_checkpointing_enable()`` (each layer's input kept, the layer run again in the
backward; ``--gradient-checkpointing`` on ``spikemar train/distill``) and transformers' own
``gradient_checkpointing_enable()`` on its model (torch path: no mamba_ssm kernels here).

Per row: the median step time over ``--repeats`` interleaved rounds, and the bytes autograd
keeps between forward and backward (every tensor saved for the backward, counted with
``torch.autograd.graph.saved_tensors_hooks``; a tensor saved twice counts twice), the memory
checkpointing is there to cut. Ratios within one run: checkpointed / plain for each model.

    python benchmarks/bench_checkpointing.py  # ~8 min on 2 cores (transformers: 33 s per step)
    python benchmarks/bench_checkpointing.py --quick  # seconds
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as harness


def build(width: int, layers: int, vocab: int):
    from transformers import Mamba2Config, Mamba2ForCausalLM

    from spikemar.convert import spiking_student
    from spikemar.models import MARLM, SpikeConfig
    from spikemar.models.pretrained import config_from_hf, state_dict_from_hf

    torch.manual_seed(0)
    heads = 2 * width // 64
    hf = Mamba2ForCausalLM(Mamba2Config(
        vocab_size=vocab, hidden_size=width, num_hidden_layers=layers, state_size=64,
        head_dim=64, num_heads=heads, expand=2, n_groups=1, conv_kernel=4, chunk_size=64,
        tie_word_embeddings=True,
    ))  # fmt: skip
    config = config_from_hf(hf.config.to_dict())
    dense = MARLM(config)
    dense.load_state_dict(state_dict_from_hf(config, hf.state_dict()))
    student = spiking_student(dense, SpikeConfig(T=4, tau=1.0))
    return {"transformers": hf.train(), "spikemar dense": dense.train(),
            "spikemar student": student.train()}  # fmt: skip


def one_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
    """(seconds of forward + backward, bytes saved for the backward)."""
    from torch.autograd.graph import saved_tensors_hooks

    kept = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        kept[0] += t.numel() * t.element_size()
        return t

    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    with saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
        logits = out.logits if hasattr(out, "logits") else out
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
    loss.backward()
    return time.perf_counter() - start, kept[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--L", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="a tiny config (smoke test)")
    args = p.parse_args(argv)
    if args.quick:
        args.width, args.layers, args.vocab, args.batch, args.L, args.repeats = 64, 2, 256, 2, 64, 2
    torch.set_num_threads(args.threads)
    load = harness.load_average()
    models = build(args.width, args.layers, args.vocab)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, args.vocab, (args.batch, args.L + 1), generator=g)
    x, y = tokens[:, :-1], tokens[:, 1:]
    times: dict[tuple[str, bool], list[float]] = {}
    kept: dict[tuple[str, bool], int] = {}
    for model in models.values():  # warm-up: kernels built, caches touched
        one_step(model, x, y)
    for _ in range(args.repeats):
        for name, model in models.items():
            for checkpointing in (False, True):
                if checkpointing:
                    model.gradient_checkpointing_enable()
                else:
                    model.gradient_checkpointing_disable()
                seconds, saved = one_step(model, x, y)
                times.setdefault((name, checkpointing), []).append(seconds)
                kept[(name, checkpointing)] = saved
    info = harness.machine_info(args.threads, load, packages=("transformers",))
    print("\n".join(harness.header_lines(info, ("transformers",))))
    params = sum(t.numel() for t in models["spikemar dense"].parameters()) / 1e6
    print(f"Mamba-2, width {args.width}, {args.layers} layers, vocabulary {args.vocab} "
          f"({params:.1f} M parameters), batch {args.batch} × {args.L} tokens, float32; "
          f"medians of {args.repeats} interleaved rounds\n")  # fmt: skip
    print("| model | step ms | checkpointed ms | time ratio | kept MB | checkpointed kept MB "
          "| memory ratio |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name in models:
        a, b = (statistics.median(times[(name, c)]) for c in (False, True))
        ka, kb = kept[(name, False)], kept[(name, True)]
        print(f"| {name} | {1e3 * a:.0f} | {1e3 * b:.0f} | {b / a:.2f} | {ka / 1e6:.0f} | "
              f"{kb / 1e6:.0f} | {kb / ka:.3f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
