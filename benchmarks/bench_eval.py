"""Time lm-evaluation-harness requests: spikemar's model beside lm_eval's own ``hf`` model.

The requests are those of spikemar's local task ``shakespeare_nextline`` (a context of ~400
characters and one of four candidate lines, ``target_delimiter`` ""), sent to each model's
``loglikelihood`` exactly as lm_eval's evaluator sends them. Rows, all in the same run:

- ``spikemar``: :class:`spikemar.eval.harness.SpikemarLM` on a spikemar checkpoint (default the
  packaged student, ``spikemar/assets/mar_shakespeare.pt``: spiking MAR LM, 4 layers, d_model
  128, 0.97 M parameters), energy counting off;
- ``spikemar + energy``: the same with its energy counter on every pass (what ``spikemar eval``
  runs by default);
- ``hf GPT-2``: lm_eval's ``HFLM`` on a same-sized dense Transformer, a randomly initialised
  ``transformers.GPT2LMHeadModel`` (4 layers, 128 wide, 4 heads, 0.93 M parameters) saved with
  ``save_pretrained`` beside a character-level fast tokenizer over the same 65 characters (plus
  an end-of-text token), loaded by ``HFLM(pretrained=DIR)`` as a user would.

Weights do not change the time of a forward pass, so the Transformer's random weights measure its
speed fairly; they make its scores meaningless, which is why only time is reported. Every model
runs float32 on the CPU at the same batch size and thread count. Protocol: one untimed warm-up
call per row on the first 16 requests, then ``--repeats`` rounds, each timing every row once on
all ``--requests`` requests (rows interleaved, so a change of machine load hits them alike).
Reported: median and minimum time per 1,000 requests, and the median relative to ``hf GPT-2``.

    python benchmarks/bench_eval.py                       # 400 requests, 3 rounds: a few minutes
    python benchmarks/bench_eval.py --requests 100 --repeats 1 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CHECKPOINT = ROOT / "spikemar" / "assets" / "mar_shakespeare.pt"
TASK = ROOT / "spikemar" / "eval" / "tasks" / "shakespeare_nextline.jsonl"


def requests(n: int) -> list:
    """The first ``n`` loglikelihood requests of shakespeare_nextline, as lm_eval builds them."""
    from lm_eval.api.instance import Instance

    out = []
    for line in TASK.read_text(encoding="utf-8").splitlines():
        doc = json.loads(line)
        for choice in doc["choices"]:
            out.append(Instance("loglikelihood", doc, (doc["context"], choice), len(out)))
            if len(out) == n:
                return out
    raise ValueError(f"--requests: the task has only {len(out)} requests")


def hf_model(chars: str, folder: Path, batch_size: int):
    """lm_eval's HFLM on a random same-sized GPT-2 with a character-level tokenizer."""
    from lm_eval.models.huggingface import HFLM
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    eot = "<|endoftext|>"
    vocab = {c: i for i, c in enumerate(chars)} | {eot: len(chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=eot))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # per char
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eot, unk_token=eot,
                                   pad_token=eot)  # fmt: skip
    torch.manual_seed(0)
    eot_id = len(chars)
    config = GPT2Config(vocab_size=len(vocab), n_embd=128, n_layer=4, n_head=4,
                        n_positions=1024, bos_token_id=eot_id, eos_token_id=eot_id)  # fmt: skip
    model = GPT2LMHeadModel(config)
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    params = sum(p.numel() for p in model.parameters())
    return HFLM(
        pretrained=str(folder), device="cpu", batch_size=batch_size, dtype="float32"
    ), params


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--requests", type=int, default=400, help="requests per timed call (400)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (3)")
    p.add_argument("--batch-size", type=int, default=16, help="both models (16)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)
    if args.requests < 16 or args.repeats < 1:
        p.error("--requests >= 16 and --repeats >= 1")
    torch.set_num_threads(args.threads)
    load_start = _harness.load_average()

    from spikemar.eval.harness import SpikemarLM

    reqs = requests(args.requests)
    student = SpikemarLM(checkpoint=args.checkpoint, batch_size=args.batch_size,
                         count_energy=False)  # fmt: skip
    counted = SpikemarLM(checkpoint=args.checkpoint, batch_size=args.batch_size)
    params = sum(p.numel() for p in student.scorer.model.parameters())
    with tempfile.TemporaryDirectory() as folder:
        hf, hf_params = hf_model(student.tokenizer.chars, Path(folder), args.batch_size)
        rows = {
            f"spikemar ({args.checkpoint.name}, {params / 1e6:.2f} M params)": student,
            "spikemar + energy counter": counted,
            f"hf GPT-2, random, same size ({hf_params / 1e6:.2f} M params)": hf,
        }
        times: dict[str, list[float]] = {name: [] for name in rows}
        for name, lm in rows.items():
            print(f"warm-up: {name}", file=sys.stderr)
            lm.loglikelihood(reqs[:16], disable_tqdm=True)
        for r in range(args.repeats):
            for name, lm in rows.items():
                start = time.perf_counter()
                lm.loglikelihood(reqs, disable_tqdm=True)
                times[name].append(time.perf_counter() - start)
                print(f"round {r + 1}: {name}: {times[name][-1]:.2f} s", file=sys.stderr)
    info = _harness.machine_info(args.threads, load_start, packages=("lm_eval", "transformers"))
    print("\n".join(_harness.header_lines(info, ("lm_eval", "transformers"))))
    reference = _harness.timing_stats(times[list(rows)[-1]]).median
    print(f"{args.requests} loglikelihood requests of shakespeare_nextline per call, batch "
          f"{args.batch_size}, {args.repeats} rounds.\n")  # fmt: skip
    print("| model | s per 1,000 requests (median) | min | vs hf GPT-2 |")
    print("| --- | ---: | ---: | ---: |")
    out = []
    for name, ts in times.items():
        s = _harness.timing_stats(ts)
        per_k = 1000 / args.requests
        print(f"| {name} | {s.median * per_k:.2f} | {s.min * per_k:.2f} | "
              f"{s.median / reference:.2f}× |")  # fmt: skip
        out.append({"model": name, "seconds": ts, "per_1000_median_s": s.median * per_k})
    _harness.write_json(args.json, {"machine": info, "rows": out})
    return 0


if __name__ == "__main__":
    sys.exit(main())
