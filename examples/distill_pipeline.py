"""MAR's whole pipeline on Tiny Shakespeare, and the paper's SBDS ablation, on a CPU.

    1. a Transformer teacher, trained from scratch            (spikemar train --model transformer)
    2. stage 1: Transformer → dense SSM LM                    (spikemar distill --stage 1)
    3. stage 2: dense SSM → spiking MAR students, one per ablation row, same budget each
                                                              (spikemar distill --stage 2)

The rows (DESIGN.md §1; the paper's ordering: binary worst, ATMN the largest gain, full SBDS best):

    binary         binary spikes (no ATMN), forward KL
    atmn-fkl       ATMN, forward KL (α = 0.2, β = 0)
    atmn-fkl-rkl   ATMN, forward and reverse KL (α = 0.2, β = 0.7)
    sbds           full SBDS: + pre-norm feature loss
    sbds-postnorm  post-norm alignment instead of pre-norm
    sbds-gamma*    full SBDS with the feature term weighted by γ = 0.1, 0.01 (the paper's
                   formula has γ = 1; at this scale the feature term then dominates the KL)
    atmn-ce        reference: ATMN fine-tuned on the data alone (cross-entropy, no teacher term)

Every student starts from the dense teacher's weights and runs the same steps, batch and
schedule. Each row is then measured the same way: validation loss (nats/char) on fixed batches,
and energy per token against the dense teacher (``spikemar.energy``, 45 nm fp32) on a fixed slice
of the validation text. The table goes to ``<out>/results.md`` (and ``results.json``).

Interrupt it at any time: a finished stage is skipped, an unfinished one resumes from its last
checkpoint, finished rows are kept. Several runs may share ``--out`` (each row is its own file),
e.g. one per core with ``OMP_NUM_THREADS=1`` and different ``--rows``; the table gathers them all.

Run: ``python examples/distill_pipeline.py [--out runs/pipeline] [--seeds 1 2] [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from spikemar.checkpoint import dense_twin, load_checkpoint
from spikemar.data import TokenDataset
from spikemar.distill import DistillConfig, distill
from spikemar.energy import compare, profile
from spikemar.training import LoopConfig, TrainConfig, check_resume_config, evaluate, train

ROWS: dict[str, dict] = {
    "binary": {"alpha": 0.2, "beta": 0.0, "feature": None, "neuron": "binary"},
    "atmn-fkl": {"alpha": 0.2, "beta": 0.0, "feature": None},
    "atmn-fkl-rkl": {"alpha": 0.2, "beta": 0.7, "feature": None},
    "sbds": {"alpha": 0.2, "beta": 0.7, "feature": "prenorm"},
    "sbds-postnorm": {"alpha": 0.2, "beta": 0.7, "feature": "postnorm"},
    "sbds-gamma0.1": {"alpha": 0.2, "beta": 0.7, "feature": "prenorm", "gamma": 0.1},
    "sbds-gamma0.01": {"alpha": 0.2, "beta": 0.7, "feature": "prenorm", "gamma": 0.01},
    "atmn-ce": {"alpha": 0.0, "beta": 0.0, "feature": None, "ce": 1.0},
}
LABELS = {
    "binary": "binary spikes (no ATMN) + forward KL",
    "atmn-fkl": "ATMN + forward KL",
    "atmn-fkl-rkl": "ATMN + forward and reverse KL",
    "sbds": "full SBDS (+ pre-norm feature loss)",
    "sbds-postnorm": "SBDS with post-norm alignment instead",
    "sbds-gamma0.1": "full SBDS, feature term weighted γ = 0.1",
    "sbds-gamma0.01": "full SBDS, feature term weighted γ = 0.01",
    "atmn-ce": "reference: ATMN + cross-entropy only (no teacher)",
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="a UTF-8 text file (default: Tiny Shakespeare)")
    p.add_argument("--out", default="runs/pipeline", help="folder for checkpoints and results")
    p.add_argument("--teacher-steps", type=int, default=2000, help="Transformer from scratch")
    p.add_argument("--stage1-steps", type=int, default=2000)
    p.add_argument("--student-steps", type=int, default=1000, help="each stage-2 row")
    p.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    p.add_argument("--seeds", nargs="+", type=int, default=[1])
    p.add_argument("--T", type=int, default=4, help="student micro-steps")
    p.add_argument("--tau", type=float, default=1.0, help="student ATMN τ")
    p.add_argument("--v-threshold", type=float, default=0.75, help="student initial V")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--eval-iters", type=int, default=50)
    p.add_argument("--energy-chars", type=int, default=4096, help="validation text to price")
    p.add_argument("--quick", action="store_true", help="a tiny budget (a smoke test)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.teacher_steps, args.stage1_steps, args.student_steps = 30, 30, 20
        args.d_model, args.n_layers, args.eval_iters, args.energy_chars = 32, 2, 2, 256
    for name in ("teacher_steps", "stage1_steps", "student_steps", "eval_iters", "T"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: expected an int >= 1, got {getattr(args, name)}")
    return args


def finished(path: Path, config: LoopConfig) -> bool:
    """Whether ``path`` holds a run of ``config`` to its last step; a run of other settings (say,
    another budget) is an error, not a result to reuse."""
    if not path.is_file():
        return False
    state = torch.load(path, weights_only=True)["train"]
    check_resume_config(state["config"], config)
    return state["step"] >= config.steps


def run_stage(path: Path, config: LoopConfig, run) -> None:
    """Skip a finished stage, resume an unfinished one, start a missing one."""
    if finished(path, config):
        print(f"{path}: done, skipped")
        return
    run(resume=path.is_file())


def write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def measure(path: Path, data: TokenDataset, loop: LoopConfig, energy_ids: torch.Tensor) -> dict:
    """Validation loss on the fixed batches, and energy per token against the dense twin."""
    model, _, payload = load_checkpoint(path)
    row = {"val": evaluate(model, data, loop)["val"], "step": payload["train"]["step"]}
    if getattr(model.config, "spikes", None) is not None:
        student, dense = profile(model, energy_ids), profile(dense_twin(model), energy_ids)
        cmp = compare(student, dense)
        spikes = [r for r in student.rows if r.firing_rate is not None]
        row.update(
            energy_pj_per_token=student.per_token()["energy_pj"],
            dense_pj_per_token=dense.per_token()["energy_pj"],
            energy_ratio=cmp.savings,  # how many times less energy than the dense twin
            firing_rate=sum(r.firing_rate for r in spikes) / max(1, len(spikes)),
        )
    return row


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    started = time.perf_counter()
    common = {"data": args.data, "batch_size": 12, "L": 64, "eval_interval": 250,
              "eval_iters": args.eval_iters, "warmup": 100}  # fmt: skip
    if args.quick:
        common.update(batch_size=4, L=32, eval_interval=10, warmup=5)
    shape = {"d_model": args.d_model, "n_layers": args.n_layers}
    progress = not args.no_progress

    transformer, dense = out / "transformer.pt", out / "dense.pt"
    cfg = TrainConfig(**common, model="transformer", model_config={**shape, "n_heads": 4},
                      out=str(transformer), steps=args.teacher_steps)  # fmt: skip
    run_stage(transformer, cfg, lambda resume: train(cfg, resume=resume, progress=progress))
    cfg1 = DistillConfig(**common, stage=1, teacher=str(transformer), out=str(dense),
                         steps=args.stage1_steps)  # fmt: skip
    run_stage(dense, cfg1, lambda resume: distill(cfg1, resume=resume, progress=progress))

    data = TokenDataset.from_text_file(args.data)
    loop = LoopConfig(**common)
    segment = 64 if args.quick else 512  # sequences of the energy pass
    n = min(args.energy_chars, len(data.splits["val"])) // segment * segment
    energy_ids = torch.from_numpy(data.splits["val"][:n].astype("int64")).view(-1, segment)
    # one file per measured row, so that several runs of this script (say, one per core, each
    # with its own --rows) can share an output folder; results.json merges them
    rows_dir = out / "rows"
    rows_dir.mkdir(exist_ok=True)
    results = {"transformer": measure(transformer, data, loop, energy_ids),
               "dense": measure(dense, data, loop, energy_ids)}  # fmt: skip
    for seed in args.seeds:
        for name in args.rows:
            row = dict(ROWS[name])
            spikes = {"T": args.T, "tau": args.tau, "v_threshold": args.v_threshold}
            if "neuron" in row:
                spikes["neuron"] = row.pop("neuron")
            path = out / f"student-{name}-seed{seed}.pt"
            cfg2 = DistillConfig(**{**common, "seed": seed}, stage=2, teacher=str(dense),
                                 out=str(path), steps=args.student_steps,
                                 student_config={"spikes": spikes}, **row)  # fmt: skip
            row_path = rows_dir / f"{name}-seed{seed}.json"
            if row_path.is_file() and finished(path, cfg2):
                print(f"{path}: done, skipped")
                continue

            def run(resume: bool, c: DistillConfig = cfg2) -> None:
                distill(c, resume=resume, progress=progress)

            run_stage(path, cfg2, run)
            write_atomic(row_path, json.dumps(measure(path, data, loop, energy_ids)) + "\n")
    for row_path in sorted(rows_dir.glob("*-seed*.json")):
        name, seed = row_path.stem.rsplit("-seed", 1)
        results[f"{name}/seed{seed}"] = json.loads(row_path.read_text())
    write_atomic(out / "results.json", json.dumps(results, indent=2) + "\n")
    table = results_table(results, args)
    write_atomic(out / "results.md", table)
    print(table)
    print(f"{out}: done in {(time.perf_counter() - started) / 60:.1f} min")
    return 0


def results_table(results: dict, args: argparse.Namespace) -> str:
    dense_val = results["dense"]["val"]
    lines = [
        f"Students: T = {args.T}, τ = {args.tau}, V₀ = {args.v_threshold}, "
        f"{args.student_steps} steps each, from the dense teacher's weights. Validation loss "
        "in nats/char, one value per seed.",
        "",
        "| model | val loss (per seed) | mean | vs dense teacher | firing rate | "
        "energy vs dense (fp32) |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
        f"| Transformer (stage-1 teacher) | {results['transformer']['val']:.4f} | "
        f"{results['transformer']['val']:.4f} | | | |",
        f"| dense SSM teacher (stage 1) | {dense_val:.4f} | {dense_val:.4f} | | | 1.00× |",
    ]
    seeds = sorted({int(k.rsplit("/seed", 1)[1]) for k in results if "/seed" in k})
    for name in ROWS:
        rows = [results[f"{name}/seed{s}"] for s in seeds if f"{name}/seed{s}" in results]
        if not rows:
            continue
        vals = [r["val"] for r in rows]
        mean = sum(vals) / len(vals)
        rate = sum(r["firing_rate"] for r in rows) / len(rows)
        ratio = sum(r["energy_ratio"] for r in rows) / len(rows)
        lines.append(
            f"| {LABELS[name]} | {' / '.join(f'{v:.4f}' for v in vals)} | {mean:.4f} | "
            f"{100 * (mean / dense_val - 1):+.1f} % | {rate:.3f} | {ratio:.2f}× |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
