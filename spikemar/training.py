"""Training a language model from scratch on a text file (``spikemar train``).

AdamW with decoupled weight decay on matrices only, linear warm-up then cosine decay to
``min_lr``, gradient clipping, validation on fixed batches every ``eval_interval`` steps, a
checkpoint after each validation (and on Ctrl-C) that holds the optimizer, scheduler and every
RNG state, so ``resume=True`` continues the run exactly where it stopped: the same batches, the
same updates, bit for bit on the CPU.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .checkpoint import MODEL_KINDS, build_model, load_checkpoint, save_checkpoint
from .data import TokenDataset

__all__ = ["TrainConfig", "evaluate", "train"]


@dataclass
class TrainConfig:
    model: str = "mar"  # 'mar' (spiking), 'mar-dense' or 'transformer'
    model_config: dict[str, Any] = field(default_factory=dict)  # overrides of the model config
    data: str | None = None  # a UTF-8 text file; None: Tiny Shakespeare
    out: str = "runs/model.pt"
    steps: int = 2000
    batch_size: int = 12
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

    def __post_init__(self) -> None:
        if self.model not in MODEL_KINDS:
            raise ValueError(f"model: expected one of {MODEL_KINDS}, got {self.model!r}")
        for name in ("steps", "batch_size", "L", "eval_interval", "eval_iters"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise ValueError(
                f"lr, min_lr: expected 0 <= min_lr <= lr, lr > 0; got {self.lr}, {self.min_lr}"
            )


def lr_factor(step: int, config: TrainConfig) -> float:
    """Multiplier of ``lr`` at ``step``: linear warm-up, then cosine down to ``min_lr``."""
    if step < config.warmup:
        return (step + 1) / config.warmup
    progress = min(1.0, (step - config.warmup) / max(1, config.steps - config.warmup))
    floor = config.min_lr / config.lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]  # fmt: skip
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.99))


@torch.no_grad()
def evaluate(model: nn.Module, data: TokenDataset, config: TrainConfig) -> dict[str, float]:
    """Mean cross-entropy (nats per token) on ``eval_iters`` fixed batches of each split."""
    was_training = model.training
    model.eval()
    losses = {}
    for split in ("train", "val"):
        gen = torch.Generator().manual_seed(config.seed + 1)  # the same batches every time
        total = 0.0
        for _ in range(config.eval_iters):
            x, y = data.batch(split, config.batch_size, config.L, generator=gen)
            logits = model(x.to(config.device))
            total += F.cross_entropy(logits.flatten(0, 1), y.to(config.device).flatten()).item()
        losses[split] = total / config.eval_iters
    model.train(was_training)
    return losses


def _rng_state(gen: torch.Generator) -> dict[str, Any]:
    return {"batches": gen.get_state(), "torch": torch.get_rng_state()}


def train(config: TrainConfig, *, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train ``config.model`` on ``config.data``; returns the final losses and the history."""
    data = TokenDataset.from_text_file(config.data)
    out = Path(config.out)
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    if resume:
        if not out.is_file():
            raise FileNotFoundError(f"resume: no checkpoint at {out} to resume from")
        model, tokenizer, payload = load_checkpoint(out, map_location=config.device)
        if "train" not in payload:
            raise ValueError(f"resume: {out} holds no training state (a final export?)")
        state = payload["train"]
        if tokenizer != data.tokenizer:
            raise ValueError("resume: the checkpoint's vocabulary differs from the data's")
    else:
        model_config = {"vocab_size": data.vocab_size, **config.model_config}
        if config.model == "transformer":
            model_config.setdefault("max_len", config.L)
        model = build_model(config.model, model_config)
        tokenizer, state = data.tokenizer, None
    model.to(config.device).train()
    optimizer = make_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config))
    start, history, best = 0, [], math.inf
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        gen.set_state(state["rng"]["batches"])
        torch.set_rng_state(state["rng"]["torch"])
        start, history, best = state["step"], state["history"], state["best_val"]

    def checkpoint(step: int) -> None:
        train_state = {
            "step": step, "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "rng": _rng_state(gen),
            "config": asdict(config), "history": history, "best_val": best,
        }  # fmt: skip
        save_checkpoint(out, model, tokenizer, train_state)

    bar = tqdm(range(start, config.steps), initial=start, total=config.steps,
               disable=not progress, desc=f"train {config.model}", unit="step")  # fmt: skip
    done, tokens_seen, t0 = start, 0, time.perf_counter()  # done: steps fully applied
    phase, rng_before = "between steps", None
    try:
        for step in bar:
            rng_before, sched_before, phase = _rng_state(gen), scheduler.last_epoch, "computing"
            x, y = data.batch("train", config.batch_size, config.L, generator=gen)
            logits = model(x.to(config.device))
            loss = F.cross_entropy(logits.flatten(0, 1), y.to(config.device).flatten())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            phase = "updated"
            scheduler.step()
            done, phase = step + 1, "between steps"
            tokens_seen += x.numel()
            if step % 10 == 0:
                rate = tokens_seen / (time.perf_counter() - t0)
                bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{rate:,.0f}")
            if done % config.eval_interval == 0 or done == config.steps:
                losses = evaluate(model, data, config)
                best = min(best, losses["val"])
                history.append({"step": done, **losses})
                bar.write(f"step {done}: train {losses['train']:.4f}, val {losses['val']:.4f}")
                checkpoint(done)
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
        bar.write(f"interrupted: saved {out} at step {done}; continue with --resume")
        raise
    finally:
        bar.close()
    return {"history": history, "best_val": best, "checkpoint": str(out)}
