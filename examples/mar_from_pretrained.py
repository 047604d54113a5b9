"""MAR from a pretrained model, end to end on a CPU: a real Hugging Face teacher in, a spiking
MAR student out.

No pretrained language model can be downloaded here, so the teacher is made the way its users'
models are made: a small ``transformers.Mamba2ForCausalLM`` trained by transformers' own model
code (its forward and loss) on Tiny Shakespeare, with a byte-level BPE tokenizer trained with
``tokenizers``, saved with ``save_pretrained``. Then, what a user does with
``state-spaces/mamba2-130m`` or ``cartesia-ai/Llamba-1B``:

    1. spikemar.models.from_pretrained(DIR)    the same model in spikemar (logits checked)
    2. spikemar.convert.convert(DIR, ...)      MAR's spike points in, thresholds calibrated
    3. spikemar distill --stage 2 --teacher DIR --student student.pt     SBDS, short
    4. energy report, text generation, validation loss of the student beside its teacher

The teacher (and its tokenizer) is cached in ``<out>/teacher`` and reused by later runs.

Run: ``python examples/mar_from_pretrained.py [--out runs/pretrained] [--data FILE|FOLDER]
[--teacher-steps 60] [--distill-steps 40]``. transformers' CPU path for Mamba-2 (no fused
kernels on a CPU) is the slow part: about 0.05 s per teacher step on 2 quiet cores, several
times that when the machine is busy; the defaults take 16 s on 2 quiet cores (about a minute
on a busy machine) and give a teacher well below the uniform guess (ln 512 = 6.24 nats/token).
A second run reuses the cached teacher. The last line gives the teacher's, the converted
student's and the distilled student's loss on the same held-out windows.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from spikemar import energy
from spikemar.checkpoint import load_checkpoint
from spikemar.convert import convert
from spikemar.data import TokenDataset, default_corpus, read_documents
from spikemar.distill import DistillConfig, distill
from spikemar.models import from_pretrained
from spikemar.tokenizer import HFTokenizer, generate_text

TEACHER = {  # a small Mamba-2 (transformers' names); 0.12 M parameters with a 512-token BPE
    "vocab_size": 512,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "state_size": 16,
    "head_dim": 16,
    "num_heads": 8,
    "expand": 2,
    "n_groups": 1,
    "conv_kernel": 4,
    # transformers' CPU path materialises [chunk × chunk] products per head and channel: short
    # chunks cost ~2x less per step here than 64 (the model computes the same function)
    "chunk_size": 16,
    "tie_word_embeddings": False,
}


def train_tokenizer(text: str, vocab_size: int) -> HFTokenizer:
    """A byte-level BPE (GPT-2's pre-tokenizer) with <|endoftext|> as id 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)  # fmt: skip
    tok.train_from_iterator([text], trainer)
    return HFTokenizer(tok, eos_id=0)


L = 64  # tokens per training window (BPE tokens: about 4 characters each)


def train_teacher(
    folder: Path, data_path: Path, steps: int, seed: int, batch_size: int = 8, lr: float = 5e-3
) -> None:
    """Train a Mamba2ForCausalLM with transformers' model code and save it with
    save_pretrained (safetensors), its tokenizer beside it."""
    from transformers import Mamba2Config, Mamba2ForCausalLM

    text = "\n".join(read_documents(data_path))  # a text file, a .jsonl or a folder of them
    tok = train_tokenizer(text[: int(0.9 * len(text))], TEACHER["vocab_size"])
    data = TokenDataset.from_text_file(data_path, tokenizer=tok)
    torch.manual_seed(seed)
    model = Mamba2ForCausalLM(Mamba2Config(**TEACHER, eos_token_id=0, pad_token_id=0))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    warmup = max(1, min(30, steps // 10))
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    model.train()
    for step in range(steps):
        cosine = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps))  # down to lr / 10
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup) * cosine
        x, _ = data.batch("train", batch_size, L, generator=gen)
        loss = model(input_ids=x, labels=x).loss  # transformers shifts the labels itself
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 20 == 0 or step == steps - 1:
            print(f"  teacher step {step:4d}  loss {loss.item():.3f}  "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)  # fmt: skip
    model.eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save(folder)  # tokenizer.json, and tokenizer_config.json naming <|endoftext|>
    (folder / "trained.json").write_text(json.dumps({"steps": steps, "seed": seed,
                                                     "data": str(data_path)}))  # fmt: skip


@torch.no_grad()
def held_out_loss(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token cross-entropy (nats/token) over windows [n, L + 1]."""
    total = 0.0
    for i in range(0, len(windows), batch_size):
        w = windows[i : i + batch_size]
        logits = model(w[:, :-1]).float()
        total += F.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten(), reduction="sum").item()
    return total / windows[:, 1:].numel()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/pretrained")
    p.add_argument("--data", default=None, help="training text (default: Tiny Shakespeare)")
    p.add_argument("--teacher-steps", type=int, default=60)
    p.add_argument("--distill-steps", type=int, default=40)
    p.add_argument("--firing-rate", type=float, default=0.2)
    p.add_argument("--T", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    # refused before the teacher trains (a bad value failed minutes later, in a traceback)
    for flag, value in (("--teacher-steps", args.teacher_steps),
                        ("--distill-steps", args.distill_steps), ("--T", args.T)):  # fmt: skip
        if value < 1:
            p.error(f"{flag}: expected an int >= 1, got {value}")
    if not 0 < args.firing_rate < 1:
        p.error(f"--firing-rate: expected a fraction in (0, 1), got {args.firing_rate}")
    out = Path(args.out)
    data_path = Path(args.data) if args.data else default_corpus()
    if not data_path.exists():
        p.error(f"--data: no text file or folder at {data_path}")
    if out.exists() and not out.is_dir():
        p.error(f"--out: {out} is a file; expected a folder")
    teacher_dir = out / "teacher"
    torch.set_num_threads(min(2, torch.get_num_threads()))

    if not (teacher_dir / "config.json").is_file():
        print(f"1. training the teacher (transformers' Mamba2ForCausalLM) → {teacher_dir}")
        train_teacher(teacher_dir, data_path, args.teacher_steps, args.seed)
    else:
        trained = json.loads((teacher_dir / "trained.json").read_text())
        print(f"1. teacher: {teacher_dir} (cached, {trained['steps']} steps; delete it to "
              "retrain)")  # fmt: skip

    # 2. the same model in spikemar, checked against transformers on one batch
    from transformers import Mamba2ForCausalLM

    dense = from_pretrained(teacher_dir)
    hf = Mamba2ForCausalLM.from_pretrained(teacher_dir).eval()
    probe = torch.tensor([dense.tokenizer.encode("ROMEO:\nWhat light through yonder window")])
    with torch.no_grad():
        diff = (dense(probe) - hf(probe).logits).abs().max().item()
    n_params = sum(t.numel() for t in dense.parameters())
    print(f"2. from_pretrained: {n_params / 1e6:.2f} M parameters, max |Δlogit| against "
          f"transformers {diff:.2e}")  # fmt: skip

    # 3. MAR-ify: spike points in, thresholds calibrated
    student_path = out / "student-converted.pt"
    result = convert(teacher_dir, student_path, spikes={"T": args.T, "tau": 1.0},
                     firing_rate=args.firing_rate, data=data_path, calib_batches=4,
                     eval_batches=8, batch_size=8, L=L, seed=args.seed)  # fmt: skip
    print(f"3. convert: {result.summary()}")

    # 4. SBDS stage 2, short: the pretrained directory is the teacher (a rerun redoes 2-5)
    distilled = out / "student.pt"
    config = DistillConfig(stage=2, teacher=str(teacher_dir), student=str(student_path),
                           data=str(data_path), out=str(distilled), steps=args.distill_steps,
                           batch_size=8, L=L, lr=5e-4, min_lr=5e-5, warmup=10,
                           eval_interval=max(1, args.distill_steps // 3), eval_iters=8,
                           alpha=0.2, beta=0.7, feature="prenorm", gamma=0.01,
                           seed=args.seed, overwrite=True)  # fmt: skip
    run = distill(config, resume=False, progress=False)
    print(
        f"4. distill stage 2 ({args.distill_steps} steps): student {run['best_val']:.4f} "
        f"nats/token, teacher {run['teacher_val']:.4f} (same validation batches)"
    )

    # 5. energy and text; the three models' losses on the same held-out windows (the ones
    # convert measured: the first 64 of the validation split)
    student, tokenizer, _ = load_checkpoint(distilled)  # the weights of the last step
    data = TokenDataset.from_text_file(data_path, tokenizer=tokenizer)
    held_out = data.windows("val", L, max_windows=64)
    losses = {"teacher": held_out_loss(dense, held_out),
              "converted": held_out_loss(result.student, held_out),
              "distilled": held_out_loss(student, held_out)}  # fmt: skip
    tokens = data.windows("val", L, max_windows=4)[:, :-1]
    comparison = energy.compare(energy.profile(student, tokens), energy.profile(dense, tokens))
    print("5. energy (45nm-fp32), student against its teacher:")
    print(comparison)
    gen = torch.Generator().manual_seed(args.seed)
    for name, model in (("teacher", dense), ("student", student)):
        # fused: each token one C call (the same logits as model.step, without its Python)
        text = generate_text(model, tokenizer, "ROMEO:\n", 60, temperature=0.8, top_k=40,
                             generator=gen, fused=True)  # fmt: skip
        print(f"--- {name} ---\n{text}")
    t = losses["teacher"]
    print(f"validation loss on {len(held_out)} held-out windows of {L} tokens (nats/token): "
          f"teacher {t:.4f}, student converted {losses['converted']:.4f} "
          f"({losses['converted'] - t:+.4f}), distilled {losses['distilled']:.4f} "
          f"({losses['distilled'] - t:+.4f})")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
