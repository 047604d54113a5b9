r"""SBDS: Spike-aware Bidirectional Distillation, MAR's loss for training the spiking student.

With teacher distribution p and student distribution q over the vocabulary at each position,

.. math::
    L_{logit}   &= \alpha\,\mathrm{KL}(p \,\|\, q) + \beta\,\mathrm{KL}(q \,\|\, p)
                   \qquad (\alpha = 0.2,\ \beta = 0.7 \text{ in the paper}) \\
    L_{feature} &= \sum_j \lVert h^{teacher}_j - P_j\, h^{student}_j \rVert_2
                   \qquad \text{(pre-norm hidden state entering layer } j) \\
    L           &= \frac{L_{logit}}{T \cdot M} + \gamma \frac{L_{feature}}{T \cdot L_{layers}}

where M is the number of token positions, T the student's micro-steps and :math:`P_j` the
identity (equal widths) or a learned projection. Choices the paper leaves open, made here:
the KL terms are summed over positions and averaged over the batch before the 1/(T·M); the
feature term is the L2 norm of each position's difference, averaged over batch and positions,
summed over layers; ``temperature`` τ_kd softens both distributions and multiplies the KL terms
by τ_kd² (Hinton et al.'s scaling, so gradients keep their size). Every term can be switched
off (``alpha=0``, ``beta=0``, ``feature=None``) for the ablations, and ``feature='postnorm'``
aligns the hidden states after each layer's first norm instead. ``gamma`` (1 in the paper's
formula) weighs the feature term: at small scale its L2 norms outweigh the per-position KL by
an order of magnitude (benchmarks/RESULTS.md), and γ rebalances the two.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._numbers import integer, item, real

__all__ = ["FeatureProjection", "SBDSLoss", "kl_divergence", "sbds_loss"]


def kl_divergence(
    p_logits: torch.Tensor, q_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """KL(p ‖ q) per position [...], from logits [..., vocab], computed with log-softmax. A
    token that p rules out (a logit of -inf: a masked or padded vocabulary entry) adds
    0 · log 0 = 0, as in ``F.kl_div``, not NaN."""
    # a tensor (a learned or per-row temperature) divides as it is, unchecked, as before:
    # reading its values would wait for the device every step; a number is checked
    if not isinstance(temperature, torch.Tensor):
        t = real(item(temperature))
        if t is None or not (math.isfinite(t) and t > 0):
            raise ValueError(f"temperature: expected a finite number > 0, got {temperature!r}")
        temperature = t
    return _kl(p_logits, q_logits, temperature)


def _kl(
    p_logits: torch.Tensor, q_logits: torch.Tensor, temperature: float | torch.Tensor
) -> torch.Tensor:
    """:func:`kl_divergence` on a temperature already checked (sbds_loss, every step)."""
    log_p = F.log_softmax(p_logits.float() / temperature, dim=-1)
    log_q = F.log_softmax(q_logits.float() / temperature, dim=-1)
    # 0 where p is 0: the product with log p = -inf would be NaN, and so would its gradients
    ratio = torch.where(log_p == -math.inf, 0.0, log_p - log_q)
    return (log_p.exp() * ratio).sum(-1)


class FeatureProjection(nn.Module):
    """Learned linear maps from student to teacher hidden widths, one per layer."""

    def __init__(self, student_widths: list[int], teacher_widths: list[int]) -> None:
        super().__init__()
        if len(student_widths) != len(teacher_widths):
            raise ValueError(
                f"student_widths, teacher_widths: {len(student_widths)} and "
                f"{len(teacher_widths)} layers; align equally many layers"
            )
        self.maps = nn.ModuleList(
            nn.Identity() if s == t else nn.Linear(s, t, bias=False)
            for s, t in zip(student_widths, teacher_widths, strict=True)
        )

    def forward(self, j: int, h: torch.Tensor) -> torch.Tensor:
        return self.maps[j](h)


@dataclass
class SBDSTerms:
    """The loss and its parts (for logging and ablations)."""

    loss: torch.Tensor
    forward_kl: torch.Tensor
    reverse_kl: torch.Tensor
    feature: torch.Tensor


def sbds_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    student_hidden: list[torch.Tensor] | None = None,
    teacher_hidden: list[torch.Tensor] | None = None,
    *,
    T: int = 1,
    alpha: float = 0.2,
    beta: float = 0.7,
    temperature: float = 1.0,
    feature: str | None = "prenorm",
    projection: FeatureProjection | None = None,
    gamma: float = 1.0,
) -> SBDSTerms:
    """SBDS on logits [batch, M, vocab] and per-layer hidden states [batch, M, width].

    ``feature`` None switches the feature term off (then hidden states may be None); 'prenorm'
    and 'postnorm' only name which hidden states the caller passes (see the module docstring).
    """
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 3:
        raise ValueError(
            "student_logits, teacher_logits: expected equal shapes [batch, M, vocab], got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)} (teacher and "
            "student must share the vocabulary)"
        )
    steps = integer(T)
    if steps is None or steps < 1:
        raise ValueError(f"T: expected the student's micro-steps, an int >= 1, got {T!r}")
    given = (alpha, beta, gamma, temperature)
    weights = [real(w) for w in given]
    if (
        not all(w is not None and math.isfinite(w) for w in weights)
        or min(weights[:3]) < 0
        or not weights[3] > 0
    ):
        raise ValueError(f"alpha, beta, gamma, temperature: expected finite numbers >= 0, "
                         f">= 0, >= 0, > 0; got {alpha!r}, {beta!r}, {gamma!r}, "
                         f"{temperature!r}")  # fmt: skip
    T, (alpha, beta, gamma, temperature) = steps, weights  # as Python numbers from here
    if feature not in (None, "prenorm", "postnorm"):
        raise ValueError(f"feature: expected None, 'prenorm' or 'postnorm', got {feature!r}")
    M = student_logits.shape[1]
    zero = student_logits.new_zeros(())
    scale = temperature**2
    fkl = _kl(teacher_logits, student_logits, temperature).sum(-1).mean() * scale
    rkl = _kl(student_logits, teacher_logits, temperature).sum(-1).mean() * scale
    logit_term = (alpha * fkl if alpha else zero) + (beta * rkl if beta else zero)
    feat = zero
    if feature is not None:
        if (
            not student_hidden
            or teacher_hidden is None
            or len(student_hidden) != len(teacher_hidden)
        ):
            raise ValueError(
                "student_hidden, teacher_hidden: expected equally many layers' hidden states, "
                f"got {len(student_hidden or [])} and {len(teacher_hidden or [])}"
            )
        for j, (hs, ht) in enumerate(zip(student_hidden, teacher_hidden, strict=True)):
            hs = projection(j, hs) if projection is not None else hs
            if hs.shape != ht.shape:
                raise ValueError(
                    f"student_hidden[{j}]: shape {tuple(hs.shape)} does not match the teacher's "
                    f"{tuple(ht.shape)}; give a FeatureProjection for differing widths"
                )
            feat = feat + (ht.float() - hs.float()).norm(dim=-1).mean()
        feat = feat / (T * len(student_hidden))
    loss = logit_term / (T * M) + gamma * feat
    return SBDSTerms(loss, fkl.detach(), rkl.detach(), feat.detach())


class SBDSLoss(nn.Module):
    """:func:`sbds_loss` with its settings fixed: ``SBDSLoss(T=4, gamma=0.1, projection=proj)``
    takes :func:`sbds_loss`'s keyword arguments (their defaults are that function's, declared
    there once), and a learned ``projection`` becomes a sub-module (its weights train with the
    student's)."""

    def __init__(self, **settings: Any) -> None:
        super().__init__()
        unknown = sorted(set(settings) - _SETTINGS)
        if unknown:
            raise TypeError(f"SBDSLoss: unknown settings {unknown}; expected some of "
                            f"{sorted(_SETTINGS)} (sbds_loss's keyword arguments)")  # fmt: skip
        self.projection = settings.pop("projection", None)
        self.settings = settings

    def forward(self, student_logits, teacher_logits, student_hidden=None, teacher_hidden=None):
        return sbds_loss(student_logits, teacher_logits, student_hidden, teacher_hidden,
                         projection=self.projection, **self.settings)  # fmt: skip


# the settings SBDSLoss accepts: sbds_loss's keyword-only arguments
_SETTINGS = frozenset(
    name
    for name, p in inspect.signature(sbds_loss).parameters.items()
    if p.kind is inspect.Parameter.KEYWORD_ONLY
)
