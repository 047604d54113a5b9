"""Issue 16's results: planned vs uniform vs random schedules at equal energy, two seeds each.

    nice python benchmarks/bench_refine.py --ratios 5 8 --seeds 1 2 --steps 40 \\
        --out runs/refine-matrix > runs/refine-matrix.log 2>&1

Teacher: the packaged dense SSM (``spikemar/assets/mar_shakespeare_teacher.pt``). Measures
every spike point once (``spikemar.refine.measure``, default options; ``measurements.json``),
then for each energy ratio three schedules:

* **planned**: ``refine.plan(energy_ratio=r)`` (least predicted KL);
* **uniform**: every point spiking at T = 4, τ = 1 and one V, found by bisection on the counted
  energy to reach r; its predicted KL is the sum of each point's KL spiking alone at that V
  (measured here, as ``measure`` does for its grid);
* **random**: ``refine.random_schedule(r, seed)`` (KL-blind; a different draw per seed).

Each gets the same SBDS stage-2 budget (``--steps``, forward KL only, no feature term: the
packaged student's recipe) for every seed, and is then scored on the same fixed validation
windows (``--val-windows`` of 64 characters from the start of the validation split), as is the
teacher. Reported: validation loss per schedule (mean and both seeds), Spearman rank correlation
of predicted KL with trained loss over every trained run, and of predicted with measured KL over
the untrained schedules (the additivity check of the last session).

Resumable: each finished stage-2 run leaves ``runs/<schedule>_r<ratio>_s<seed>.json`` in
``--out`` and is skipped when the command is run again; schedules are fixed in
``schedules.json``. Workers may share ``--out`` (start the command twice once ``check.json``
exists): each claims a run with ``runs/<name>.lock`` (a stale lock from a killed worker is
removed by hand). Prints the Markdown table at the end (``--report``: only the table).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
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
    schedule_kl,
    uniform_schedules,
)

TEACHER = Path(__file__).resolve().parents[1] / "spikemar/assets/mar_shakespeare_teacher.pt"
KINDS = ("planned", "uniform", "random")


def spearman(xs: list[float], ys: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties)."""

    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
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


@torch.no_grad()
def val_loss(model, windows: torch.Tensor, batch_size: int = 32) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, windows.shape[0], batch_size):
        w = windows[i : i + batch_size]
        logits = model(w[:, :-1])
        total += float(torch.nn.functional.cross_entropy(
            logits.flatten(0, 1).double(), w[:, 1:].flatten(), reduction="sum"))  # fmt: skip
        count += w[:, 1:].numel()
    return total / count


def load() -> float:
    return float(os.getloadavg()[0])


def write_json(path: Path, data) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def make_schedules(args, teacher, windows, sample, m: Measurements) -> dict:
    """Every (ratio, kind, seed) schedule with its predicted KL, fixed once."""
    schedules: dict = {}
    for ratio in args.ratios:
        planned = plan(m, energy_ratio=ratio)
        # uniform: every point at one V (T = 4), V by bisection on log V to reach the ratio
        lo, hi = math.log(0.05), math.log(8.0)
        for _ in range(10):
            mid = (lo + hi) / 2
            s = build_student(teacher, {"*": {"T": 4, "v_threshold": math.exp(mid)}})
            if energy_ratio(teacher, s, sample, args.hardware) >= ratio:
                hi = mid
            else:
                lo = mid
        setting = {"T": 4, "v_threshold": math.exp(hi)}
        uniform_kl = sum(schedule_kl(teacher, {name: setting}, windows)[0] for name in m.modules)
        for seed in args.seeds:
            rand = random_schedule(m, ratio, seed=seed)
            schedules[f"planned_r{ratio:g}_s{seed}"] = (planned.points, planned.predicted_kl)
            schedules[f"uniform_r{ratio:g}_s{seed}"] = ({"*": setting}, uniform_kl)
            schedules[f"random_r{ratio:g}_s{seed}"] = (
                {n: o.setting for n, o in rand.items()},
                sum(o.kl for o in rand.values()),
            )
        print(f"schedules at {ratio:g}x: planned predicted KL {planned.predicted_kl:.4f}, "
              f"uniform V {setting['v_threshold']:.4f} (predicted KL {uniform_kl:.4f})",
              flush=True)  # fmt: skip
    return {k: {"points": p, "predicted_kl": kl} for k, (p, kl) in schedules.items()}


def additivity_check(args, teacher, windows, m: Measurements, schedules: dict) -> list:
    """(name, predicted KL, measured KL) of untrained schedules: the grid's uniform schedules,
    random ones from 1.5x to 8x and every schedule of the matrix."""
    grid = {f"uniform {k}": ({n: o.setting for n, o in v.items()}, sum(o.kl for o in v.values()))
            for k, v in uniform_schedules(m).items()}  # fmt: skip
    for k, target in enumerate((1.5, 2.0, 3.0, 4.0, 6.0, 7.0)):
        r = random_schedule(m, target, seed=100 + k)
        grid[f"random@{target:g}"] = ({n: o.setting for n, o in r.items()},
                                      sum(o.kl for o in r.values()))  # fmt: skip
    seen = set()
    for name, s in schedules.items():
        key = json.dumps(s["points"], sort_keys=True)
        if key not in seen:
            seen.add(key)
            grid[name.rsplit("_s", 1)[0] if name.startswith(("planned", "uniform")) else name] = (
                s["points"], s["predicted_kl"])  # fmt: skip
    rows = []
    for name, (points, pred) in grid.items():
        kl, _ = kl_and_loss(teacher, build_student(teacher, points), windows)
        rows.append((name, pred, kl))
    return rows


def train_one(args, name: str, points: dict, tokenizer, teacher, windows, sample, val) -> dict:
    out = Path(args.out)
    seed = int(name.rsplit("_s", 1)[1])
    student = build_student(teacher, points)
    ratio = energy_ratio(teacher, student, sample, args.hardware)
    kl0, _ = kl_and_loss(teacher, student, windows)
    init = out / "ckpt" / f"{name}_init.pt"
    save_checkpoint(init, student, tokenizer)
    config = DistillConfig(stage=2, teacher=str(TEACHER), student=str(init),
                           out=str(out / "ckpt" / f"{name}.pt"), steps=args.steps, beta=0.0,
                           alpha=1.0, feature=None, eval_interval=args.steps, eval_iters=1,
                           seed=seed, overwrite=True, batch_size=args.batch_size,
                           warmup=min(100, args.steps // 5))  # fmt: skip
    t0, load0 = time.time(), load()
    distill(config, progress=False)
    seconds = time.time() - t0
    trained, _, _ = load_checkpoint(config.out)
    return {"energy_ratio": ratio, "initial_kl": kl0, "val_loss": val_loss(trained, val),
            "initial_val_loss": val_loss(student, val), "train_seconds": seconds,
            "load_start": load0, "load_end": load()}  # fmt: skip


def report(args, summary: dict) -> str:
    rows, lines = summary["runs"], []
    lines.append(f"teacher validation loss {summary['teacher_val']:.4f} nats/char on "
                 f"{summary['val_windows']} windows of 64")  # fmt: skip
    lines.append("| ratio | schedule | energy ratio (counted) | predicted KL | KL untrained | "
                 "val loss untrained | val loss after stage 2: mean (seeds) |")  # fmt: skip
    lines.append("| --- | --- | --- | --- | --- | --- | --- |")
    for ratio in args.ratios:
        for kind in KINDS:
            runs = [rows[k] for k in sorted(rows) if k.startswith(f"{kind}_r{ratio:g}_s")]
            if not runs:
                continue
            sched = [summary["schedules"][k] for k in sorted(rows)
                     if k.startswith(f"{kind}_r{ratio:g}_s")]  # fmt: skip
            vals = [r["val_loss"] for r in runs]

            def span(key: str, fmt: str, items=runs) -> str:
                xs = sorted({format(r[key], fmt) for r in items})
                return " / ".join(xs)

            lines.append(
                f"| {ratio:g}x | {kind} | {span('energy_ratio', '.2f')} | "
                f"{span('predicted_kl', '.3f', sched)} | {span('initial_kl', '.3f')} | "
                f"{span('initial_val_loss', '.3f')} | **{statistics.mean(vals):.4f}** "
                f"({', '.join(f'{v:.4f}' for v in vals)}) |"
            )
    c = summary.get("rank_predicted_kl_vs_trained_loss")
    if c is not None:
        lines.append(f"Spearman(predicted KL, trained val loss) over {len(rows)} trained runs: "
                     f"{c:.3f}")  # fmt: skip
    lines.append(f"Spearman(predicted KL, measured KL) over {summary['n_check']} untrained "
                 f"schedules: {summary['rank_predicted_vs_measured_kl']:.3f}")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratios", type=float, nargs="+", default=[5.0, 8.0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", type=int, default=40, help="SBDS stage-2 steps per run")
    ap.add_argument("--batch-size", type=int, default=12)
    ap.add_argument("--windows", type=int, default=8, help="measurement windows (train split)")
    ap.add_argument("--val-windows", type=int, default=128)
    ap.add_argument("--hardware", default="45nm-fp32")
    ap.add_argument("--out", default="runs/refine-matrix")
    ap.add_argument("--report", action="store_true", help="print the table of finished runs")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    (out / "ckpt").mkdir(exist_ok=True)
    torch.manual_seed(0)
    teacher, tokenizer, _ = load_checkpoint(TEACHER)
    teacher.eval()
    data = TokenDataset.from_text_file(None)
    windows = data.windows("train", 64, args.windows)
    sample = windows[:2, :-1]
    val = data.windows("val", 64, args.val_windows)

    table = out / "measurements.json"
    if table.exists():
        m = Measurements.load(table)
    else:
        t0 = time.time()
        m = measure(teacher, windows, hardware=args.hardware, progress=print)
        m.save(table)
        print(f"measure: {time.time() - t0:.0f} s, load {load():.1f}", flush=True)
    path = out / "schedules.json"
    if path.exists():
        schedules = json.loads(path.read_text())
    else:
        schedules = make_schedules(args, teacher, windows, sample, m)
        write_json(path, schedules)
    path = out / "check.json"
    if path.exists():
        check = json.loads(path.read_text())
    else:
        t0 = time.time()
        check = additivity_check(args, teacher, windows, m, schedules)
        write_json(path, check)
        print(f"additivity check: {len(check)} schedules, {time.time() - t0:.0f} s", flush=True)

    names = [f"{kind}_r{ratio:g}_s{seed}" for seed in args.seeds for ratio in args.ratios
             for kind in KINDS]  # fmt: skip
    rows = {}
    for name in names:
        done = out / "runs" / f"{name}.json"
        if done.exists():
            rows[name] = json.loads(done.read_text())
            continue
        if args.report:
            continue
        try:  # claim the run: another worker on this folder skips it
            os.close(os.open(out / "runs" / f"{name}.lock", os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            continue
        print(f"{time.strftime('%H:%M:%S')} {name}: stage 2, {args.steps} steps, load "
              f"{load():.1f}", flush=True)  # fmt: skip
        row = train_one(args, name, schedules[name]["points"], tokenizer, teacher, windows,
                        sample, val)  # fmt: skip
        row["predicted_kl"] = schedules[name]["predicted_kl"]
        write_json(done, row)
        (out / "runs" / f"{name}.lock").unlink()
        rows[name] = row
        print(f"{time.strftime('%H:%M:%S')} {name}: {row}", flush=True)

    teacher_val = out / "teacher_val.json"
    if not teacher_val.exists():
        write_json(teacher_val, {"val_loss": val_loss(teacher, val)})
    summary = {
        "ratios": args.ratios, "seeds": args.seeds, "steps": args.steps,
        "batch_size": args.batch_size, "hardware": args.hardware,
        "teacher_val": json.loads(teacher_val.read_text())["val_loss"],
        "val_windows": args.val_windows, "schedules": schedules, "runs": rows,
        "rank_predicted_vs_measured_kl": spearman([c[1] for c in check], [c[2] for c in check]),
        "n_check": len(check), "check": check,
    }  # fmt: skip
    if len(rows) >= 3:
        summary["rank_predicted_kl_vs_trained_loss"] = spearman(
            [schedules[k]["predicted_kl"] for k in rows], [rows[k]["val_loss"] for k in rows]
        )
    write_json(out / "results.json", summary)
    if not args.report:
        plans = [plan(m, energy_ratio=r) for r in args.ratios]
        # seed 1's schedules, untrained (the other seeds share planned and uniform)
        measured = {k.rsplit("_s", 1)[0].replace("_r", " ") + "x": (r["energy_ratio"],
                                                                   r["initial_kl"])
                    for k, r in rows.items() if k.endswith(f"_s{args.seeds[0]}")}  # fmt: skip
        pareto_plot(m, plans, out / "pareto.png", measured=measured)
    print(report(args, summary))


if __name__ == "__main__":
    main()
