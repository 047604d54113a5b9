"""Training loops: a language model from scratch (``spikemar train``) and, through the same
loop, distillation (:mod:`spikemar.distill`).

AdamW with decoupled weight decay on matrices only, linear warm-up then cosine decay to
``min_lr``, gradient clipping, bfloat16 autocast where the device has it, validation on fixed
batches every ``eval_interval`` steps, a checkpoint after each validation (and on Ctrl-C) that
holds the optimizer, scheduler and every RNG state, so ``resume=True`` continues the run exactly
where it stopped: the same batches, the same updates, bit for bit on the CPU. A kill -9 loses at
most the steps since the last checkpoint, and the next run removes the temporary file of a save
it interrupted. ``resume=True`` with more ``steps`` than the saved run extends it: the saved
run's cosine schedule is kept and the steps past its end run at ``min_lr``.

Failing early and loudly: the output path is checked (and an existing checkpoint refused unless
``overwrite`` or ``resume``) before any data is read; a non-finite loss or gradient norm stops the
run (``on_nonfinite='stop'``, the default) or skips that update and counts it (``'skip'``), and a
model with NaN or inf weights is never written over the last good checkpoint. SIGTERM is handled
as Ctrl-C is: the run saves and stops.

What a step minimises is an :class:`Objective` (cross-entropy here; SBDS in
:mod:`spikemar.distill`). Under ``torchrun`` the loop runs data-parallel (gloo on CPU, nccl on
CUDA): every rank draws the same global batch from the same generator and takes its own
contiguous slice, so N processes compute the update of one process on the whole batch.

* ``shard='none'`` (default): DistributedDataParallel, a full replica of the model per rank;
  rank 0 validates, writes checkpoints and shows progress.
* ``shard='fsdp'``: for a model whose weights, gradients and optimizer state do not fit one
  device, PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``): each layer of the trained
  model is one shard group (gathered for its forward and backward, then freed), the rest of the
  trained parameters (embedding, final norm, head, an objective's feature projection) the root
  group; parameters that are not trained (a distillation teacher, frozen and run under
  ``no_grad``) stay whole on every rank. Gradients are reduce-scattered as averages, so the
  update equals one process's on the global batch (to float rounding: the sums run in another
  order). Every rank validates (each forward needs all of them); checkpoints hold the *full*
  state dict (gathered, then written by rank 0), so they load into an unsharded model and
  resume under either setting and any number of ranks. One process ignores ``'fsdp'``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import os
import signal
import sys
import threading
import time
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ._argtypes import (
    check_device,
    device_argument,
    finite_positive_float,
    int_at_least_0,
    int_at_least_1,
)
from ._io import Terminated, check_output_path, remove_stale_temporaries, sigterm_as_interrupt
from ._numbers import check_count, integer, number, plain_data
from .checkpoint import (
    MODEL_KINDS,
    NonFiniteWeightsError,
    build_model,
    check_model_config,
    load_checkpoint,
    save_checkpoint,
)
from .data import CharTokenizer, TokenDataset
from .neurons import ThresholdError, raise_deferred_errors, value_checks

__all__ = [
    "LoopConfig",
    "Objective",
    "TrainConfig",
    "TrainingDivergedError",
    "add_loop_arguments",
    "check_number",
    "check_windows",
    "evaluate",
    "forward_backward",
    "loop_settings",
    "prepare_output",
    "run_training",
    "train",
]

AMP_MODES = ("auto", "bf16", "off")
ON_NONFINITE = ("stop", "skip")
SHARD_MODES = ("none", "fsdp")
# what may differ between a run and its --resume: nothing that changes the updates (``steps``
# may grow: an extension, whose schedule the saved run fixes, see ``schedule_steps``), except
# where they are computed: ``device`` and ``amp`` change the arithmetic's rounding, not the
# state (bfloat16 autocast keeps float32 weights and optimizer moments and has no GradScaler
# whose state a switch would lose), so a run may move from a GPU to the CPU, or leave bfloat16
# that did not suit it
RESUMABLE_CHANGES = frozenset(
    {"eval_interval", "eval_iters", "device", "amp", "out", "overwrite", "on_nonfinite", "steps",
     "schedule_steps", "shard", "gradient_checkpointing"}
)  # fmt: skip


class TrainingDivergedError(RuntimeError):
    """The loss or the gradient became NaN or inf; the run stopped without saving bad weights."""


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
    overwrite: bool = False  # replace an existing checkpoint at ``out`` with a new run
    on_nonfinite: str = "stop"  # a NaN/inf loss or gradient: 'stop' the run, or 'skip' the step
    # the length of the cosine schedule when it differs from ``steps``: set when a resume
    # extends a finished run (the schedule ends where it ended, then lr stays at min_lr)
    schedule_steps: int | None = None
    # under torchrun: 'none' (DistributedDataParallel, a replica per rank) or 'fsdp' (FSDP2:
    # parameters, gradients and optimizer state sharded across the ranks)
    shard: str = "none"
    # activation checkpointing per layer (the model's gradient_checkpointing_enable()): only
    # each layer's input is kept for the backward, which recomputes the layer; same updates
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        # NumPy's numbers (a sweep's np.arange, np.linspace) are stored as Python's: the config
        # is saved in every checkpoint, which loads with weights_only=True
        for name in ("steps", "batch_size", "L", "eval_interval", "eval_iters"):
            setattr(self, name, check_count(name, getattr(self, name)))
        for name in ("lr", "min_lr", "weight_decay", "grad_clip"):
            setattr(self, name, check_number(name, getattr(self, name)))
        if integer(self.seed) is None:
            raise ValueError(f"seed: expected an int, got {self.seed!r}")
        self.seed = integer(self.seed)
        if self.schedule_steps is not None:
            if integer(self.schedule_steps) is None or self.schedule_steps < 1:
                raise ValueError(f"schedule_steps: expected an int >= 1 or None, got "
                                 f"{self.schedule_steps!r}")  # fmt: skip
            self.schedule_steps = integer(self.schedule_steps)
        for name in ("overwrite", "gradient_checkpointing"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: expected True or False, got {getattr(self, name)!r}")
        if self.data is not None and not isinstance(self.data, str | os.PathLike):
            raise ValueError(f"data: expected a text file or folder path, got {self.data!r}")
        if not (math.isfinite(self.lr) and self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise ValueError(f"lr, min_lr: expected finite 0 <= min_lr <= lr, lr > 0; got "
                             f"{self.lr}, {self.min_lr}")  # fmt: skip
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp: expected one of {AMP_MODES}, got {self.amp!r}")
        self.warmup = check_count("warmup", self.warmup, 0)
        if not self.grad_clip > 0 or not 0 <= self.weight_decay < math.inf:
            raise ValueError(f"grad_clip, weight_decay: expected > 0 and >= 0, got "
                             f"{self.grad_clip}, {self.weight_decay}")  # fmt: skip
        if self.on_nonfinite not in ON_NONFINITE:
            raise ValueError(
                f"on_nonfinite: expected one of {ON_NONFINITE}, got {self.on_nonfinite!r}"
            )
        if self.shard not in SHARD_MODES:
            raise ValueError(f"shard: expected one of {SHARD_MODES}, got {self.shard!r}")
        if not isinstance(self.out, str | os.PathLike) or not str(self.out):
            raise ValueError(f"out: expected a file path, got {self.out!r}")
        self.device = check_device(self.device, name="device")


@dataclass
class TrainConfig(LoopConfig):
    model: str = "mar"  # 'mar' (spiking), 'mar-dense' or 'transformer'
    model_config: dict[str, Any] = field(default_factory=dict)  # overrides of the model config

    def __post_init__(self) -> None:
        if self.model not in MODEL_KINDS:
            raise ValueError(f"model: expected one of {MODEL_KINDS}, got {self.model!r}")
        check_model_config(self.model, self.model_config, name="model_config")
        self.model_config = plain_data(self.model_config)  # saved with the run, as the rest
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


def check_number(name: str, value: Any) -> int | float:
    """``value`` as the Python number it is (an int stays an int, NumPy's reals as Python's);
    a setting that is not a real number (a str, a bool, None) refused, naming it. An int is
    kept as an int so that a config and its messages read as typed (``weight_decay=0``, not
    0.0), as they did before NumPy's numbers were accepted."""
    converted = number(value)
    if converted is None:
        raise ValueError(f"{name}: expected a number, got {value!r}")
    return converted


def add_loop_arguments(parser: argparse.ArgumentParser, *, out: str) -> None:
    """The command-line options of :class:`LoopConfig`, shared by ``train`` and ``distill``;
    :func:`loop_settings` turns the parsed ones back into its keyword arguments."""
    p = parser
    p.add_argument("--data", default=None,
                   help="a UTF-8 text file, a .jsonl (a 'text' field per line) or a folder "
                        "of both (default: Tiny Shakespeare from the shared data folder, or "
                        "$SPIKEMAR_DATA)")  # fmt: skip
    p.add_argument("--out", default=out, help="checkpoint path")
    p.add_argument("--resume", action="store_true",
                   help="continue the run saved at --out; a larger --steps extends it")  # fmt: skip
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing checkpoint at --out with a new run")  # fmt: skip
    p.add_argument("--steps", type=int_at_least_1, default=2000, help="optimizer steps")
    p.add_argument("--batch-size", type=int_at_least_1, default=12,
                   help="the global batch (split across ranks under torchrun)")  # fmt: skip
    p.add_argument("--L", type=int_at_least_1, default=64, help="tokens per training window")
    p.add_argument("--lr", type=finite_positive_float, default=1e-3,
                   help="peak learning rate; cosine down to lr/10")  # fmt: skip
    p.add_argument("--warmup", type=int_at_least_0, default=100, help="steps of linear warm-up")
    p.add_argument("--eval-interval", type=int_at_least_1, default=250,
                   help="steps between validations (each writes the checkpoint)")  # fmt: skip
    p.add_argument("--eval-iters", type=int_at_least_1, default=20,
                   help="batches per validation")  # fmt: skip
    p.add_argument("--seed", type=int, default=1337, help="seed of the weights and batches")
    p.add_argument("--device", type=device_argument, default="cpu",
                   help="cpu, cuda or cuda:N (checked when given)")  # fmt: skip
    p.add_argument("--amp", choices=AMP_MODES, default="auto",
                   help="bfloat16 autocast ('auto': on CUDA devices that have it); a --resume "
                        "may change it, as it may --device: the weights and optimizer state "
                        "are float32 either way (bfloat16 needs no loss scaler), and the run "
                        "continues in the new precision")  # fmt: skip
    p.add_argument("--on-nonfinite", choices=ON_NONFINITE, default="stop",
                   help="a NaN or inf loss or gradient: stop the run (exit 1), or skip that "
                        "update and count it")  # fmt: skip
    p.add_argument("--shard", choices=SHARD_MODES, default="none",
                   help="under torchrun: 'none' replicates the model on every rank (DDP); "
                        "'fsdp' shards parameters, gradients and optimizer state (FSDP2) "
                        "for models that do not fit one device")  # fmt: skip
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="activation checkpointing per layer: keep only each layer's input for "
                        "the backward, which recomputes the layer (less memory for long --L, "
                        "the same updates, about one more forward per step)")  # fmt: skip
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar; print the settings, validations and result")  # fmt: skip


def loop_settings(args: argparse.Namespace) -> dict[str, Any]:
    """:class:`LoopConfig`'s keyword arguments from options declared by
    :func:`add_loop_arguments`."""
    return {
        "data": args.data, "out": args.out, "steps": args.steps, "batch_size": args.batch_size,
        "L": args.L, "lr": args.lr, "min_lr": args.lr / 10, "warmup": args.warmup,
        "eval_interval": args.eval_interval, "eval_iters": args.eval_iters, "seed": args.seed,
        "device": args.device, "amp": args.amp, "overwrite": args.overwrite,
        "on_nonfinite": args.on_nonfinite, "shard": args.shard,
        "gradient_checkpointing": args.gradient_checkpointing,
    }  # fmt: skip


def lr_factor(step: int, config: LoopConfig) -> float:
    """Multiplier of ``lr`` at ``step``: linear warm-up, then cosine down to ``min_lr`` at
    ``schedule_steps`` (``steps`` unless a resume extended the run), then ``min_lr``."""
    if step < config.warmup:
        return (step + 1) / config.warmup
    end = config.schedule_steps or config.steps
    progress = min(1.0, (step - config.warmup) / max(1, end - config.warmup))
    floor = config.min_lr / config.lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def _optimizer_groups(module: nn.Module) -> list[list[tuple[str, nn.Parameter]]]:
    """The trained parameters with their names: matrices (weight decay), then the rest."""
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    return [[(n, p) for n, p in named if p.dim() >= 2], [(n, p) for n, p in named if p.dim() < 2]]


def make_optimizer(module: nn.Module, config: LoopConfig) -> torch.optim.Optimizer:
    decay, no_decay = ([p for _, p in group] for group in _optimizer_groups(module))
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]  # fmt: skip
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.99))


def _optimizer_state_by_name(saved: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """An optimizer state dict keyed by parameter names (the form FSDP2's full state dicts
    take), from either form: ``optimizer.state_dict()``'s positions (0, 1, ... over the groups
    in order, as :func:`make_optimizer` builds them, ``names`` in that order) or names already."""
    ids = [i for g in saved["param_groups"] for i in g["params"]]
    if all(isinstance(i, str) for i in ids):
        return saved
    if sorted(ids) != list(range(len(names))):
        raise ValueError(f"resume: the saved optimizer holds {len(ids)} parameters, the model "
                         f"trains {len(names)}")  # fmt: skip
    return {
        "state": {names[i]: v for i, v in saved["state"].items()},
        "param_groups": [{**g, "params": [names[i] for i in g["params"]]}
                         for g in saved["param_groups"]],
    }  # fmt: skip


def _shard_fsdp(objective: Objective) -> None:
    """FSDP2 over ``objective``: one shard group per layer of its model, the other trained
    parameters in the root group; untrained ones (a teacher) left whole on every rank."""
    from torch.distributed.fsdp import fully_shard

    model = objective.model
    layers = getattr(model, "layers", None) or getattr(model, "blocks", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"shard: FSDP needs a model with a list of layers; "
                         f"{type(model).__name__} has none")  # fmt: skip
    in_layers = {id(p) for p in layers.parameters()}
    for layer in layers:
        fully_shard(layer)
    frozen = {p for p in objective.parameters() if not p.requires_grad and id(p) not in in_layers}
    fully_shard(objective, ignored_params=frozen or None)


def _gathered(tree: Any, keep: bool) -> Any:
    """``tree`` (nested dicts/lists of tensors) with every sharded DTensor gathered whole (one
    at a time, on its device) and, where ``keep`` (rank 0: the writer), copied to the CPU, else
    dropped (None). A collective: every rank calls it in the same order."""
    from torch.distributed.tensor import DTensor

    if isinstance(tree, DTensor):
        full = tree.full_tensor()
        return full.cpu() if keep else None
    if isinstance(tree, dict):
        return {k: _gathered(v, keep) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(_gathered(v, keep) for v in tree)
    return tree


def _to_device(t: torch.Tensor, device: str | torch.device) -> torch.Tensor:
    """A CPU batch on ``device``: to CUDA through pinned memory without waiting (a copy
    from pageable memory waits for the stream to drain: a host sync per step)."""
    if torch.device(device).type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _all_finite(params: list[torch.Tensor], sharded: bool) -> bool:
    """Whether every trained weight is finite (on every rank's shard when sharded)."""
    ok = all(bool(torch.isfinite(_local(p)).all()) for p in params)
    if sharded:
        flag = torch.tensor([int(ok)])
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        ok = bool(flag.item())
    return ok


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
    cuda = torch.device(device).type == "cuda"
    # on CUDA the spike points' value checks are read once per evaluation, not once per call
    with value_checks("deferred") if cuda else contextlib.nullcontext():
        for split in ("train", "val"):
            gen = torch.Generator().manual_seed(config.seed + 1)  # the same batches every time
            # summed on the device (no read per batch), in float64 as Python's floats were
            total = torch.zeros((), dtype=torch.float64, device=device)
            for _ in range(config.eval_iters):
                x, y = data.batch(split, config.batch_size, config.L, generator=gen)
                logits = model(x.to(device))
                total += F.cross_entropy(logits.flatten(0, 1), y.to(device).flatten()).double()
            losses[split] = total.item() / config.eval_iters
    if cuda:
        raise_deferred_errors()
    model.train(was_training)
    return losses


def _rng_state(gen: torch.Generator) -> dict[str, Any]:
    return {"batches": gen.get_state(), "torch": torch.get_rng_state()}


@contextlib.contextmanager
def _sigint_deferred():
    """Hold a Ctrl-C (or SIGTERM) back until the block ends (then raise it), so that an
    interrupt never lands inside an optimizer update and leaves some parameters updated and
    others not."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: received.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}  # fmt: skip
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        raise Terminated if received[0] == signal.SIGTERM else KeyboardInterrupt


def check_resume_config(saved: dict[str, Any], config: LoopConfig) -> None:
    """A resumed run must make the same updates: only :data:`RESUMABLE_CHANGES` may differ."""
    current = asdict(config)
    # a setting added to the configuration after the run was saved ran at its default
    defaults = {f.name: f.default for f in fields(config) if f.default is not MISSING}
    saved = {**{k: v for k, v in defaults.items() if k not in saved}, **saved}
    if current["steps"] < saved["steps"]:
        raise ValueError(f"steps: the run was started for {saved['steps']} steps; resume it with "
                         f"--steps {saved['steps']} or more (more extends it)")  # fmt: skip
    changed = sorted(k for k in current.keys() | saved.keys()
                     if k not in RESUMABLE_CHANGES
                     and not _same_setting(current.get(k), saved.get(k)))  # fmt: skip
    if changed:
        details = ", ".join(f"{k}: saved {saved.get(k)!r}, now {current.get(k)!r}" for k in changed)
        raise ValueError(f"resume: the run was started with other settings ({details}); resume "
                         "with the same ones, or start a new run with another --out")  # fmt: skip


def _same_setting(a: Any, b: Any) -> bool:
    """Equal, or two names of one existing file or folder (``data``, ``teacher``, ``student``,
    ``tokenizer`` given once relative and once absolute, or through a link)."""
    if a == b:
        return True
    if isinstance(a, str) and isinstance(b, str) and a and b:
        pa, pb = Path(a), Path(b)
        return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()
    return False


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


def prepare_output(config: LoopConfig, *, resume: bool) -> Path:
    """Check ``config.out`` before any work: a writable file path (its folder created), not an
    existing checkpoint unless ``resume`` or ``config.overwrite``; remove the temporaries of a
    save that a killed run left there. Call it first; :func:`run_training` calls it too."""
    out = check_output_path(config.out, name="out")
    removed = remove_stale_temporaries(out)
    if removed and _rank() == 0:
        print(f"removed {len(removed)} temporary file(s) of an interrupted save of {out}")
    if resume:
        if not out.is_file():
            raise FileNotFoundError(f"resume: no checkpoint at {out} to resume from")
    elif out.exists() and not config.overwrite:
        raise FileExistsError(
            f"out: {out} already exists; continue that run with --resume (a larger --steps "
            "extends it), or replace it with --overwrite"
        )
    return out


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def read_resume_state(out: Path, tokenizer: CharTokenizer, device: str):
    """The model and training state saved at ``out``, checked against the data's vocabulary."""
    if not out.is_file():
        raise FileNotFoundError(f"resume: no checkpoint at {out} to resume from")
    model, saved_tokenizer, payload = load_checkpoint(out, map_location=device, name="resume")
    if "train" not in payload:
        raise ValueError(f"resume: {out} holds no training state (a final export?)")
    if saved_tokenizer != tokenizer:
        raise ValueError("resume: the checkpoint's vocabulary differs from the data's")
    return model, payload["train"]


def _resumed_config(config: LoopConfig, saved: dict[str, Any]) -> LoopConfig:
    """``config`` with the saved run's schedule: an extension (more steps than the saved run's)
    keeps the cosine that the run started with, so its learning rate continues smoothly."""
    schedule = saved.get("schedule_steps") or saved["steps"]
    return replace(config, schedule_steps=None if schedule == config.steps else schedule)


class _Progress:
    """What a run shows while it trains: a tqdm bar on a terminal; on a redirected stream
    (a log file, CI) plain lines every tenth of the run instead of carriage returns; with
    ``enabled=False`` only the lines the loop writes (validations, the result)."""

    def __init__(self, start: int, total: int, desc: str, enabled: bool) -> None:
        self.desc, self.total = desc, total
        self.bar = None
        self.plain_every = 0
        if enabled and sys.stderr.isatty():
            self.bar = tqdm(range(start, total), initial=start, total=total, desc=desc,
                            unit="step")  # fmt: skip
        elif enabled:
            self.plain_every = max(1, (total - start) // 10)

    def update(self, done: int, shown: dict[str, str]) -> None:
        if self.bar is not None:
            if shown:
                self.bar.set_postfix(**shown)
            self.bar.update(1)
        elif self.plain_every and done % self.plain_every == 0 and done < self.total:
            details = ", ".join(f"{k} {v}" for k, v in shown.items())
            print(f"{self.desc}: step {done}/{self.total}: {details}", flush=True)

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _summary(config: LoopConfig, objective: Objective, desc: str, start: int, world: int,
             device: str) -> str:  # fmt: skip
    n_params = sum(p.numel() for p in objective.model.parameters())
    data = config.data or "Tiny Shakespeare (default)"
    parts = [
        f"{desc}: {n_params / 1e6:.2f} M parameters",
        f"steps {start}→{config.steps}" if start else f"{config.steps} steps",
        f"batch {config.batch_size} × {config.L} tokens" + (
            f" over {world} ranks{' (FSDP2 shards)' if config.shard == 'fsdp' else ''}"
            if world > 1 else " in one process, unsharded (--shard fsdp shards under torchrun)"
            if config.shard == "fsdp" else ""),
        f"lr {config.lr:g} → {config.min_lr:g} (warm-up {config.warmup})",
        f"validation every {config.eval_interval} steps",
        f"device {device}",
        f"data {data}",
        f"checkpoint {config.out}",
    ]  # fmt: skip
    return "; ".join(parts)


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
    state) or from the start; returns the history, the best validation loss, the number of
    skipped (non-finite) steps and the path. Raises :class:`TrainingDivergedError` when the
    loss or gradient turns NaN or inf (``on_nonfinite='stop'``), keeping the last good
    checkpoint."""
    rank, world, device = distributed_setup(config.device)
    if config.batch_size % world:
        raise ValueError(
            f"batch_size: the global batch {config.batch_size} must divide among {world} ranks"
        )
    out = prepare_output(config, resume=state is not None)
    check_windows(data, config.L)
    if state is not None:
        check_resume_config(state["config"], config)
        config = _resumed_config(config, state["config"])
        saved_data, data_now = state.get("data_digest"), data.meta.get("sha256_16")
        if saved_data is not None and data_now is not None and saved_data != data_now:
            raise ValueError(
                f"resume: the training data changed since the run was saved (its corpus and "
                f"tokenizer hashed {saved_data}, now {data_now}): a resume would not continue "
                "the same run; resume with the same data, or start a new run with another --out"
            )
    model = objective.model
    if config.gradient_checkpointing:
        if not hasattr(model, "gradient_checkpointing_enable"):
            raise ValueError(f"gradient_checkpointing: {type(model).__name__} has no "
                             "gradient_checkpointing_enable()")  # fmt: skip
        model.gradient_checkpointing_enable()
    objective.to(device).train()
    sharded = world > 1 and config.shard == "fsdp"
    names = [n for group in _optimizer_groups(objective) for n, _ in group]
    if state is not None:
        objective.load_extra(state.get("objective", {}))  # before sharding: whole tensors
    if sharded:
        _shard_fsdp(objective)
    optimizer = make_optimizer(objective, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config))
    gen = torch.Generator().manual_seed(config.seed)
    start, history, best, skipped = 0, [], math.inf, 0
    saved_at: int | None = None  # the step of the last checkpoint this run wrote
    if state is not None:
        saved_optimizer = state["optimizer"]
        if sharded or not all(isinstance(k, int) for k in saved_optimizer["state"]):
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_optimizer_state_dict,
            )

            set_optimizer_state_dict(objective, optimizer,
                                     _optimizer_state_by_name(saved_optimizer, names),
                                     options=StateDictOptions(full_state_dict=True))  # fmt: skip
        else:
            optimizer.load_state_dict(saved_optimizer)
        scheduler.load_state_dict(state["scheduler"])
        gen.set_state(state["rng"]["batches"].cpu())
        torch.set_rng_state(state["rng"]["torch"].cpu())
        start, history, best = state["step"], state["history"], state["best_val"]
        skipped, saved_at = state.get("skipped", 0), state["step"]
    stepper: nn.Module = objective
    if world > 1 and not sharded:
        stepper = nn.parallel.DistributedDataParallel(
            objective, broadcast_buffers=False,
            find_unused_parameters=objective.find_unused_parameters,
        )  # fmt: skip
    trained = [p for p in objective.parameters() if p.requires_grad]
    share = slice(rank * config.batch_size // world, (rank + 1) * config.batch_size // world)

    def checkpoint(step: int, validation_pending: bool = False) -> None:
        nonlocal saved_at
        model_state = None
        if sharded:  # every rank takes part in gathering the full state; rank 0 writes it
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_optimizer_state_dict,
            )

            model_state = _gathered(model.state_dict(), keep=rank == 0)
            extra = _gathered(objective.extra_state(), keep=rank == 0)
            optimizer_state = get_optimizer_state_dict(
                objective, optimizer, options=StateDictOptions(full_state_dict=True,
                                                               cpu_offload=True))  # fmt: skip
        if rank != 0:
            return
        if not sharded:
            extra, optimizer_state = objective.extra_state(), optimizer.state_dict()
        train_state = {
            "step": step, "optimizer": optimizer_state,
            "scheduler": scheduler.state_dict(), "rng": _rng_state(gen),
            "config": asdict(config), "history": history, "best_val": best,
            "skipped": skipped, "objective": extra, **(checkpoint_info or {}),
            "data_digest": data.meta.get("sha256_16"),
        }  # fmt: skip
        if validation_pending:  # interrupted in the validation at ``step``: a resume runs it
            train_state["validation_pending"] = True
        try:
            save_checkpoint(out, model, data.tokenizer, train_state, model_state=model_state)
        except NonFiniteWeightsError:
            raise diverged(step, "the weights hold NaN or inf") from None
        saved_at = step

    def diverged(step: int, what: str, skippable: bool = True) -> TrainingDivergedError:
        kept = (f"the last good checkpoint, {out} at step {saved_at}, is kept"
                if saved_at is not None else
                f"this run saved nothing to {out} (a file there is left as it was)")  # fmt: skip
        hint = (", or skip such steps (--on-nonfinite skip)"
                if skippable and config.on_nonfinite == "stop" else "")  # fmt: skip
        return TrainingDivergedError(
            f"step {step}: {what}: training diverged and stopped; {kept}. Lower --lr (now "
            f"{config.lr:g}) or raise --warmup{hint}"
        )

    if rank == 0:
        print(_summary(config, objective, desc, start, world, device), flush=True)
        if state is not None:
            extended = (f"; extended from {config.schedule_steps} steps, lr at min_lr "
                        f"{config.min_lr:g} after step {config.schedule_steps}"
                        if config.schedule_steps else "")  # fmt: skip
            best_yet = f"best validation loss {best:.4f}" if history else "not validated yet"
            saved_amp = state["config"].get("amp", "auto")
            amp = (f"; --amp {config.amp} from here on (the run so far: --amp {saved_amp})"
                   if saved_amp != config.amp else "")  # fmt: skip
            print(f"resumed {out} at step {start} of {config.steps} ({best_yet}){extended}{amp}",
                  flush=True)  # fmt: skip

    def validate(at: int) -> None:
        """Validate after step ``at`` and write the checkpoint."""
        nonlocal best, phase
        phase = "validating"
        if rank == 0 or sharded:  # a sharded forward needs every rank
            losses = _evaluate(model, objective, data, config, device, sharded)
            if not math.isfinite(losses["val"]):
                raise diverged(at, f"the validation loss is {losses['val']}")
            best = min(best, losses["val"])
            history.append({"step": at, **losses})
            phase = "saving"  # an interrupt from here on must not validate this step again
            if rank == 0:
                bar.write(f"step {at}: train {losses['train']:.4f}, val {losses['val']:.4f}"
                          + (f" ({skipped} non-finite steps skipped)" if skipped
                             else ""))  # fmt: skip
            checkpoint(at)
        if world > 1:
            dist.barrier()
        phase = "between steps"

    bar = _Progress(start, config.steps, desc, progress and rank == 0)
    done, tokens_seen, t0 = start, 0, time.perf_counter()  # done: steps fully applied
    phase, rng_before, sched_before = "between steps", None, None
    try:
        with sigterm_as_interrupt():
            if state is not None and state.get("validation_pending"):
                validate(start)  # the validation that an interrupt stopped
            for step in range(start, config.steps):
                rng_before, sched_before, phase = _rng_state(gen), scheduler.last_epoch, "computing"
                objective.begin_step(step)
                x, y = data.batch("train", config.batch_size, config.L, generator=gen)
                optimizer.zero_grad(set_to_none=True)
                xs, ys = _to_device(x[share], device), _to_device(y[share], device)
                loss, terms = forward_backward(stepper, xs, ys, autocast(config, device))
                # the gradient norm is all-reduced, so every rank takes the same decision
                norm = nn.utils.clip_grad_norm_(trained, config.grad_clip)
                # one read of both (a host sync on CUDA: the step's decision needs them)
                loss_value, norm_value = torch.stack(
                    [loss.detach().double(), _local(norm).detach().double().to(loss.device)]
                ).tolist()
                finite = math.isfinite(loss_value) and math.isfinite(norm_value)
                if not finite:
                    what = (f"the loss is {loss_value}" if not math.isfinite(loss_value)
                            else f"the gradient norm is {norm_value}")  # fmt: skip
                    weights_ok = _all_finite(trained, sharded)
                    if config.on_nonfinite == "stop" or not weights_ok:
                        raise diverged(step + 1, what)
                    optimizer.zero_grad(set_to_none=True)
                    skipped += 1
                with _sigint_deferred():
                    if finite:
                        optimizer.step()
                    phase = "updated"
                    scheduler.step()
                    done, phase = step + 1, "between steps"
                tokens_seen += x.numel()
                if rank == 0 and (step % 10 == 0 or bar.plain_every):
                    rate = tokens_seen / (time.perf_counter() - t0)
                    shown = {k: f"{v.item():.3f}" for k, v in terms.items()}
                    shown["tok_s"] = f"{rate:,.0f}"
                    if skipped:
                        shown["skipped"] = str(skipped)
                    bar.update(done, shown)
                elif rank == 0:
                    bar.update(done, {})
                if done % config.eval_interval == 0 or done == config.steps:
                    validate(done)
    except ValueError as err:
        at = done + 1 if phase == "computing" else done
        if isinstance(err.__cause__, ThresholdError):
            # an update made a spike threshold V = exp(a) infinite or zero (``a`` itself
            # finite): the run diverged, and the next forward would fail the same way (skipping
            # cannot help)
            raise diverged(at, str(err), False) from None
        if phase in ("computing", "validating") and done > start:
            # a forward on the same shapes passed before this run's last update, so what the
            # forward's value checks refuse now (the SSM's decay ``a`` = NaN from weights that
            # overflowed) comes from the updates: the run diverged; the input was not at fault
            raise diverged(at, f"the weights diverged ({' '.join(str(err).split())})",
                           False) from None  # fmt: skip
        raise
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
        try:
            checkpoint(done, validation_pending=phase == "validating")
        except TrainingDivergedError as err:
            bar.write(f"interrupted: not saved ({err})")
            raise
        if rank == 0:
            signal_name = "SIGTERM" if isinstance(sys.exc_info()[1], Terminated) else "interrupted"
            bar.write(f"{signal_name}: saved {out} at step {done}; continue with --resume")
        raise
    finally:
        bar.close()
    return {"history": history, "best_val": best, "checkpoint": str(out), "skipped": skipped}


def forward_backward(
    stepper: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    amp: contextlib.AbstractContextManager | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One step's forward (under ``amp``) and backward: ``stepper(x, y)`` → ``(loss, terms)``.

    On CUDA inputs the neurons' value checks (NaN/inf input, a bad threshold) are deferred
    (:func:`spikemar.neurons.value_checks`): a flag on the device instead of a host sync at
    every spike point, read once here after the backward, which raises as the eager check
    would have (a ValueError naming what was wrong)."""
    cuda = x.is_cuda
    with value_checks("deferred") if cuda else contextlib.nullcontext():
        with amp if amp is not None else contextlib.nullcontext():
            loss, terms = stepper(x, y)
        loss.backward()
    if cuda:
        raise_deferred_errors()
    return loss, terms


def _evaluate(model: nn.Module, objective: nn.Module, data: TokenDataset, config: LoopConfig,
              device: str, sharded: bool) -> dict[str, float]:  # fmt: skip
    """:func:`evaluate` on the model; when sharded, the root group (embedding, head) is gathered
    around it, since the model is called outside the root's own forward."""
    if not sharded:
        return evaluate(model, data, config, device)
    objective.unshard()
    try:
        return evaluate(model, data, config, device)
    finally:
        objective.reshard()


def _load_data(config: LoopConfig) -> TokenDataset:
    return TokenDataset.from_text_file(config.data)


def check_windows(data: TokenDataset, L: int) -> None:
    """Refuse a window of ``L`` tokens that a split of ``data`` is too short for, before any
    training (not at the first validation, an ``eval_interval`` of steps later)."""
    for split, tokens in data.splits.items():
        if len(tokens) < L + 1:
            raise ValueError(f"L: {L} + 1 tokens exceed the {len(tokens)} of the {split!r} "
                             "split of the data; use a smaller L or more text")  # fmt: skip


def train(config: TrainConfig, *, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train ``config.model`` on ``config.data``; returns the final losses and the history."""
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config: expected a TrainConfig, got {type(config).__name__}")
    prepare_output(config, resume=resume)  # before the data and the model: fail early
    data = _load_data(config)
    check_windows(data, config.L)
    torch.manual_seed(config.seed)
    _, _, device = distributed_setup(config.device)
    state = None
    if resume:
        model, state = read_resume_state(Path(config.out), data.tokenizer, device)
        if state.get("distill"):
            raise ValueError(f"resume: {config.out} holds a run of spikemar distill (stage "
                             f"{state['distill'].get('stage')}), not of spikemar train; resume "
                             "it with spikemar distill")  # fmt: skip
    else:
        model_config = {"vocab_size": data.vocab_size, **config.model_config}
        if config.model == "transformer":
            model_config.setdefault("max_len", config.L)
        model = build_model(config.model, model_config)
    return run_training(config, Objective(model), data, state=state,
                        desc=f"train {config.model}", progress=progress)  # fmt: skip
