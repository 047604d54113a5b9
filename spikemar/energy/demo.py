"""Models to try the energy counter on: the packaged student, or a tiny random MAR LM.

``spikemar energy`` and ``spikemar demo`` price the same model by default, the packaged student
(``spikemar/assets/mar_shakespeare.pt``, :func:`packaged_student`) against its dense twin. For a
quick look at the counter without the checkpoint, :func:`demo_model` builds a tiny byte-level
MAR LM with seeded random weights (real MAR layers: selective SSM mixers and SwiGLU FFNs with
four spike points each, which declare their spike trains to the counter through
:mod:`spikemar.counting`); :func:`dense_demo_model` is its dense twin, with the same weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .._numbers import check_count

__all__ = ["VOCAB", "demo_model", "dense_demo_model", "packaged_student", "packaged_student_path"]

VOCAB = 256  # bytes


def demo_model(d: int = 64, layers: int = 2, T: int = 4, *, seed: int = 0) -> nn.Module:
    """A tiny spiking MAR LM over bytes (d_model ``d``, ``layers`` SSM layers, ATMN with ``T``
    micro-steps) with seeded random weights, in eval mode."""
    from spikemar.models import MARLM, MARConfig, SpikeConfig

    d, layers, T = (check_count(n, v) for n, v in (("d", d), ("layers", layers), ("T", T)))
    head_dim = 16 if (2 * d) % 16 == 0 else 2 * d
    config = MARConfig(
        vocab_size=VOCAB,
        d_model=d,
        n_layers=layers,
        d_state=16,
        head_dim=head_dim,
        spikes=SpikeConfig(T=T),
    )
    torch.manual_seed(seed)
    return MARLM(config).eval()


def dense_demo_model(d: int = 64, layers: int = 2, *, seed: int = 0) -> nn.Module:
    """The dense twin of :func:`demo_model` with the same ``seed``: the same weights, no spikes."""
    from spikemar.models import MARLM

    student = demo_model(d, layers, seed=seed)
    twin = MARLM(student.config.dense())
    # every weight but the spike thresholds, which the twin does not have
    twin.load_state_dict(student.state_dict(), strict=False)
    return twin.eval()


def packaged_student_path() -> Path:
    """The packaged spiking student's checkpoint (what ``spikemar demo`` runs)."""
    from spikemar.showcase import shipped_checkpoint

    return shipped_checkpoint()


def packaged_student():
    """``(model, tokenizer)`` of the packaged spiking student, in eval mode."""
    from spikemar.checkpoint import load_checkpoint

    model, tokenizer, _ = load_checkpoint(packaged_student_path())
    return model.eval(), tokenizer
