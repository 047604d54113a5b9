"""Time per-token generation of MAR's spiking LM, its dense twin and a Transformer, at two contexts.

Generation runs one ``step`` per token. MAR's state is O(1) per layer (the last convolution inputs
and the SSM state ``h``), so its per-token cost should not grow with the context; the Transformer's
step attends over a key/value cache that holds every earlier token. Rows, one per model, batch and
context C, all in the same run:

- ``MAR spiking``: ``MARLM(MARConfig(vocab_size=65, d_model=128, n_layers=4,
  spikes=SpikeConfig(T=4)))``, spike backend 'auto' (the header names the backend it picks);
  every step runs under ``torch.no_grad()``, so both MAR models' ``step`` take their fast kernels
  (the norms, the spike points and the SSM mixer's middle each in one C call; see mar.py);
- ``MAR dense twin``: ``MARLM(config.dense())``, the same code with the spike points removed;
- ``Transformer``: ``TransformerLM(TransformerConfig(vocab_size=65, d_model=128, n_layers=4,
  n_heads=4, max_len=max(C) + 1))``.

Protocol. Each model is prefilled once, outside the clock: random tokens go through ``step`` one by
one at the largest batch, and the state is copied when it has seen each C tokens; a smaller batch
uses the first sequences of those states. Every timed call then runs ``step`` on the token at
position C + 1 from the very same state after C tokens, so every timed step attends over (or
summarises) exactly C earlier tokens. That is sound because MAR's ``step`` returns a new state and
leaves its input untouched, and the Transformer's writes the new key/value into slot C of its
preallocated cache and returns a new length, so calling it again from length C overwrites the same
slot; both facts are checked before timing. Timing is interleaved in rounds: in each round every
row makes one untimed call (so that its weights and state are in cache, as in a generation loop)
and then ``--steps`` timed calls. Reported per row: median, interquartile range and minimum of the
single-step times in ms, tokens per second (batch / median), the ratio to the same model and batch
at the smallest context, and the Transformer's median divided by this row's at the same batch and
context (> 1: faster than the Transformer).

    python benchmarks/bench_generate.py                  # C = 256 and 4096, batch 1 and 8: ~1.5 min
    python benchmarks/bench_generate.py --contexts 256 1024 4096 --batch 1 --json out.json
    python benchmarks/bench_generate.py --quick          # seconds: a smoke run

The Markdown table goes to stdout; progress to stderr. Ctrl-C prints what has been measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _harness, run or imported by path
import _harness as harness

MODELS = ("mar", "dense", "transformer")
LABELS = {"mar": "MAR spiking", "dense": "MAR dense twin", "transformer": "Transformer"}
REFERENCE = "transformer"
# the target for the spiking MAR: a flat per-token cost, at most 10% more at the largest
# context than at the smallest
FLAT_RATIO = 1.1


@dataclass(frozen=True)
class Config:
    contexts: tuple[int, ...] = (256, 4096)
    batches: tuple[int, ...] = (1, 8)
    models: tuple[str, ...] = MODELS
    rounds: int = 20
    steps: int = 5  # timed calls per row and round
    warmup: int = 5  # untimed calls per row before the first round
    threads: int = 2
    d_model: int = 128
    n_layers: int = 4
    T: int = 4
    transformer_d_model: int = 128
    n_heads: int = 4
    vocab_size: int = 65
    seed: int = 0
    progress: bool = True


QUICK = Config(contexts=(4, 16), batches=(1, 2), rounds=2, steps=2, warmup=1)


@dataclass
class Row(harness.TimedRow):
    model: str
    batch: int
    context: int
    state_bytes_per_seq: int | None = None
    # filled in by summarize()
    tokens_per_s: float | None = None
    ratio_vs_smallest_context: float | None = None
    speedup_vs_transformer: float | None = None


# -- the models -------------------------------------------------------------------------------


def build_models(cfg: Config) -> dict[str, nn.Module]:
    from spikemar.models import MARLM, MARConfig, SpikeConfig, TransformerConfig, TransformerLM

    torch.manual_seed(cfg.seed)
    mar_config = MARConfig(
        vocab_size=cfg.vocab_size,
        d_model=cfg.d_model,
        n_layers=cfg.n_layers,
        spikes=SpikeConfig(T=cfg.T),
    )
    builders = {
        "mar": lambda: MARLM(mar_config),
        "dense": lambda: MARLM(mar_config.dense()),
        # the timed step at context C writes slot C: max_len C + 1 is enough
        "transformer": lambda: TransformerLM(
            TransformerConfig(
                vocab_size=cfg.vocab_size,
                d_model=cfg.transformer_d_model,
                n_layers=cfg.n_layers,
                n_heads=cfg.n_heads,
                max_len=max(cfg.contexts) + 1,
            )
        ),
    }
    return {name: builders[name]().eval() for name in cfg.models}


def spike_backend(model: nn.Module) -> str:
    """The backend that the first spike point's 'auto' resolves to for a one-token input."""
    try:
        from spikemar.models import SpikePoint
        from spikemar.neurons import available_backends
        from spikemar.neurons.backends import resolve_backend

        point = next(m for m in model.modules() if isinstance(m, SpikePoint))
        neuron = point.neuron
        p = neuron.parameters_tuple()
        probe = torch.zeros(point.T, 1, p.v_threshold.numel())
        chosen = resolve_backend(neuron.backend, probe, p)
        names = [b for b in available_backends() if _resolves(b, probe, p) is chosen]
        return f"{neuron.backend!r} → {names[0]!r}" if names else repr(neuron.backend)
    except Exception as e:  # the header line must not cost the run
        return f"? ({type(e).__name__})"


def _resolves(backend: str, probe: torch.Tensor, p):
    from spikemar.neurons.backends import resolve_backend

    try:
        return resolve_backend(backend, probe, p)
    except RuntimeError:
        return None


def parameter_counts(models: dict[str, nn.Module]) -> dict[str, dict[str, int]]:
    """All parameters, and those outside the Transformer's learned position table (a lookup of
    one row per token, whose size is set by max_len rather than by the work per token)."""
    out = {}
    for name, model in models.items():
        total = sum(p.numel() for p in model.parameters())
        pos = getattr(model, "pos", None)
        table = pos.weight.numel() if isinstance(pos, nn.Embedding) else 0
        out[name] = {
            "total": total,
            "position_table": table,
            "without_position_table": total - table,
        }
    return out


# -- state handling ---------------------------------------------------------------------------


def _map_state(state, fn, kv_fn=None):
    """Apply ``fn`` to every tensor of a model state (lists, dataclasses, ints); the Transformer's
    ``KVCache`` tensors [layers, batch, …] go through ``kv_fn`` instead (batch is not dim 0)."""
    from spikemar.models import KVCache

    if isinstance(state, torch.Tensor):
        return fn(state)
    if isinstance(state, KVCache):
        kv_fn = kv_fn or fn
        return KVCache(kv_fn(state.k), kv_fn(state.v), state.length)
    if isinstance(state, list | tuple):
        return type(state)(_map_state(s, fn, kv_fn) for s in state)
    if dataclasses.is_dataclass(state):
        values = {f.name: _map_state(getattr(state, f.name), fn, kv_fn)
                  for f in dataclasses.fields(state)}  # fmt: skip
        return type(state)(**values)
    return state  # an int position


def clone_state(state):
    return _map_state(state, torch.clone)


def first_sequences(state, n: int):
    """The state of the first ``n`` sequences of a batch, as contiguous copies."""
    return _map_state(state, lambda t: t[:n].clone(), lambda t: t[:, :n].clone())


def state_bytes_per_seq(model: nn.Module, state, batch: int, context: int) -> int:
    """Bytes that one sequence's state holds after ``context`` tokens: for the Transformer the
    filled part of its KV cache (the cache is preallocated to max_len), else every tensor."""
    from spikemar.models import KVCache

    if isinstance(state, KVCache):
        layers, _, heads, _, head_dim = state.k.shape
        return 2 * layers * heads * context * head_dim * state.k.element_size()
    total = []
    _map_state(state, lambda t: total.append(t.numel() * t.element_size()))
    return sum(total) // batch


def step_leaves_state(model: nn.Module, state, token: torch.Tensor, context: int) -> str | None:
    """None if one ``step`` from ``state`` leaves what the next call reads unchanged; else why."""
    from spikemar.models import KVCache

    before = clone_state(state)
    with torch.no_grad():
        model.step(token, state)
    if isinstance(state, KVCache):
        same = state.length == before.length and all(
            torch.equal(a[:, :, :, :context], b[:, :, :, :context])
            for a, b in ((state.k, before.k), (state.v, before.v))
        )
    else:
        pairs: list[torch.Tensor] = []
        _map_state(state, pairs.append)
        olds: list[torch.Tensor] = []
        _map_state(before, olds.append)
        same = all(torch.equal(a, b) for a, b in zip(pairs, olds, strict=True))
    return None if same else "step changed its input state: cannot time every step at context C"


def prefill(model: nn.Module, batch: int, contexts: list[int], gen: torch.Generator, bar) -> dict:
    """Feed random tokens through ``step``; return {C: the state after C tokens}."""
    vocab = model.config.vocab_size
    tokens = torch.randint(0, vocab, (batch, max(contexts)), generator=gen)
    states = {}
    state = model.init_state(batch)
    with torch.no_grad():
        for t in range(max(contexts)):
            _, state = model.step(tokens[:, t], state)
            bar.update()
            if t + 1 in contexts and t + 1 < max(contexts):
                states[t + 1] = clone_state(state)  # the step loop goes on writing the cache
    states[max(contexts)] = state
    return states


# -- timing -----------------------------------------------------------------------------------


def _time_step(model: nn.Module, token: torch.Tensor, state) -> float:
    start = time.perf_counter()
    model.step(token, state)
    return (time.perf_counter() - start) * 1e3


def measure(cfg: Config, rows: list[Row], models: dict[str, nn.Module], notes: dict) -> None:
    """Fill ``rows`` in place as it goes, so that an interrupted run keeps what it measured."""
    from tqdm import tqdm

    gen = torch.Generator().manual_seed(cfg.seed)
    contexts = sorted(cfg.contexts)
    max_batch = max(cfg.batches)
    per_row = cfg.warmup + cfg.rounds * (cfg.steps + 1)
    total = len(models) * max(contexts) + len(rows) * per_row
    bar = tqdm(total=total, disable=not cfg.progress, file=sys.stderr, unit="step")
    live: list[tuple[Row, nn.Module, torch.Tensor, object]] = []
    try:
        for name, model in models.items():
            bar.set_description(f"prefill {name}, batch {max_batch}")
            start = time.perf_counter()
            states = prefill(model, max_batch, contexts, gen, bar)
            notes["prefill_s"][name] = time.perf_counter() - start
            for row in (r for r in rows if r.model == name):
                state = states[row.context]
                if row.batch != max_batch:
                    state = first_sequences(state, row.batch)
                token = torch.randint(0, model.config.vocab_size, (row.batch,), generator=gen)
                row.state_bytes_per_seq = state_bytes_per_seq(model, state, row.batch, row.context)
                try:
                    row.skipped = step_leaves_state(model, state, token, row.context)
                except Exception as e:  # a broken model costs its rows, not the run
                    row.skipped = harness.failure(e)
                if row.skipped:
                    bar.update(per_row)
                    continue
                live.append((row, model, token, state))
            del states
        bar.set_description("warm-up")
        with torch.no_grad():
            for _row, model, token, state in live:
                for _ in range(cfg.warmup):
                    model.step(token, state)
                    bar.update()
            gc.collect()
            for i in range(cfg.rounds):
                bar.set_description(f"round {i + 1}/{cfg.rounds}")
                for row, model, token, state in live:
                    model.step(token, state)  # untimed: weights and state into cache
                    row.times_ms += [_time_step(model, token, state) for _ in range(cfg.steps)]
                    bar.update(cfg.steps + 1)
    finally:
        bar.close()


# -- summary and report -----------------------------------------------------------------------


def summarize(rows: list[Row]) -> None:
    by_key = {(r.model, r.batch, r.context): r for r in rows}
    smallest = min(r.context for r in rows)
    for r in rows:
        if not r.summarize_times():
            continue
        r.tokens_per_s = r.batch / (r.median_ms * 1e-3)
    for r in rows:
        if r.median_ms is None:
            continue
        base = by_key.get((r.model, r.batch, smallest))
        if base is not None and base.median_ms is not None:
            r.ratio_vs_smallest_context = r.median_ms / base.median_ms
        ref = by_key.get((REFERENCE, r.batch, r.context))
        if ref is not None and ref.median_ms is not None:
            r.speedup_vs_transformer = ref.median_ms / r.median_ms


def verdicts(rows: list[Row], cfg: Config) -> list[str]:
    """The issue's two targets, for each batch: the spiking MAR is flat in the context, and it is
    faster than the Transformer at the largest context."""
    lo, hi = min(cfg.contexts), max(cfg.contexts)
    by_key = {(r.model, r.batch, r.context): r for r in rows}
    lines = []
    for b in cfg.batches:
        mar = by_key.get(("mar", b, hi))
        if mar is None or lo == hi:
            continue
        if mar.ratio_vs_smallest_context is not None:
            ok = "met" if mar.ratio_vs_smallest_context <= FLAT_RATIO else "**not met**"
            lines.append(
                f"- batch {b}: MAR spiking per-token time at C={hi} / at C={lo} = "
                f"{mar.ratio_vs_smallest_context:.2f} (target ≤ {FLAT_RATIO}: {ok})"
            )
        if mar.speedup_vs_transformer is not None:
            ok = "met" if mar.speedup_vs_transformer > 1 else "**not met**"
            lines.append(
                f"- batch {b}: at C={hi}, Transformer / MAR spiking = "
                f"{mar.speedup_vs_transformer:.2f} (target > 1, MAR faster: {ok})"
            )
    return lines


def machine_info(cfg: Config, load_at_start: float | None = None) -> dict[str, str]:
    """The machine, as in :func:`_harness.machine_info`."""
    return harness.machine_info(cfg.threads, load_at_start)


def model_lines(cfg: Config, counts: dict, notes: dict) -> list[str]:
    described = {
        "mar": f"`MARLM(MARConfig(vocab_size={cfg.vocab_size}, d_model={cfg.d_model}, "
        f"n_layers={cfg.n_layers}, spikes=SpikeConfig(T={cfg.T})))`, spike backend "
        f"{notes.get('spike_backend', '?')}",
        "dense": "`MARLM(config.dense())`",
        "transformer": f"`TransformerLM(TransformerConfig(vocab_size={cfg.vocab_size}, "
        f"d_model={cfg.transformer_d_model}, n_layers={cfg.n_layers}, n_heads={cfg.n_heads}, "
        f"max_len={max(cfg.contexts) + 1}))`",
    }
    lines = ["Models (random initialisation, `eval()`, float32, `torch.no_grad()`):", ""]
    for name, c in counts.items():
        params = f"{c['total']:,} parameters"
        if c["position_table"]:
            params += (
                f" ({c['without_position_table']:,} without its {c['position_table']:,}-entry "
                "position table)"
            )
        prefill_s = notes["prefill_s"].get(name)
        took = (
            f"; prefill of {max(cfg.contexts)} tokens by `step` at batch {max(cfg.batches)}: "
            f"{prefill_s:.1f} s"
            if prefill_s is not None
            else ""
        )
        lines.append(f"- {LABELS[name]}: {described[name]}, {params}{took}")
    if "mar" in counts and "transformer" in counts:
        mar = counts["mar"]["total"]
        t = counts["transformer"]
        lines += [
            "",
            f"Transformer / MAR spiking parameters: {t['total'] / mar:.2f} in all, "
            f"{t['without_position_table'] / mar:.2f} without the position table.",
        ]
    return lines


def markdown(rows: list[Row], info: dict[str, str], cfg: Config, lines_before: list[str]) -> str:
    lo = min(cfg.contexts)
    lines = [
        *harness.header_lines(info),
        *lines_before,
        "",
        f"Per-token `step` time from the state after C tokens; {cfg.rounds} rounds × "
        f"{cfg.steps} timed calls per row, interleaved ({cfg.rounds * cfg.steps} in all).",
        "",
        "| model | batch | context C | median ms/step | IQR ms | min ms | tokens/s "
        f"| × vs C={lo} | Transformer ÷ this | state KiB/seq |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    expected = cfg.rounds * cfg.steps
    for r in rows:
        partial = f" (n={len(r.times_ms)})" if 0 < len(r.times_ms) < expected else ""
        head = f"| {LABELS[r.model]}{partial} | {r.batch} | {r.context} |"
        if r.median_ms is None:
            reason = r.skipped or "not measured (interrupted)"
            lines.append(f"{head} {reason} | | | | | | |")
            continue
        state = "–" if r.state_bytes_per_seq is None else f"{r.state_bytes_per_seq / 1024:,.0f}"
        lines.append(
            f"{head} {r.median_ms:.2f} | {r.q25_ms:.2f}–{r.q75_ms:.2f} | {r.min_ms:.2f} "
            f"| {r.tokens_per_s:,.0f} | {harness.fmt(r.ratio_vs_smallest_context, '.2f')} "
            f"| {harness.fmt(r.speedup_vs_transformer, '.2f')} | {state} |"
        )
    found = verdicts(rows, cfg)
    if found:
        lines += ["", "Targets:", "", *found]
    return "\n".join(lines)


def run(cfg: Config) -> tuple[list[Row], dict, bool]:
    """Measure ``cfg``; returns (rows, notes: parameter counts, prefill times, the spike backend;
    interrupted)."""
    torch.set_num_threads(cfg.threads)
    models = build_models(cfg)
    notes: dict = {"prefill_s": {}, "parameters": parameter_counts(models)}
    if "mar" in models:
        notes["spike_backend"] = spike_backend(models["mar"])
    rows = [
        Row(name, b, c)
        for name in models
        for b in sorted(cfg.batches)
        for c in sorted(cfg.contexts)
    ]
    _, interrupted = harness.measure_rows(measure, cfg, cfg.threads, models, notes, rows=rows)
    summarize(rows)
    return rows, notes, interrupted


def parse_args(argv: list[str] | None = None) -> tuple[Config, str | None]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    d = Config()
    ap.add_argument("--contexts", type=int, nargs="+", default=list(d.contexts), metavar="C",
                    help="context lengths (tokens before the timed step)")  # fmt: skip
    ap.add_argument("--batch", type=int, nargs="+", default=list(d.batches), help="batch sizes")
    ap.add_argument("--models", nargs="+", choices=MODELS, default=list(d.models))
    ap.add_argument("--rounds", type=int, default=d.rounds, help="interleaved rounds")
    ap.add_argument("--steps", type=int, default=d.steps, help="timed calls per row and round")
    ap.add_argument("--warmup", type=int, default=d.warmup, help="untimed calls per row first")
    ap.add_argument("--threads", type=int, default=d.threads, help="torch.set_num_threads")
    ap.add_argument("--T", type=int, default=d.T, help="MAR's micro-steps")
    ap.add_argument("--transformer-d-model", type=int, default=d.transformer_d_model,
                    help="the Transformer's width (MAR's is 128)")  # fmt: skip
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--json", metavar="PATH", help="also write the raw results here")
    ap.add_argument("--quick", action="store_true", help="a tiny smoke configuration")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    if a.quick:
        cfg = dataclasses.replace(QUICK, threads=a.threads, models=tuple(a.models))
    else:
        cfg = Config(
            contexts=tuple(sorted(set(a.contexts))),
            batches=tuple(sorted(set(a.batch))),
            models=tuple(m for m in MODELS if m in a.models),
            rounds=a.rounds,
            steps=a.steps,
            warmup=a.warmup,
            threads=a.threads,
            T=a.T,
            transformer_d_model=a.transformer_d_model,
            seed=a.seed,
        )
    if min(cfg.contexts) < 1 or min(cfg.batches) < 1 or cfg.rounds < 1 or cfg.steps < 1:
        ap.error("--contexts, --batch, --rounds and --steps must be >= 1")
    if cfg.warmup < 0 or cfg.threads < 1 or cfg.T < 1:
        ap.error("--warmup must be >= 0, --threads and --T >= 1")
    return dataclasses.replace(cfg, progress=not a.no_progress), a.json


def main(argv: list[str] | None = None) -> int:
    cfg, json_path = parse_args(argv)
    load_at_start = harness.load_average()
    rows, notes, interrupted = run(cfg)
    info = machine_info(cfg, load_at_start)
    before = model_lines(cfg, notes["parameters"], notes)
    if interrupted:
        before += ["", harness.INTERRUPTED_NOTE]
    print(markdown(rows, info, cfg, before))
    return harness.finish(json_path, info, cfg, rows, interrupted, notes=notes)


if __name__ == "__main__":
    sys.exit(main())
