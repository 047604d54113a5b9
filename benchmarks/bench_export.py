"""Export to Lava: export time, Lava simulation speed, and what quantisation costs in accuracy.

The network is spikemar's 3-layer demo (``spikemar.hardware.demo.demo_network``: Linear + ternary
ATMN blocks, 64-128-128-10, τ = 2). It is first trained (surrogate gradients, Adam) on a
synthetic task that a spiking network learns in seconds but not perfectly: 10 classes, each a
prototype of 64 signed firing probabilities (at most 0.1; 80 % of each prototype shared with a
common pattern); a sample is T steps of ternary spikes drawn from its class's prototype. The
class read out is the argmax of the output spikes summed over the T steps.

Measured, in one run:

* **accuracy** on held-out samples of the float model and of ``spikemar.hardware.quantize`` of it
  (Loihi's fixed point), the share of samples where the two predict the same class, and the
  share of output spikes that agree;
* **Lava = fixed point**: a few held-out samples run in Lava's fixed-point simulator must give
  the fixed-point model's spikes bit for bit;
* **export time** of ``export_lava`` (median over repetitions);
* **Lava simulation speed** (``Loihi2SimCfg``, fixed and floating point): two runs of different
  length, steps/s from the difference (so Lava's start-up, ~5 s, cancels), and the start-up;
* the fixed-point PyTorch model's steps/s at batch 1 for comparison.

    python benchmarks/bench_export.py              # the full run (a few minutes)
    python benchmarks/bench_export.py --quick      # a smoke run

Needs the Lava environment (``bash .ci/lava-env``); without it the Lava rows say so.
The Markdown report goes to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as H

from spikemar.hardware import LavaUnavailableError, export_lava, quantize, run_lava
from spikemar.hardware.demo import demo_network


@dataclass
class Config:
    T: int = 16
    train_steps: int = 400
    batch: int = 64
    test_samples: int = 1000
    lava_samples: int = 3
    export_reps: int = 10
    lava_short: int = 200
    lava_long: int = 2000
    seed: int = 0


QUICK = Config(train_steps=20, test_samples=64, lava_samples=1, export_reps=2, lava_short=20,
               lava_long=60)  # fmt: skip


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class PrototypeTask:
    """10 classes of 64 signed firing probabilities (at most ``max_rate``); each class shares a
    fraction ``shared`` of its inputs (rate and sign) with a common pattern, so that the classes
    overlap and the task is not solved perfectly. Samples are ternary spike trains."""

    def __init__(
        self, seed: int, n_in: int = 64, n_classes: int = 10, max_rate: float = 0.1,
        shared: float = 0.8,
    ) -> None:  # fmt: skip
        g = torch.Generator().manual_seed(seed)
        sign = lambda *shape: torch.where(torch.rand(*shape, generator=g) < 0.5, -1.0, 1.0)  # noqa: E731
        common_rate, common_sign = torch.rand(n_in, generator=g), sign(n_in)
        rate, own_sign = torch.rand(n_classes, n_in, generator=g), sign(n_classes, n_in)
        keep = torch.rand(n_classes, n_in, generator=g) < shared
        self.rate = max_rate * torch.where(keep, common_rate, rate)
        self.sign = torch.where(keep, common_sign, own_sign)

    def sample(self, n: int, T: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.randint(0, self.rate.shape[0], (n,), generator=g)
        fire = torch.rand(T, n, self.rate.shape[1], generator=g) < self.rate[labels]
        return fire * self.sign[labels], labels


def train(model: nn.Sequential, task: PrototypeTask, cfg: Config) -> list[float]:
    g = torch.Generator().manual_seed(cfg.seed + 1)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for step in range(cfg.train_steps):
        x, y = task.sample(cfg.batch, cfg.T, g)
        for m in model:
            if hasattr(m, "reset"):
                m.reset()
        logits = model(x).sum(0)
        loss = nn.functional.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 100 == 0:
            log(f"train step {step}: loss {loss.item():.3f}")
    for m in model:
        if hasattr(m, "reset"):
            m.reset()
    return losses


@torch.no_grad()
def evaluate(model: nn.Sequential, task: PrototypeTask, cfg: Config) -> dict:
    from spikemar.hardware import simulate

    g = torch.Generator().manual_seed(cfg.seed + 2)
    x, y = task.sample(cfg.test_samples, cfg.T, g)
    float_spikes = simulate(model, x)
    fixed = quantize(model)
    fixed_spikes = fixed(x)
    pred_float = float_spikes.sum(0).argmax(-1)
    pred_fixed = fixed_spikes.sum(0).argmax(-1)
    return {
        "acc_float": (pred_float == y).float().mean().item(),
        "acc_fixed": (pred_fixed == y).float().mean().item(),
        "same_class": (pred_float == pred_fixed).float().mean().item(),
        "same_spikes": (float_spikes == fixed_spikes).float().mean().item(),
        "x": x,
        "fixed_spikes": fixed_spikes,
        "fixed": fixed,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a smoke run of seconds")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument(
        "--mar-checkpoint",
        default=None,
        help="also: validation loss of this trained MAR LM checkpoint with float weights and with "
        "Loihi's 8-bit weights on its on-chip projections (quantize(model))",
    )
    p.add_argument("--eval-iters", type=int, default=50, help="validation batches (12 × 64)")
    args = p.parse_args(argv)
    cfg = QUICK if args.quick else Config()
    torch.manual_seed(cfg.seed)
    load0 = H.load_average()
    results = run(cfg)
    if args.mar_checkpoint:
        results.update(mar_loss(args.mar_checkpoint, args.eval_iters))
    info = H.machine_info(torch.get_num_threads(), load0)
    info.update(lava_versions())
    print(report(cfg, results, info))
    H.write_json(args.json, {"config": vars(cfg), "results": results, "machine": info})
    return 0


def lava_versions() -> dict[str, str]:
    """lava-nc's and lava-dl's versions in the Lava environment (not this one)."""
    import subprocess

    from spikemar.hardware import lava_python

    code = "import importlib.metadata as m; print(m.version('lava-nc'), m.version('lava-dl'))"
    try:
        done = subprocess.run([str(lava_python()), "-c", code], capture_output=True, text=True)
        nc, dl = done.stdout.split()
    except (LavaUnavailableError, ValueError):
        nc = dl = "not installed"
    return {"lava-nc": nc, "lava-dl": dl}


@torch.no_grad()
def mar_loss(checkpoint: str, eval_iters: int) -> dict:
    """Validation loss of a MAR LM (on its training corpus, Tiny Shakespeare by default) with
    float weights and with Loihi's 8-bit weights on its on-chip projections."""
    from spikemar.checkpoint import load_checkpoint
    from spikemar.data import TokenDataset
    from spikemar.training import LoopConfig, evaluate

    model, _, payload = load_checkpoint(checkpoint)
    quantised = quantize(model)
    data = TokenDataset.from_text_file(payload.get("train", {}).get("config", {}).get("data"))
    cfg = LoopConfig(eval_iters=eval_iters, batch_size=12, L=64)
    log(f"MAR: evaluating {checkpoint} on {eval_iters} validation batches")
    return {
        "mar_checkpoint": checkpoint,
        "mar_eval_iters": eval_iters,
        "mar_onchip_projections": len(quantised.loihi_weight_scales),
        "mar_val_float": evaluate(model, data, cfg)["val"],
        "mar_val_loihi": evaluate(quantised, data, cfg)["val"],
    }


def run(cfg: Config) -> dict:
    task = PrototypeTask(cfg.seed)
    model = demo_network((64, 128, 128, 10), seed=cfg.seed)
    t0 = time.perf_counter()
    losses = train(model, task, cfg)
    out: dict = {"train_s": time.perf_counter() - t0, "final_loss": statistics.mean(losses[-20:])}
    ev = evaluate(model, task, cfg)
    out.update({k: v for k, v in ev.items() if k not in ("x", "fixed_spikes", "fixed")})
    log(f"accuracy float {ev['acc_float']:.3f}, fixed {ev['acc_fixed']:.3f}")

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "net.h5"
        times = []
        for _ in range(cfg.export_reps):
            t0 = time.perf_counter()
            export_lava(model, path, (64,))
            times.append((time.perf_counter() - t0) * 1e3)
        out["export_ms"] = H.timing_stats(times).median

        # the fixed-point PyTorch model at batch 1
        x1 = (torch.rand(cfg.lava_long, 1, 64) < 0.3).float()
        t0 = time.perf_counter()
        ev["fixed"](x1)
        out["torch_fixed_steps_per_s"] = cfg.lava_long / (time.perf_counter() - t0)

        try:
            same = 0
            for i in range(cfg.lava_samples):
                got = run_lava(path, ev["x"][:, i], cfg.T)
                same += int(torch.equal(got, ev["fixed_spikes"][:, i]))
            out["lava_equal_samples"] = f"{same}/{cfg.lava_samples}"
            log(f"Lava = fixed point on {same}/{cfg.lava_samples} samples")
            for name, fixed_point in (("fixed", True), ("float", False)):
                seconds = {}
                for steps in (cfg.lava_short, cfg.lava_long):
                    x = (torch.rand(steps, 64) < 0.3).float()
                    t0 = time.perf_counter()
                    run_lava(path, x, steps, fixed_point=fixed_point)
                    seconds[steps] = time.perf_counter() - t0
                extra = seconds[cfg.lava_long] - seconds[cfg.lava_short]
                # on a busy machine start-up noise can swamp a short difference: no rate then
                rate = (cfg.lava_long - cfg.lava_short) / extra if extra > 0 else None
                out[f"lava_{name}_steps_per_s"] = rate
                out[f"lava_{name}_startup_s"] = (
                    seconds[cfg.lava_short] - cfg.lava_short / rate if rate else None
                )
                log(f"Lava {name}: {H.fmt(rate, ',.0f')} steps/s")
        except LavaUnavailableError as err:
            out["lava_error"] = str(err)
    return out


def report(cfg: Config, r: dict, info: dict) -> str:
    lines = ["## Export to Lava: time, simulation speed, quantisation", ""]
    lines += H.header_lines(info, packages=("lava-nc", "lava-dl"))
    lines += [
        f"Network: 64-128-128-10 Linear + ternary ATMN (τ = 2), trained {cfg.train_steps} steps "
        f"(batch {cfg.batch}, T = {cfg.T}; {r['train_s']:.0f} s, final loss "
        f"{r['final_loss']:.3f}) on the synthetic prototype task (`PrototypeTask`); "
        f"{cfg.test_samples} held-out "
        "samples.",
        "",
        "| quantity | value |",
        "| --- | ---: |",
        f"| accuracy, float model | {r['acc_float']:.1%} |",
        f"| accuracy, Loihi fixed point (`quantize`) | {r['acc_fixed']:.1%} |",
        f"| same predicted class, float vs fixed | {r['same_class']:.1%} |",
        f"| same output spikes, float vs fixed | {r['same_spikes']:.1%} |",
        f"| export_lava (median of {cfg.export_reps}) | {r['export_ms']:.1f} ms |",
        f"| fixed-point PyTorch model, batch 1 | {r['torch_fixed_steps_per_s']:,.0f} steps/s |",
    ]
    if "lava_error" in r:
        lines.append(f"| Lava | not measured: {r['lava_error']} |")
    else:
        lines += [
            f"| Lava fixed point = spikemar fixed point (held-out samples) | "
            f"{r['lava_equal_samples']} bit for bit |",
            f"| Lava `fixed_pt`, Loihi2SimCfg | {H.fmt(r['lava_fixed_steps_per_s'], ',.0f')} "
            "steps/s |",
            f"| Lava `floating_pt`, Loihi2SimCfg | {H.fmt(r['lava_float_steps_per_s'], ',.0f')} "
            "steps/s |",
            f"| Lava start-up (subprocess, imports, compile) | "
            f"{H.fmt(r['lava_fixed_startup_s'], '.1f')} s |",
        ]
    if "mar_val_float" in r:
        lines += [
            "",
            f"MAR LM `{r['mar_checkpoint']}`: validation loss (nats/char, "
            f"{r['mar_eval_iters']} batches of 12 × 64) with float weights "
            f"**{r['mar_val_float']:.4f}**, with Loihi's 8-bit weights on its "
            f"{r['mar_onchip_projections']} on-chip projections **{r['mar_val_loihi']:.4f}** "
            f"({r['mar_val_loihi'] - r['mar_val_float']:+.4f}).",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
