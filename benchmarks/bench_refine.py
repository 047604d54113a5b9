"""Issue 16's results run: planned vs uniform vs random schedules at one energy ratio.

    nice python benchmarks/bench_refine.py --ratio 5 --steps 60 --out runs/refine-bench

Teacher: the packaged dense SSM (``spikemar/assets/mar_shakespeare_teacher.pt``, 1.570 on its
own run's batches). Measures every spike point (``spikemar.refine.measure``, default options),
plans for ``--ratio``, and builds two baselines of the same energy ratio: every point spiking
at one V (T = 4, τ = 1; V found by bisection on the counted energy) and a random schedule from
the measured options (the sampled one closest above the ratio). Each gets the same SBDS stage-2
budget (forward KL only, no feature term: the packaged student's recipe). Also: predicted KL
(sum of per-point KLs) against the measured KL of the untrained schedules, for the planned,
random and uniform grid schedules (Spearman rank correlation), and against trained loss.
Writes ``results.json``, ``pareto.png`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from spikemar import energy
from spikemar.checkpoint import load_checkpoint, save_checkpoint
from spikemar.data import TokenDataset
from spikemar.distill.trainer import DistillConfig, distill
from spikemar.refine import (
    Measurements,
    build_student,
    kl_and_loss,
    measure,
    pareto_plot,
    plan,
    random_schedule,
    uniform_schedules,
)

TEACHER = Path(__file__).resolve().parents[1] / "spikemar/assets/mar_shakespeare_teacher.pt"


def spearman(xs: list[float], ys: list[float]) -> float:
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        for rank, i in enumerate(order):
            r[i] = float(rank)
        return r

    rx, ry = ranks(xs), ranks(ys)
    n = len(xs)
    mx, my = sum(rx) / n, sum(ry) / n
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    vx = math.sqrt(sum((a - mx) ** 2 for a in rx))
    vy = math.sqrt(sum((b - my) ** 2 for b in ry))
    return cov / (vx * vy) if vx and vy else float("nan")


def energy_ratio(teacher, student, sample, hardware) -> float:
    t = energy.profile(teacher, sample, hardware=hardware).total_energy_pj
    s = energy.profile(student, sample, hardware=hardware).total_energy_pj
    return t / s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratio", type=float, default=5.0)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--hardware", default="45nm-fp32")
    ap.add_argument("--out", default="runs/refine-bench")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    teacher, tokenizer, _ = load_checkpoint(TEACHER)
    data = TokenDataset.from_text_file(None)
    windows = data.windows("train", 64, args.windows)
    sample = windows[:2, :-1]
    t0 = time.time()
    table = out / "measurements.json"
    if table.exists():
        m = Measurements.load(table)
    else:
        m = measure(teacher, windows, hardware=args.hardware, progress=print)
        m.save(table)
    print(f"measure: {time.time() - t0:.0f} s")
    planned = plan(m, energy_ratio=args.ratio)
    rand = random_schedule(m, args.ratio, seed=args.seed)
    schedules = {
        "planned": {n: o.setting for n, o in planned.choice.items()},
        "random": {n: o.setting for n, o in rand.items()},
    }
    predicted = {
        "planned": planned.predicted_kl,
        "random": sum(o.kl for o in rand.values()),
    }
    # uniform: every point at one V (T = 4), V by bisection on log V to reach the ratio
    lo, hi = math.log(0.05), math.log(8.0)
    for _ in range(8):
        mid = (lo + hi) / 2
        s = build_student(teacher, {"*": {"T": 4, "v_threshold": math.exp(mid)}})
        if energy_ratio(teacher, s, sample, args.hardware) >= args.ratio:
            hi = mid
        else:
            lo = mid
    v_uniform = math.exp(hi)
    schedules["uniform"] = {"*": {"T": 4, "v_threshold": v_uniform}}
    predicted["uniform"] = None  # its V is not on the measured grid
    # predicted vs measured KL of untrained schedules (no training: the additivity check)
    check_pred, check_meas = [], []
    grid = {f"uniform {k}": ({n: o.setting for n, o in v.items()}, sum(o.kl for o in v.values()))
            for k, v in uniform_schedules(m).items()}  # fmt: skip
    for k, target in enumerate((1.0, 1.5, 2.0, 3.0, 4.0, args.ratio)):
        try:
            r = random_schedule(m, target, seed=100 + k)
        except ValueError:  # no random draw reached it
            continue
        grid[f"random@{target:g}"] = ({n: o.setting for n, o in r.items()},
                                      sum(o.kl for o in r.values()))  # fmt: skip
    grid["planned"] = (schedules["planned"], planned.predicted_kl)
    for _name, (points, pred) in grid.items():
        kl, _ = kl_and_loss(teacher, build_student(teacher, points), windows)
        check_pred.append(pred)
        check_meas.append(kl)
    rows = {}
    for name, points in schedules.items():
        student = build_student(teacher, points)
        ratio = energy_ratio(teacher, student, sample, args.hardware)
        kl0, _ = kl_and_loss(teacher, student, windows)
        init = out / f"{name}_init.pt"
        save_checkpoint(init, student, tokenizer)
        config = DistillConfig(stage=2, teacher=str(TEACHER), student=str(init),
                               out=str(out / f"{name}.pt"), steps=args.steps, beta=0.0,
                               alpha=1.0, feature=None, eval_interval=args.steps,
                               eval_iters=20, seed=args.seed, overwrite=True,
                               warmup=min(100, args.steps // 5))  # fmt: skip
        t1 = time.time()
        result = distill(config, progress=False)
        rows[name] = {"energy_ratio": ratio, "predicted_kl": predicted[name], "initial_kl": kl0,
                      "val_loss": result["best_val"], "teacher_val": result["teacher_val"],
                      "seconds": time.time() - t1}  # fmt: skip
        print(name, rows[name], flush=True)
    measured = {f"{k} (untrained)": (rows[k]["energy_ratio"], rows[k]["initial_kl"])
                for k in rows}  # fmt: skip
    pareto_plot(m, [planned], out / "pareto.png", measured=measured)
    summary = {
        "ratio": args.ratio, "steps": args.steps, "seed": args.seed, "v_uniform": v_uniform,
        "rows": rows, "rank_predicted_vs_measured_kl": spearman(check_pred, check_meas),
        "n_check": len(check_pred), "check": list(zip(grid, check_pred, check_meas, strict=True)),
        "planned_points": schedules["planned"],
    }  # fmt: skip
    trained = [k for k in rows if rows[k]["predicted_kl"] is not None]
    if len(trained) >= 2:
        summary["rank_predicted_kl_vs_trained_loss"] = spearman(
            [rows[k]["predicted_kl"] for k in trained], [rows[k]["val_loss"] for k in trained]
        )
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    print("| schedule | energy ratio | predicted KL | KL untrained | val loss after stage 2 |")
    print("| --- | --- | --- | --- | --- |")
    for k, r in rows.items():
        p = "-" if r["predicted_kl"] is None else f"{r['predicted_kl']:.4f}"
        print(f"| {k} | {r['energy_ratio']:.2f} | {p} | {r['initial_kl']:.4f} | "
              f"{r['val_loss']:.4f} |")  # fmt: skip
    print(f"Spearman(predicted KL, measured KL), {len(check_pred)} untrained schedules: "
          f"{summary['rank_predicted_vs_measured_kl']:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
