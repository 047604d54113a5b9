"""Time one training step of MAR's spiking LM with each ATMN backend, beside its dense twin.

The neuron's speed sets the training speed of every spiking model: this measures what a faster
backend buys end to end. Rows, all in one run, on one device:

- ``MAR spiking, backend=<b>`` for every spikemar backend and ``'auto'``:
  ``MARLM(MARConfig(vocab_size=65, d_model=128, n_layers=4, spikes=SpikeConfig(T=4,
  backend=<b>)))``, the packaged student's architecture (per-channel thresholds, τ = 1). A
  backend that cannot run on the device (``'cupy'`` on the CPU) gets a row that says why;
- ``MAR dense twin``: ``MARLM(config.dense())``, the same code with the spike points removed, the
  floor that the spike points' cost sits on.

Protocol. Each row owns a model and an AdamW optimiser (lr 1e-4), built from the same seed. A step
is forward over random tokens [batch, L], cross-entropy against the next token, backward and
``optimizer.step()``. Every row first makes ``--warmup`` untimed steps; the timed steps are then
interleaved in rounds, one step per row per round, so that a change of load on this noisy machine
hits every row alike. Reported per row: median, interquartile range and minimum of the step time
in ms, tokens per second (batch·L / median), and the reference backend's median divided by the
row's (> 1: faster than training with ``backend='torch'``).

    python benchmarks/bench_train_step.py             # batch 16 × 128 tokens: about a minute
    python benchmarks/bench_train_step.py --batch 8 --length 256 --steps 20 --json out.json
    python benchmarks/bench_train_step.py --quick     # seconds: a smoke run

The Markdown table goes to stdout; progress to stderr. Ctrl-C prints what has been measured.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _harness, run or imported by path
import _harness as harness

REFERENCE = "torch"
VOCAB = 65


@dataclass(frozen=True)
class Config:
    batch: int = 16
    length: int = 128
    d_model: int = 128
    n_layers: int = 4
    T: int = 4
    steps: int = 12
    warmup: int = 2
    threads: int = 2
    device: str = "cpu"
    seed: int = 0
    progress: bool = True


QUICK = Config(batch=2, length=16, d_model=32, n_layers=1, steps=2, warmup=1)


@dataclass
class Row(harness.TimedRow):
    model: str = ""
    backend: str | None = None
    tokens_per_s: float | None = None
    speedup_vs_reference: float | None = None


def build(cfg: Config, backend: str | None) -> nn.Module:
    """The spiking MAR LM with ``backend`` for its spike points, or (None) its dense twin."""
    from spikemar.models import MARLM, MARConfig, SpikeConfig

    config = MARConfig(
        vocab_size=VOCAB,
        d_model=cfg.d_model,
        n_layers=cfg.n_layers,
        spikes=SpikeConfig(T=cfg.T, backend=backend or "auto"),
    )
    torch.manual_seed(cfg.seed)
    model = MARLM(config if backend is not None else config.dense())
    return model.to(cfg.device).train()


def resolve(backend: str, cfg: Config):
    """The implementation ``backend`` runs the spike points with on ``cfg.device`` (RuntimeError,
    saying why, if it cannot)."""
    from spikemar.neurons import ATMNParameters
    from spikemar.neurons.backends import resolve_backend

    probe = torch.zeros(cfg.T, 1, device=cfg.device)
    return resolve_backend(backend, probe, ATMNParameters(torch.tensor(1.0, device=cfg.device)))


class Trainer:
    """One row's model, optimiser and step."""

    def __init__(self, cfg: Config, backend: str | None, tokens: torch.Tensor) -> None:
        self.model = build(cfg, backend)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.inputs, self.targets = tokens[:, :-1], tokens[:, 1:]
        self.device = cfg.device

    def step(self) -> float:
        """One training step; returns its loss (so that a broken step shows). On CUDA the spike
        points' value checks are deferred and read once after the backward, as spikemar's
        trainer runs them (``training.forward_backward``): no host sync per spike point."""
        from spikemar.neurons import raise_deferred_errors, value_checks

        cuda = self.device.startswith("cuda")
        self.optimizer.zero_grad(set_to_none=True)
        with value_checks("deferred") if cuda else contextlib.nullcontext():
            logits = self.model(self.inputs)
            loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), self.targets.reshape(-1))
            loss.backward()
        if cuda:
            raise_deferred_errors()
        self.optimizer.step()
        return float(loss.detach())

    def timed_step(self) -> float:
        """One step in ms, synchronised on CUDA."""
        sync = torch.cuda.synchronize if self.device.startswith("cuda") else (lambda: None)
        sync()
        start = time.perf_counter()
        self.step()
        sync()
        return (time.perf_counter() - start) * 1e3


def measure(cfg: Config, rows: list[Row]) -> None:
    """Append to ``rows`` as it goes, so that an interrupted run keeps what it measured."""
    from tqdm import tqdm

    from spikemar.neurons import available_backends

    torch.manual_seed(cfg.seed)
    tokens = torch.randint(0, VOCAB, (cfg.batch, cfg.length + 1), device=cfg.device)
    live: list[tuple[Trainer, Row]] = []
    specs = [("MAR spiking", b) for b in [*available_backends(), "auto"]]
    specs.append(("MAR dense twin", None))
    bar = tqdm(
        total=len(specs) * (cfg.warmup + cfg.steps),
        disable=not cfg.progress,
        file=sys.stderr,
        unit="step",
    )
    try:
        for model, backend in specs:
            row = Row(model=model, backend=backend)
            rows.append(row)
            if backend is not None:
                try:
                    resolve(backend, cfg)
                except RuntimeError as e:
                    row.skipped = str(e).replace("this input", "here")
                    bar.update(cfg.warmup + cfg.steps)
                    continue
            bar.set_description(f"warm-up {model} {backend or ''}".strip())
            try:
                trainer = Trainer(cfg, backend, tokens)
                for _ in range(cfg.warmup):
                    trainer.step()
                    bar.update()
            except Exception as e:  # a broken row costs its row, not the run
                row.skipped = harness.failure(e)
                bar.update(cfg.warmup + cfg.steps)
                continue
            live.append((trainer, row))
        bar.set_description("timed steps")
        for _ in range(cfg.steps):
            for trainer, row in list(live):
                try:
                    row.times_ms.append(trainer.timed_step())
                except Exception as e:
                    row.skipped, row.times_ms = harness.failure(e), []
                    live.remove((trainer, row))
                bar.update()
    finally:
        bar.close()


def summarize(rows: list[Row], cfg: Config) -> None:
    for r in rows:
        if r.summarize_times():
            r.tokens_per_s = cfg.batch * cfg.length / (r.median_ms / 1e3)
    ref = next((r for r in rows if r.backend == REFERENCE and r.median_ms), None)
    for r in rows:
        if r.median_ms and ref is not None:
            r.speedup_vs_reference = ref.median_ms / r.median_ms


def report(rows: list[Row], cfg: Config, info: dict[str, str], interrupted: bool) -> str:
    auto = resolve("auto", cfg)
    lines = harness.header_lines(info)
    lines += [
        f"MAR LM, d_model {cfg.d_model}, {cfg.n_layers} layers, T = {cfg.T}; batch {cfg.batch} × "
        f"{cfg.length} tokens; AdamW; {cfg.steps} timed steps per row after {cfg.warmup} "
        f"warm-up steps; 'auto' runs `{auto.__name__}`.",
        "",
        "| model | backend | median ms | IQR ms | min ms | tokens/s | × vs backend='torch' |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        name = f"| {r.model} | {r.backend or '–'} |"
        if r.skipped or r.median_ms is None:
            lines.append(f"{name} {r.skipped or 'no timing'} | | | | |")
            continue
        lines.append(
            f"{name} {r.median_ms:.1f} | {r.q25_ms:.1f}–{r.q75_ms:.1f} | {r.min_ms:.1f} | "
            f"{harness.fmt(r.tokens_per_s, ',.0f')} | "
            f"{harness.fmt(r.speedup_vs_reference, '.2f')} |"
        )
    if interrupted:
        lines += ["", harness.INTERRUPTED_NOTE]
    return "\n".join(lines)


def run(cfg: Config) -> tuple[list[Row], bool]:
    rows, interrupted = harness.measure_rows(measure, cfg, cfg.threads)
    summarize(rows, cfg)
    return rows, interrupted


def parse_args(argv: list[str] | None = None) -> tuple[Config, str | None]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    d = Config()
    ap.add_argument("--batch", type=int, default=d.batch)
    ap.add_argument("--length", type=int, default=d.length, help="tokens per sequence")
    ap.add_argument("--d-model", type=int, default=d.d_model)
    ap.add_argument("--n-layers", type=int, default=d.n_layers)
    ap.add_argument("--T", type=int, default=d.T, help="micro-steps of the spike points")
    ap.add_argument("--steps", type=int, default=d.steps, help="timed steps per row")
    ap.add_argument("--warmup", type=int, default=d.warmup, help="untimed steps per row")
    ap.add_argument("--threads", type=int, default=d.threads, help="torch.set_num_threads")
    ap.add_argument("--device", default=d.device)
    ap.add_argument("--json", metavar="PATH", help="also write the raw results here")
    ap.add_argument("--quick", action="store_true", help="a tiny smoke configuration")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    for name in ("batch", "length", "d_model", "n_layers", "T", "steps", "threads"):
        if (value := getattr(a, name)) < 1:
            ap.error(f"--{name.replace('_', '-')}: expected an integer >= 1, got {value}")
    if a.warmup < 0:
        ap.error(f"--warmup: expected an integer >= 0, got {a.warmup}")
    cfg = QUICK if a.quick else Config(
        batch=a.batch, length=a.length, d_model=a.d_model, n_layers=a.n_layers, T=a.T,
        steps=a.steps, warmup=a.warmup, threads=a.threads, device=a.device,
    )  # fmt: skip
    return Config(**{**asdict(cfg), "progress": not a.no_progress}), a.json


def main(argv: list[str] | None = None) -> int:
    cfg, json_path = parse_args(argv)
    load = harness.load_average()
    rows, interrupted = run(cfg)
    info = harness.machine_info(cfg.threads, load, gpu=cfg.device.startswith("cuda"))
    print(report(rows, cfg, info, interrupted))
    return harness.finish(json_path, info, cfg, rows, interrupted)


if __name__ == "__main__":
    sys.exit(main())
