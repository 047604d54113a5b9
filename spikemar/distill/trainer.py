"""The distillation trainer: MAR's two stages on the loop of :mod:`spikemar.training`.

**Stage 1** (attention → SSM): a Transformer teacher (a spikemar checkpoint, or a local Hugging
Face causal LM) teaches a dense SSM student (``mar-dense``); so does a dense MAR hybrid with
attention layers, whose student is its own architecture with SSMs in place of attention (the
stage-1 student that ``spikemar refine --stage1`` reads). A teacher without attention (a dense
SSM, a Mamba-2 or Llamba directory) is refused: there is nothing to replace, and its student
would be its copy; it is stage 2's teacher. MOHAWK-like, in two phases:

1. *Weight transfer* (spikemar teachers): every student tensor with a same-named, same-shaped
   teacher tensor is copied (embedding, norms, FFNs, head; ``blocks.j`` ↔ ``layers.j``). Mixers
   that replace attention start fresh (a hybrid's SSM layers keep theirs); so does everything
   under a Hugging Face teacher (its names differ).
2. *Hidden-state alignment* (the first ``align_steps`` steps): each student layer j is fed the
   teacher's residual stream entering layer j and trained to produce the teacher's stream
   entering layer j+1 (teacher forcing, so all layers learn at once and errors do not compound):
   ``mean_j ‖layer_j(h^T_j) − h^T_{j+1}‖₂``, averaged over positions.
3. *Distillation* (the remaining steps): the SBDS loss on the student's own forward pass.

**Stage 2** (dense → spiking): a dense teacher (normally the stage-1 student) teaches a spiking
MAR student with the same architecture, initialised from the teacher's weights (only the spike
thresholds are new), with the SBDS loss: ``alpha·KL(p‖q) + beta·KL(q‖p)`` on logits plus the
pre-norm (or post-norm) feature term, normalised as in :mod:`spikemar.distill.losses`.

``ce`` adds ``ce · cross-entropy`` on the data's next tokens to either stage (0 by default, as in
the paper). Checkpoints hold the student (a normal spikemar checkpoint: ``spikemar generate``
and ``energy`` read it) plus the distillation state, so ``resume=True`` continues exactly (with
the same configuration, the teacher's path and weights included: anything that would change the
updates is refused; ``spikemar train --resume`` refuses it as another command's run). The
teacher runs in float32 even under autocast, so its logits are not rounded to bfloat16 before the
KL.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._argtypes import check_device
from .._numbers import integer, plain_data
from ..checkpoint import (
    build_model,
    check_model_config,
    dense_twin,
    load_checkpoint,
    model_config_dict,
)
from ..convert import spike_point_state_names
from ..data import TokenDataset
from ..models import MARLM, TransformerLM, from_pretrained
from ..models.hub import is_hub_id, read_pretrained_config, resolve_pretrained, tokenizer_from
from ..models.pretrained import config_from_hf, is_pretrained_config
from ..tokenizer import CharTokenizer, HFTokenizer
from ..training import (
    LoopConfig,
    Objective,
    check_number,
    check_windows,
    distributed_setup,
    evaluate,
    prepare_output,
    read_resume_state,
    run_training,
)
from .losses import FeatureProjection, sbds_loss

__all__ = ["DistillConfig", "DistillObjective", "Teacher", "distill", "transfer_weights"]

FEATURES = ("prenorm", "postnorm", None)


TEACHER_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class DistillConfig(LoopConfig):
    stage: int = 2
    teacher: str = ""  # a spikemar checkpoint, or a Hugging Face model directory
    student_config: dict[str, Any] = field(default_factory=dict)  # overrides of the student's
    alpha: float = 0.2  # forward KL(teacher ‖ student)
    beta: float = 0.7  # reverse KL(student ‖ teacher)
    temperature: float = 1.0
    feature: str | None = "prenorm"  # 'prenorm', 'postnorm' or None
    gamma: float = 1.0  # weight of the feature term
    ce: float = 0.0  # weight of the plain next-token cross-entropy
    align_steps: int | None = None  # stage 1: hidden-state alignment steps; None: steps // 4
    init_from_teacher: bool = True
    student: str | None = None  # stage 2: start from this spiking checkpoint (spikemar convert)
    # the teacher's tokenizer where its directory ships none (state-spaces/mamba2-130m): a
    # directory, a tokenizer.json or a Hub id; None: the teacher's own
    tokenizer: str | None = None
    # the frozen teacher's weights and arithmetic: 'float32', or 'bfloat16'/'float16' (half the
    # memory of a large teacher; its logits and states reach the loss in float32)
    teacher_dtype: str = "float32"
    out: str = "runs/student.pt"

    def __post_init__(self) -> None:
        super().__post_init__()
        if integer(self.stage) not in (1, 2):
            raise ValueError(f"stage: expected 1 (attention → SSM) or 2 (dense → spiking), "
                             f"got {self.stage!r}")  # fmt: skip
        self.stage = integer(self.stage)  # NumPy's as Python's, as LoopConfig stores its own
        for name in ("teacher", "student", "tokenizer"):
            value = getattr(self, name)
            if not (value is None and name != "teacher") and not (
                isinstance(value, str | os.PathLike) and str(value)
            ):
                raise ValueError(f"{name}: expected a checkpoint path, a model directory or a "
                                 f"Hub id, got {value!r}")  # fmt: skip
        for name in ("alpha", "beta", "gamma", "ce", "temperature"):
            setattr(self, name, check_number(name, getattr(self, name)))
        finite = (self.alpha, self.beta, self.gamma, self.ce, self.temperature)
        if min(finite) < 0 or not self.temperature > 0 or not all(map(math.isfinite, finite)):
            raise ValueError(
                f"alpha, beta, gamma, ce, temperature: expected finite, >= 0 and temperature "
                f"> 0; got {self.alpha}, {self.beta}, {self.gamma}, {self.ce}, {self.temperature}"
            )
        if not isinstance(self.init_from_teacher, bool):
            raise ValueError(f"init_from_teacher: expected True or False, got "
                             f"{self.init_from_teacher!r}")  # fmt: skip
        kind = "mar" if self.stage == 2 else "mar-dense"
        check_model_config(kind, self.student_config, name="student_config")
        self.student_config = plain_data(self.student_config)  # saved with the run
        if "vocab_size" in self.student_config:
            raise ValueError(f"student_config: vocab_size {self.student_config['vocab_size']!r}: "
                             "the student's vocabulary is the teacher's (SBDS compares their "
                             "distributions token by token)")  # fmt: skip
        if self.stage == 1 and self.student_config.get("spikes"):
            raise ValueError("student_config: spikes: stage 1's student is dense (spikes are "
                             "stage 2's)")  # fmt: skip
        if self.align_steps is not None:
            if integer(self.align_steps) is None:
                raise ValueError(f"align_steps: expected an int or None, got "
                                 f"{self.align_steps!r}")  # fmt: skip
            self.align_steps = integer(self.align_steps)
        if self.feature not in FEATURES:
            raise ValueError(f"feature: expected one of {FEATURES}, got {self.feature!r}")
        if self.alpha == self.beta == self.ce == 0 and (self.feature is None or self.gamma == 0):
            raise ValueError("alpha, beta, ce, feature, gamma: every loss term is switched off")
        if Path(self.out).resolve() == Path(self.teacher).resolve():
            raise ValueError(f"out: {self.out} is the teacher's checkpoint; the student would "
                             "overwrite its teacher")  # fmt: skip
        if self.teacher_dtype not in TEACHER_DTYPES:
            raise ValueError(f"teacher_dtype: expected one of {TEACHER_DTYPES}, got "
                             f"{self.teacher_dtype!r}")  # fmt: skip
        if self.align_steps is None:
            self.align_steps = self.steps // 4 if self.stage == 1 else 0
        if self.align_steps < 0 or self.align_steps > self.steps:
            raise ValueError(f"align_steps: expected 0 ... steps ({self.steps}), "
                             f"got {self.align_steps}")  # fmt: skip
        if self.stage == 2 and self.align_steps:
            raise ValueError("align_steps: hidden-state alignment belongs to stage 1")
        if self.student is not None:
            if self.stage != 2:
                raise ValueError("student: a converted student is trained in stage 2")
            if self.student_config:
                raise ValueError(f"student_config: {self.student} already fixes the student's "
                                 f"architecture; got overrides {self.student_config}")  # fmt: skip


class Teacher(nn.Module):
    """A frozen teacher. ``teacher(tokens)`` → logits; ``teacher.stream(tokens)`` → ``(logits,
    states)``: the residual stream entering each layer j (state j, the pre-norm input of layer
    j) and leaving the last one (state n_layers), n_layers + 1 states for every kind of teacher.

    For Hugging Face models the states are taken by hooks on the decoder's layers themselves
    (each layer's input, and the last layer's output), never from ``output_hidden_states``,
    whose convention differs between architectures: transformers' Llama returns the embedding
    at ``hidden_states[0]`` and the *final-normed* stream last, but its Mamba-2 returns layer 0's
    *output* at ``hidden_states[0]`` (the embedding is not in the tuple) and the final-normed
    stream last; Cartesia's Llamba returns the embedding at index 0 and no final norm. A
    Hugging Face Mamba-2 or Llamba directory is read into spikemar's own model
    (:func:`spikemar.models.from_pretrained`), whose ``return_hidden`` states are the layers'
    inputs by construction (``hidden[j]`` enters layer j)."""

    def __init__(self, model: nn.Module, source: str, tokenizer=None) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.source, self.tokenizer = source, tokenizer
        self.hf = not isinstance(model, MARLM | TransformerLM)
        if self.hf:
            c = model.config
            self.vocab_size, self.n_layers, self.width = (c.vocab_size, c.num_hidden_layers,
                                                          c.hidden_size)  # fmt: skip
            self.max_len = getattr(c, "max_position_embeddings", None)
        else:
            c = model.config
            self.vocab_size, self.n_layers, self.width = c.vocab_size, c.n_layers, c.d_model
            self.max_len = c.max_len if isinstance(model, TransformerLM) else None

    @classmethod
    def load(cls, path: str, device: str = "cpu", tokenizer: str | None = None,
             dtype: str | torch.dtype | None = None) -> Teacher:  # fmt: skip
        """A spikemar checkpoint file, a local Hugging Face model directory, or a Hub id
        (``owner/name``, fetched through :func:`spikemar.models.hub.resolve_pretrained` where
        there is a network, else one clear error): a Mamba-2 or Llamba directory becomes
        spikemar's dense model with the directory's tokenizer; any other architecture goes
        through transformers' ``AutoModelForCausalLM``, with the directory's tokenizer when it
        has one. ``tokenizer``: take the tokenizer from this directory, ``tokenizer.json`` or
        Hub id instead (a checkpoint that ships none). ``dtype`` (``'bfloat16'``, a
        ``torch.dtype``; None keeps the weights' own): the teacher is cast on the CPU before it
        moves to ``device`` (see :meth:`place`)."""
        if not isinstance(path, str | os.PathLike):
            raise TypeError(f"teacher: expected a path or Hub id, got {type(path).__name__}")
        dtype = _teacher_dtype(dtype)  # before the weights are read: fail early
        if str(device) != "meta":  # (meta: shapes without data, as tests place a teacher)
            device = check_device(device)  # cuda on a CPU-only build: one line, not an assert
        other = None if tokenizer is None else tokenizer_from(tokenizer)
        p = Path(path)
        if not p.exists() and is_hub_id(path):
            try:
                p = resolve_pretrained(path)
            except (OSError, ConnectionError) as err:  # name the argument: teacher
                raise type(err)(f"teacher: {str(err).removeprefix('path_or_id: ')}") from err
        if p.is_dir():
            if not (p / "config.json").is_file():
                raise FileNotFoundError(f"teacher: {p} is a folder without a config.json "
                                        "(not a Hugging Face model directory)")  # fmt: skip
            if _spikemar_architecture(p):
                model = from_pretrained(p, tokenizer=True if tokenizer is None else tokenizer)
                return cls(model, str(p), model.tokenizer).place(device, dtype)
            try:
                model = _auto_causal_lm().from_pretrained(p, local_files_only=True)
            except Exception as err:  # transformers raises what its model code raises
                raise ValueError(f"teacher: transformers cannot build the model in {p} "
                                 f"({type(err).__name__}: {err})") from err  # fmt: skip
            own = other
            files = ("tokenizer.json", "tokenizer_config.json")
            if own is None and any((p / f).is_file() for f in files):
                own = HFTokenizer.from_directory(p)
            return cls(model, str(p), own).place(device, dtype)
        if not p.is_file():
            raise FileNotFoundError(f"teacher: no checkpoint at {p}")
        model, own, _ = load_checkpoint(p, name="teacher")
        return cls(model, str(p), own if other is None else other).place(device, dtype)

    def place(self, device: str | torch.device, dtype: str | torch.dtype | None = None) -> Teacher:
        """Cast the teacher to ``dtype`` where it is, then move it to ``device``: a 16-bit
        teacher loaded in float32 on the CPU never occupies its float32 size on the device
        (a 3 B teacher: 12 GB instead of 6)."""
        dtype = _teacher_dtype(dtype)
        if dtype is not None:
            self.model.to(dtype)
        self.model.to(device)
        return self

    @property
    def layers(self) -> nn.ModuleList:
        if isinstance(self.model, TransformerLM):
            return self.model.blocks
        if self.hf:
            decoder = self.model.get_decoder()
            if not hasattr(decoder, "layers"):
                raise ValueError(f"teacher: {self.source}: its decoder has no `layers` list "
                                 "(a Llama-style causal LM is expected)")  # fmt: skip
            return decoder.layers
        return self.model.layers

    def train(self, mode: bool = True) -> Teacher:
        return super().train(False)  # always frozen, always in eval mode

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.stream(tokens)[0]

    @torch.no_grad()
    def stream(self, tokens: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        entering: list[torch.Tensor] = []
        last: list[torch.Tensor] = []

        def first_tensor(args, kwargs) -> torch.Tensor:
            return args[0] if args else kwargs["hidden_states"]

        def keep_input(module, args, kwargs):
            entering.append(first_tensor(args, kwargs))

        def keep_output(module, inputs, output):
            last.append(output[0] if isinstance(output, tuple) else output)

        hooks = [self.layers[-1].register_forward_hook(keep_output)]
        if self.hf:
            hooks += [layer.register_forward_pre_hook(keep_input, with_kwargs=True)
                      for layer in self.layers]  # fmt: skip
        try:
            with torch.autocast(tokens.device.type, enabled=False):
                if self.hf:
                    logits = self.model(input_ids=tokens, use_cache=False).logits
                    states = entering
                else:
                    logits, states = self.model(tokens, return_hidden=True)
        finally:
            for h in hooks:
                h.remove()
        # a 16-bit teacher's outputs reach the loss in float32
        return logits.float(), [h.float() for h in (*states, last[0])]

    @torch.no_grad()
    def postnorm(self, states: list[torch.Tensor]) -> list[torch.Tensor]:
        return [layer.norm1(h) for layer, h in zip(self.layers, states, strict=False)]


def _teacher_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``dtype`` as a floating torch.dtype (a name from :data:`TEACHER_DTYPES`), or None."""
    if isinstance(dtype, str) and dtype in TEACHER_DTYPES:
        return getattr(torch, dtype)
    if dtype is None or (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        return dtype
    raise ValueError(f"dtype: expected one of {TEACHER_DTYPES}, a floating torch.dtype or "
                     f"None, got {dtype!r}")  # fmt: skip


def _auto_causal_lm():
    """transformers' AutoModelForCausalLM (imported when a teacher needs it: it is slow)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM


def _spikemar_architecture(directory: Path) -> bool:
    """Whether ``config.json`` is an architecture spikemar reads itself (Mamba-2, Llamba);
    such a config that is wrong in other ways is named as the teacher's error here."""
    config = read_pretrained_config(directory)
    if not is_pretrained_config(config):
        return False
    try:
        config_from_hf(config)
    except ValueError as err:
        raise ValueError(f"teacher: {directory}: {err}") from err
    return True


def transfer_weights(teacher: nn.Module, student: nn.Module) -> dict[str, list[str]]:
    """Copy every teacher tensor whose name (``blocks.`` read as ``layers.``) and shape match a
    student tensor; returns the names ``copied`` and the student's ``kept`` (left as they were)."""
    source = {k.replace("blocks.", "layers.", 1): v for k, v in teacher.state_dict().items()}
    target = student.state_dict()
    copied = [k for k, v in target.items() if k in source and source[k].shape == v.shape]
    with torch.no_grad():
        for k in copied:
            target[k].copy_(source[k])
    return {"copied": copied, "kept": [k for k in target if k not in copied]}


class DistillObjective(Objective):
    """Stage 1's alignment phase and SBDS for both stages (see the module docstring)."""

    def __init__(self, student: MARLM, teacher: Teacher, config: DistillConfig) -> None:
        super().__init__(student)
        # the alignment phase leaves embedding and head unused: DDP must be told
        self.find_unused_parameters = bool(config.align_steps)
        self.teacher, self.config = teacher, config
        widths = [student.config.d_model] * student.config.n_layers
        needs_layers = config.feature is not None or config.align_steps
        if needs_layers and student.config.n_layers != teacher.n_layers:
            raise ValueError(
                f"student_config: {student.config.n_layers} student layers cannot be aligned with "
                f"the teacher's {teacher.n_layers}; use equally many layers, or feature=None "
                "and align_steps=0"
            )
        if config.align_steps and student.config.d_model != teacher.width:
            raise ValueError(f"align_steps: alignment feeds the teacher's stream (width "
                             f"{teacher.width}) to the student's layers (width "
                             f"{student.config.d_model}); use equal widths")  # fmt: skip
        if config.feature == "postnorm" and teacher.hf:
            raise ValueError("feature: 'postnorm' needs a spikemar teacher (it applies the "
                             "teacher's layer norms)")  # fmt: skip
        self.projection = None
        if config.feature is not None and student.config.d_model != teacher.width:
            self.projection = FeatureProjection(widths, [teacher.width] * len(widths))
        # SBDS divides by the micro-steps T; with per-point settings (MARConfig.points) the
        # points may differ, and the largest T is used (T itself when they agree)
        self.T = max((site.module.T for site in student.spike_points()), default=1)
        self.aligning = False

    def train(self, mode: bool = True) -> DistillObjective:
        super().train(mode)
        self.teacher.train(False)
        return self

    def begin_step(self, step: int) -> None:
        self.aligning = step < self.config.align_steps

    def forward(self, x: torch.Tensor, y: torch.Tensor):
        t_logits, t_states = self.teacher.stream(x)
        if self.aligning:
            targets = t_states[1:]
            loss = sum(
                (layer(h) - target).float().norm(dim=-1).mean()
                for layer, h, target in zip(self.model.layers, t_states, targets, strict=False)
            ) / len(targets)
            return loss, {"align": loss.detach()}
        c = self.config
        s_logits, s_states = self.model(x, return_hidden=True)
        t_states = t_states[: len(s_states)]
        if c.feature == "postnorm":
            layers = self.model.layers
            s_states = [layer.norm1(h) for layer, h in zip(layers, s_states, strict=True)]
            t_states = self.teacher.postnorm(t_states)
        terms = sbds_loss(
            s_logits, t_logits, s_states if c.feature else None, t_states if c.feature else None,
            T=self.T, alpha=c.alpha, beta=c.beta, temperature=c.temperature,
            feature=c.feature, projection=self.projection, gamma=c.gamma,
        )  # fmt: skip
        loss, shown = terms.loss, {"fkl": terms.forward_kl, "rkl": terms.reverse_kl}
        if c.feature:
            shown["feat"] = terms.feature
        if c.ce:
            ce = F.cross_entropy(s_logits.flatten(0, 1).float(), y.flatten())
            loss = loss + c.ce * ce
            shown["ce"] = ce.detach()
        return loss, shown

    def extra_state(self) -> dict[str, Any]:
        return {} if self.projection is None else {"projection": self.projection.state_dict()}

    def load_extra(self, state: dict[str, Any]) -> None:
        if self.projection is not None:
            self.projection.load_state_dict(state["projection"])


def build_student(teacher: Teacher, config: DistillConfig, vocab_size: int) -> MARLM:
    """Stage 1: a dense SSM LM shaped like the teacher (a MAR hybrid's own configuration with
    SSMs for its attention layers), with the transferable weights copied.
    Stage 2: a spiking MAR LM with the teacher's architecture and weights."""
    overrides = dict(config.student_config)
    if config.stage == 1:
        if isinstance(teacher.model, MARLM):
            # a hybrid: the teacher's own architecture with SSMs for its attention layers, so
            # that every other tensor transfers (and spikemar refine --stage1 takes the result)
            base = model_config_dict(teacher.model)
            kinds = teacher.model.config.layer_kinds()
            base["layers"] = ["ssm" if k == "attn" else k for k in kinds]
        else:
            base = {"vocab_size": vocab_size, "d_model": teacher.width,
                    "n_layers": teacher.n_layers}  # fmt: skip
        student = build_model("mar-dense", {**base, **overrides})
        if config.init_from_teacher and not teacher.hf:
            transfer_weights(teacher.model, student)
        return student
    if not isinstance(teacher.model, MARLM):
        if config.init_from_teacher:
            raise ValueError(
                f"teacher: stage 2 initialises the student from a dense SSM teacher (mar-dense);"
                f" {teacher.source} is a {type(teacher.model).__name__} (pass "
                "init_from_teacher=False, --no-init-from-teacher, to start from random weights)"
            )
        base = {"vocab_size": vocab_size, "d_model": teacher.width, "n_layers": teacher.n_layers}
    else:
        base = model_config_dict(teacher.model)
    spikes = {**(base.get("spikes") or {}), **overrides.pop("spikes", {})}
    student = build_model("mar", {**base, **overrides, "spikes": spikes})
    if config.init_from_teacher:
        ours, theirs = student.state_dict(), teacher.model.state_dict()
        differ = [k for k, v in ours.items() if k in theirs and v.shape != theirs[k].shape]
        if differ:
            k = differ[0]
            raise ValueError(
                f"student_config: the student must keep the teacher's shapes to start from its "
                f"weights ({len(differ)} tensors differ, first {k}: the teacher's "
                f"{list(theirs[k].shape)}, the student's {list(ours[k].shape)}); or pass "
                "init_from_teacher=False (--no-init-from-teacher) to start from random weights"
            )
        # strict=False raises only for shapes, which the check above has named
        missing, unexpected = student.load_state_dict(theirs, strict=False)
        new = sorted(set(missing) - spike_point_state_names(student))
        if new or unexpected:
            raise ValueError(f"student_config: the student's parameters do not match the "
                             f"teacher's (missing {new}, unexpected {unexpected})")  # fmt: skip
    return student


def _teacher_data(config: DistillConfig, teacher: Teacher) -> TokenDataset:
    """The training text in the teacher's vocabulary: tokenized with the teacher's tokenizer
    when it has a pretrained one (BPE), else by characters as before, checked against it."""
    if teacher.tokenizer is not None and not isinstance(teacher.tokenizer, CharTokenizer):
        data = TokenDataset.from_text_file(config.data, tokenizer=teacher.tokenizer)
        if data.vocab_size > teacher.vocab_size:
            raise ValueError(f"teacher: its tokenizer has {data.vocab_size} ids but its "
                             f"embedding only {teacher.vocab_size}")  # fmt: skip
        return data
    data = TokenDataset.from_text_file(config.data)
    if teacher.vocab_size != data.vocab_size or (
        teacher.tokenizer is not None and teacher.tokenizer != data.tokenizer
    ):
        raise ValueError(
            f"teacher: its vocabulary ({teacher.vocab_size} ids"
            f"{', other characters' if teacher.vocab_size == data.vocab_size else ''}) differs "
            f"from the data's ({data.vocab_size} characters); teacher and student must share one "
            "vocabulary"
        )
    return data


def load_student(path: str, teacher: Teacher, data: TokenDataset, device: str) -> MARLM:
    """A spiking student checkpoint (``spikemar convert``'s or ``spikemar refine``'s output)
    whose dense twin has the teacher's architecture and tensors' shapes, in the data's
    vocabulary; a layer may hold another mixer kind than the teacher's (attention replaced by
    a stage-1 SSM), its other tensors still the teacher's shapes."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"student: no checkpoint at {p}")
    student, tokenizer, _ = load_checkpoint(p, map_location=device, name="student")
    if not isinstance(student, MARLM) or student.config.spikes is None:
        raise ValueError(f"student: {p} is not a spiking MAR LM (expected spikemar convert's "
                         "output)")  # fmt: skip
    if tokenizer != data.tokenizer:
        raise ValueError(f"student: {p}'s tokenizer differs from the teacher's")
    if isinstance(teacher.model, MARLM):
        # a layer whose mixer kind differs from the teacher's (a stage-1 SSM in place of
        # attention: spikemar refine's attention -> SSM option) is compared outside its mixer
        kinds = zip(student.config.layer_kinds(), teacher.model.config.layer_kinds(), strict=False)
        replaced = tuple(f"layers.{i}.mixer." for i, (a, b) in enumerate(kinds) if a != b)

        def shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
            state = model.state_dict().items()
            return {k: tuple(v.shape) for k, v in state if not k.startswith(replaced)}

        twin, ours = shapes(dense_twin(student)), shapes(teacher.model)
        if twin != ours:
            name = min(k for k in twin.keys() | ours.keys() if twin.get(k) != ours.get(k))
            raise ValueError(f"student: {p} is not the teacher's architecture (first difference: "
                             f"{name}, student {twin.get(name, 'absent')}, teacher "
                             f"{ours.get(name, 'absent')})")  # fmt: skip
    return student.train()


def weights_digest(model: nn.Module) -> str:
    """A short hash of ``model``'s weights (names, dtypes, shapes and bytes): a resumed
    distillation checks that its teacher is the one the run started with."""
    h = hashlib.blake2b(digest_size=8)
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def distill(config: DistillConfig, *, resume: bool = False, progress: bool = True) -> dict:
    """Run stage ``config.stage``; returns the history, best validation loss, checkpoint path
    and the teacher's validation loss on the same batches."""
    if not isinstance(config, DistillConfig):
        raise TypeError(f"config: expected a DistillConfig, got {type(config).__name__}")
    prepare_output(config, resume=resume)  # before the data and the teacher: fail early
    torch.manual_seed(config.seed)
    _, _, device = distributed_setup(config.device)  # this rank's device under torchrun
    # float32 on the CPU until the student has been built from its weights; then cast, then moved
    teacher = Teacher.load(config.teacher, "cpu", tokenizer=config.tokenizer)
    if isinstance(teacher.model, MARLM) and teacher.model.config.spikes is not None:
        raise ValueError(f"teacher: {teacher.source} is a spiking model (spike points in it); the "
                         "teacher is the dense model a student learns from (were the teacher "
                         "and the student swapped?)")  # fmt: skip
    if config.stage == 1 and isinstance(teacher.model, MARLM):
        kinds = teacher.model.config.layer_kinds()
        if "attn" not in kinds:
            # its student would be a copy of it (every tensor transfers), "aligned" to itself
            raise ValueError(
                f"teacher: stage 1 replaces a teacher's attention with SSM mixers; "
                f"{teacher.source} is a dense SSM LM without attention layers (its mixers: "
                f"{', '.join(sorted(set(kinds)))}), "
                "already what stage 1 makes: use it as stage 2's teacher (--stage 2), or give "
                "stage 1 a Transformer or a hybrid with attention layers"
            )
    digest = weights_digest(teacher.model)  # as loaded: float32 on the CPU, on every device
    data = _teacher_data(config, teacher)
    check_windows(data, config.L)
    if teacher.max_len is not None and config.L > teacher.max_len:
        raise ValueError(f"L: {config.L} tokens exceed the teacher's max_len {teacher.max_len}")
    state = None
    if resume:
        student, state = read_resume_state(Path(config.out), data.tokenizer, device)
        saved = state.get("distill", {})
        if not saved:
            raise ValueError(f"resume: {config.out} holds a run of spikemar train, not of a "
                             "distillation")  # fmt: skip
        if saved.get("stage") != config.stage:
            raise ValueError(f"resume: {config.out} was written by stage {saved.get('stage')}, "
                             f"not stage {config.stage}")  # fmt: skip
        teacher_val = saved["teacher_val"]
        if saved.get("teacher_digest", digest) != digest:
            raise ValueError(
                f"resume: the teacher's weights changed since the run was saved ({teacher.source} "
                f"hashed {saved['teacher_digest']}, now {digest}): a resume would not continue "
                "the same run; resume with the same teacher, or start a new run with another --out"
            )
    else:
        if config.student is not None:
            student = load_student(config.student, teacher, data, device)
        else:
            student = build_student(teacher, config, teacher.vocab_size)
    # the frozen teacher in its dtype only now: the student starts from its full weights
    teacher.place(device, config.teacher_dtype)
    if state is None:
        teacher_val = evaluate(teacher, data, config, device)["val"]
        if not math.isfinite(teacher_val):  # every step's loss would be NaN: say whose it is
            raise ValueError(f"teacher: {teacher.source} scores a validation loss of "
                             f"{teacher_val} on the data in {config.teacher_dtype}: its logits "
                             "overflow or hold NaN; it cannot teach")  # fmt: skip
    objective = DistillObjective(student.to(device), teacher, config)
    info = {"distill": {"stage": config.stage, "teacher": teacher.source,
                        "teacher_val": teacher_val, "teacher_digest": digest}}  # fmt: skip
    result = run_training(config, objective, data, state=state, progress=progress,
                          desc=f"distill stage {config.stage}", checkpoint_info=info)  # fmt: skip
    unit = "nats/char" if isinstance(data.tokenizer, CharTokenizer) else "nats/token"
    return {**result, "teacher_val": teacher_val, "unit": unit}
