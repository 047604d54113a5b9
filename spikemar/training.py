"""Training loops: a language model from scratch (``spikemar train``) and, through the same
loop, distillation (:mod:`spikemar.distill`).

AdamW with decoupled weight decay on matrices only, linear warm-up then cosine decay to
``min_lr``, gradient clipping, bfloat16 autocast where the device has it, validation on fixed
batches every ``eval_interval`` steps, a checkpoint after each validation (and on Ctrl-C) that
holds the optimizer, scheduler and every RNG state, so ``resume=True`` continues the run exactly
where it stopped: the same batches, the same updates, bit for bit on the CPU. A kill -9 loses at
most the steps since the last checkpoint.

What a step minimises is an :class:`Objective` (cross-entropy here; SBDS in
:mod:`spikemar.distill`). Under ``torchrun`` the loop runs data-parallel
(DistributedDataParallel; gloo on CPU, nccl on CUDA): every rank draws the same global batch from
the same generator and takes its own contiguous slice, so N processes compute the update of one
process on the whole batch; rank 0 validates, writes checkpoints and shows progress.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import os
import signal
import threading
import time
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ._argtypes import int_at_least_1, positive_float
from .checkpoint import MODEL_KINDS, build_model, load_checkpoint, save_checkpoint
from .data import CharTokenizer, TokenDataset

__all__ = [
    "LoopConfig",
    "Objective",
    "TrainConfig",
    "add_loop_arguments",
    "evaluate",
    "loop_settings",
    "run_training",
    "train",
]

AMP_MODES = ("auto", "bf16", "off")
# what may differ between a run and its --resume: nothing that changes the updates
RESUMABLE_CHANGES = frozenset({"eval_interval", "eval_iters", "device", "amp", "out"})


@dataclass
class LoopConfig:
    """What every training loop shares: data, budget, optimiser, schedule, checkpoints."""

    data: str | None = None  # a UTF-8 text file; None: Tiny Shakespeare
    out: str = "runs/model.pt"
    steps: int = 2000
    batch_size: int = 12  # the global batch (split across ranks under torchrun)
    L: int = 64  # tokens per training window
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_interval: int = 250
    eval_iters: int = 20
    seed: int = 1337
    device: str = "cpu"
    amp: str = "auto"  # 'auto': bfloat16 autocast on CUDA when supported, off on CPU

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "L", "eval_interval", "eval_iters"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise ValueError(
                f"lr, min_lr: expected 0 <= min_lr <= lr, lr > 0; got {self.lr}, {self.min_lr}"
            )
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp: expected one of {AMP_MODES}, got {self.amp!r}")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"warmup: expected an int >= 0, got {self.warmup!r}")
        if not self.grad_clip > 0 or not self.weight_decay >= 0:
            raise ValueError(f"grad_clip, weight_decay: expected > 0 and >= 0, got "
                             f"{self.grad_clip}, {self.weight_decay}")  # fmt: skip


@dataclass
class TrainConfig(LoopConfig):
    model: str = "mar"  # 'mar' (spiking), 'mar-dense' or 'transformer'
    model_config: dict[str, Any] = field(default_factory=dict)  # overrides of the model config

    def __post_init__(self) -> None:
        if self.model not in MODEL_KINDS:
            raise ValueError(f"model: expected one of {MODEL_KINDS}, got {self.model!r}")
        super().__post_init__()


class Objective(nn.Module):
    """What a training step minimises: here, next-token cross-entropy of ``model``.

    ``forward(x, y)`` returns ``(loss, terms)``, terms being detached scalars for the progress
    bar. ``model`` is what the checkpoint holds; a subclass's other trainable submodules (a
    feature projection) travel in the training state through ``extra_state``/``load_extra``.
    Everything trained runs inside ``forward``, so DistributedDataParallel sees all of it.
    """

    find_unused_parameters = False

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor):
        logits = self.model(x)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        return loss, {"loss": loss.detach()}

    def begin_step(self, step: int) -> None:
        """Called before each step (a phased objective switches phase here)."""

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"resume: unexpected objective state {sorted(state)}")


def add_loop_arguments(parser: argparse.ArgumentParser, *, out: str) -> None:
    """The command-line options of :class:`LoopConfig`, shared by ``train`` and ``distill``;
    :func:`loop_settings` turns the parsed ones back into its keyword arguments."""
    p = parser
    p.add_argument("--data", default=None, help="a UTF-8 text file (default: Tiny Shakespeare)")
    p.add_argument("--out", default=out, help="checkpoint path")
    p.add_argument("--resume", action="store_true", help="continue the run saved at --out")
    p.add_argument("--steps", type=int_at_least_1, default=2000)
    p.add_argument("--batch-size", type=int_at_least_1, default=12,
                   help="the global batch (split across ranks under torchrun)")  # fmt: skip
    p.add_argument("--L", type=int_at_least_1, default=64, help="tokens per training window")
    p.add_argument("--lr", type=positive_float, default=1e-3, help="peak; cosine down to lr/10")
    p.add_argument("--warmup", type=int, default=100, help="steps of linear warm-up")
    p.add_argument("--eval-interval", type=int_at_least_1, default=250)
    p.add_argument("--eval-iters", type=int_at_least_1, default=20)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", choices=AMP_MODES, default="auto",
                   help="bfloat16 autocast ('auto': on CUDA devices that have it)")  # fmt: skip
    p.add_argument("--no-progress", action="store_true")


def loop_settings(args: argparse.Namespace) -> dict[str, Any]:
    """:class:`LoopConfig`'s keyword arguments from options declared by
    :func:`add_loop_arguments`."""
    return {
        "data": args.data, "out": args.out, "steps": args.steps, "batch_size": args.batch_size,
        "L": args.L, "lr": args.lr, "min_lr": args.lr / 10, "warmup": args.warmup,
        "eval_interval": args.eval_interval, "eval_iters": args.eval_iters, "seed": args.seed,
        "device": args.device, "amp": args.amp,
    }  # fmt: skip


def lr_factor(step: int, config: LoopConfig) -> float:
    """Multiplier of ``lr`` at ``step``: linear warm-up, then cosine down to ``min_lr``."""
    if step < config.warmup:
        return (step + 1) / config.warmup
    progress = min(1.0, (step - config.warmup) / max(1, config.steps - config.warmup))
    floor = config.min_lr / config.lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(module: nn.Module, config: LoopConfig) -> torch.optim.Optimizer:
    decay = [p for p in module.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in module.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]  # fmt: skip
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.99))


def autocast(config: LoopConfig, device: str) -> contextlib.AbstractContextManager:
    """bfloat16 autocast when asked for ('bf16') or when 'auto' finds a CUDA device with it."""
    kind = torch.device(device).type
    use = config.amp == "bf16" or (
        config.amp == "auto" and kind == "cuda" and torch.cuda.is_bf16_supported()
    )
    return torch.autocast(kind, dtype=torch.bfloat16) if use else contextlib.nullcontext()


@torch.no_grad()
def evaluate(
    model: nn.Module, data: TokenDataset, config: LoopConfig, device: str | None = None
) -> dict[str, float]:
    """Mean cross-entropy (nats per token) on ``eval_iters`` fixed batches of each split."""
    device = device or config.device
    was_training = model.training
    model.eval()
    losses = {}
    for split in ("train", "val"):
        gen = torch.Generator().manual_seed(config.seed + 1)  # the same batches every time
        total = 0.0
        for _ in range(config.eval_iters):
            x, y = data.batch(split, config.batch_size, config.L, generator=gen)
            logits = model(x.to(device))
            total += F.cross_entropy(logits.flatten(0, 1), y.to(device).flatten()).item()
        losses[split] = total / config.eval_iters
    model.train(was_training)
    return losses


def _rng_state(gen: torch.Generator) -> dict[str, Any]:
    return {"batches": gen.get_state(), "torch": torch.get_rng_state()}


@contextlib.contextmanager
def _sigint_deferred():
    """Hold a Ctrl-C back until the block ends (then raise it), so that an interrupt never lands
    inside an optimizer update and leaves some parameters updated and others not."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


def check_resume_config(saved: dict[str, Any], config: LoopConfig) -> None:
    """A resumed run must make the same updates: only :data:`RESUMABLE_CHANGES` may differ."""
    current = asdict(config)
    # a setting added to the configuration after the run was saved ran at its default
    defaults = {f.name: f.default for f in fields(config) if f.default is not MISSING}
    saved = {**{k: v for k, v in defaults.items() if k not in saved}, **saved}
    changed = sorted(k for k in current.keys() | saved.keys()
                     if k not in RESUMABLE_CHANGES and current.get(k) != saved.get(k))  # fmt: skip
    if changed:
        details = ", ".join(f"{k}: saved {saved.get(k)!r}, now {current.get(k)!r}" for k in changed)
        raise ValueError(f"resume: the run was started with other settings ({details}); resume "
                         "with the same ones, or start a new run with another --out")  # fmt: skip


def distributed_setup(device: str) -> tuple[int, int, str]:
    """``(rank, world_size, device)``; joins the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    rank = int(os.environ["RANK"])
    cuda = torch.device(device).type == "cuda"
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", rank))
        device = f"cuda:{local}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # rank 0 validates and writes checkpoints while the others wait at a barrier
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=2))
    return rank, world, device


def read_resume_state(out: Path, tokenizer: CharTokenizer, device: str):
    """The model and training state saved at ``out``, checked against the data's vocabulary."""
    if not out.is_file():
        raise FileNotFoundError(f"resume: no checkpoint at {out} to resume from")
    model, saved_tokenizer, payload = load_checkpoint(out, map_location="cpu")
    model.to(device)
    if "train" not in payload:
        raise ValueError(f"resume: {out} holds no training state (a final export?)")
    if saved_tokenizer != tokenizer:
        raise ValueError("resume: the checkpoint's vocabulary differs from the data's")
    return model, payload["train"]


def run_training(
    config: LoopConfig,
    objective: Objective,
    data: TokenDataset,
    *,
    state: dict[str, Any] | None = None,
    desc: str = "train",
    progress: bool = True,
    checkpoint_info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run ``objective`` for ``config.steps`` steps from ``state`` (a checkpoint's training
    state) or from the start; returns the history, the best validation loss and the path."""
    rank, world, device = distributed_setup(config.device)
    if config.batch_size % world:
        raise ValueError(
            f"batch_size: the global batch {config.batch_size} must divide among {world} ranks"
        )
    out = Path(config.out)
    model = objective.model
    objective.to(device).train()
    optimizer = make_optimizer(objective, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config))
    gen = torch.Generator().manual_seed(config.seed)
    start, history, best = 0, [], math.inf
    if state is not None:
        check_resume_config(state["config"], config)
        objective.load_extra(state.get("objective", {}))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        gen.set_state(state["rng"]["batches"].cpu())
        torch.set_rng_state(state["rng"]["torch"].cpu())
        start, history, best = state["step"], state["history"], state["best_val"]
    stepper: nn.Module = objective
    if world > 1:
        stepper = nn.parallel.DistributedDataParallel(
            objective, broadcast_buffers=False,
            find_unused_parameters=objective.find_unused_parameters,
        )  # fmt: skip
    trained = [p for p in objective.parameters() if p.requires_grad]
    share = slice(rank * config.batch_size // world, (rank + 1) * config.batch_size // world)

    def checkpoint(step: int) -> None:
        if rank != 0:
            return
        train_state = {
            "step": step, "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "rng": _rng_state(gen),
            "config": asdict(config), "history": history, "best_val": best,
            "objective": objective.extra_state(), **(checkpoint_info or {}),
        }  # fmt: skip
        save_checkpoint(out, model, data.tokenizer, train_state)

    bar = tqdm(range(start, config.steps), initial=start, total=config.steps,
               disable=not progress or rank != 0, desc=desc, unit="step")  # fmt: skip
    done, tokens_seen, t0 = start, 0, time.perf_counter()  # done: steps fully applied
    phase, rng_before, sched_before = "between steps", None, None
    try:
        for step in bar:
            rng_before, sched_before, phase = _rng_state(gen), scheduler.last_epoch, "computing"
            objective.begin_step(step)
            x, y = data.batch("train", config.batch_size, config.L, generator=gen)
            with autocast(config, device):
                loss, terms = stepper(x[share].to(device), y[share].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(trained, config.grad_clip)
            with _sigint_deferred():
                optimizer.step()
                phase = "updated"
                scheduler.step()
                done, phase = step + 1, "between steps"
            tokens_seen += x.numel()
            if step % 10 == 0 and rank == 0:
                rate = tokens_seen / (time.perf_counter() - t0)
                shown = {k: f"{v.item():.3f}" for k, v in terms.items()}
                bar.set_postfix(**shown, tok_s=f"{rate:,.0f}")
            if done % config.eval_interval == 0 or done == config.steps:
                if rank == 0:
                    losses = evaluate(model, data, config, device)
                    best = min(best, losses["val"])
                    history.append({"step": done, **losses})
                    bar.write(f"step {done}: train {losses['train']:.4f}, "
                              f"val {losses['val']:.4f}")  # fmt: skip
                    checkpoint(done)
                if world > 1:
                    dist.barrier()
    except KeyboardInterrupt:
        # Save a consistent state: a step whose update was applied is completed (with its
        # scheduler step); a step interrupted before its update is undone (its batch redrawn).
        if phase == "updated":
            if scheduler.last_epoch == sched_before:
                scheduler.step()
            done += 1
        elif phase == "computing":
            gen.set_state(rng_before["batches"])
            torch.set_rng_state(rng_before["torch"])
        checkpoint(done)
        if rank == 0:
            bar.write(f"interrupted: saved {out} at step {done}; continue with --resume")
        raise
    finally:
        bar.close()
    return {"history": history, "best_val": best, "checkpoint": str(out)}


def train(config: TrainConfig, *, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train ``config.model`` on ``config.data``; returns the final losses and the history."""
    data = TokenDataset.from_text_file(config.data)
    torch.manual_seed(config.seed)
    _, _, device = distributed_setup(config.device)
    state = None
    if resume:
        model, state = read_resume_state(Path(config.out), data.tokenizer, device)
    else:
        model_config = {"vocab_size": data.vocab_size, **config.model_config}
        if config.model == "transformer":
            model_config.setdefault("max_len", config.L)
        model = build_model(config.model, model_config)
    return run_training(config, Objective(model), data, state=state,
                        desc=f"train {config.model}", progress=progress)  # fmt: skip
