"""Batches of recurrent states: sequences prefilled one by one (their prompts differ in length)
stacked into one batch that steps together, and rows taken out of a batch again.

A MARLM's state is a list with one dataclass per layer (``MixerState``, ``LTIState``,
``AttentionState``) whose tensor fields are batch-first. States of single sequences stack
where every layer's non-tensor fields agree (an SSM's O(1) state always does; two KV caches
only at the same length).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch

__all__ = ["prefill_each", "select_states", "stack_states", "stackable"]


def prefill_each(model: torch.nn.Module, sequences: Sequence[torch.Tensor]) -> tuple[list, list]:
    """Each sequence [1, L] read alone by ``model.prefill`` from a fresh state that later
    steps may update in place: (the last token's logits of each, the state of each), ready for
    :func:`stack_states`."""
    logits, states = [], []
    for tokens in sequences:
        last, state = model.prefill(tokens, model.init_state(1, in_place=True))
        logits.append(last)
        states.append(state)
    return logits, states


def stackable(states: Sequence) -> bool:
    """Whether per-sequence model states (lists of layer states) can be stacked into one batch:
    the same dataclass per layer, whose tensors are batch-first with equal trailing shapes and
    whose other fields agree."""
    if not states or not all(isinstance(s, list) for s in states):
        return False
    first = states[0]
    if any(len(s) != len(first) for s in states):
        return False
    for layer in range(len(first)):
        kinds = {type(s[layer]) for s in states}
        if len(kinds) != 1 or not dataclasses.is_dataclass(first[layer]):
            return False
        for f in dataclasses.fields(first[layer]):
            values = [getattr(s[layer], f.name) for s in states]
            if isinstance(values[0], torch.Tensor):
                if any(not isinstance(v, torch.Tensor) or v.dim() == 0 or v.shape[1:]
                       != values[0].shape[1:] for v in values):  # fmt: skip
                    return False
            elif any(v != values[0] for v in values):
                return False
    return True


def stack_states(states: Sequence[list]) -> list:
    """One model state for the sequences of ``states`` (see :func:`stackable`; ValueError where
    they cannot stack): each layer's tensors concatenated along the batch, its other fields
    kept."""
    if len(states) == 1:
        return states[0]  # any state: nothing to stack
    if not stackable(states):
        raise ValueError(
            "states: expected per-sequence states of one model whose layers agree in "
            "everything but their tensors (KV caches at the same length)"
        )
    return [_with_tensors(layer, torch.cat) for layer in zip(*states, strict=True)]


def select_states(state: list, rows: Sequence[int]) -> list:
    """``state`` for the sequences ``rows`` of its batch (new tensors)."""
    return [_with_tensors((s,), lambda ts: ts[0][torch.tensor(rows, device=ts[0].device)])
            for s in state]  # fmt: skip


def _with_tensors(layer: Sequence, combine: Callable[[list[torch.Tensor]], torch.Tensor]):
    """``layer[0]`` (a layer state dataclass) with each tensor field replaced by ``combine`` of
    that field across ``layer``."""
    tensors = {f.name: combine([getattr(s, f.name) for s in layer])
               for f in dataclasses.fields(layer[0])
               if isinstance(getattr(layer[0], f.name), torch.Tensor)}  # fmt: skip
    return dataclasses.replace(layer[0], **tensors)
