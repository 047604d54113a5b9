"""A model built around the weights it is given: no random initial weights, no second copy.

``build_on_meta(build)`` runs a model's constructor on the meta device (shapes, dtypes and
strides, no memory, no initialisation); ``assign_weights(model, state)`` then makes ``state``'s
tensors the model's own (``load_state_dict(..., assign=True)``) instead of copying them into
tensors the constructor filled with random values, which held the weights twice at the peak.
``meta_tensors(model)`` names whatever is still without values, so that a caller can refuse to
return such a model. :func:`spikemar.models.from_pretrained` and
:func:`spikemar.checkpoint.load_checkpoint` load this way.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from itertools import chain
from typing import TypeVar

import torch
from torch import nn

__all__ = ["assign_weights", "build_on_meta", "check_no_meta", "meta_tensors"]

M = TypeVar("M", bound=nn.Module)


def build_on_meta(build: Callable[[], M]) -> M:
    """``build()`` with every tensor it makes on the meta device."""
    with torch.device("meta"):
        return build()


def assign_weights(
    model: nn.Module, state: Mapping[str, torch.Tensor], *, keep_layout: bool
) -> tuple[list[str], list[str]]:
    """Put ``state`` into ``model`` (built by :func:`build_on_meta`) by assignment: its
    tensors become the model's, parameters keeping the ``requires_grad`` the model built them
    with. Returns ``(missing, unexpected)`` as ``load_state_dict`` names them.

    A Parameter that several names share (a head tied to the embedding) stays one Parameter:
    assignment would give each name its own, untying them. ``state`` may hold it under one of
    its names or several; under several they must hold the same values (ValueError naming
    them), and the names it lacks are not counted as missing.

    ``keep_layout``: a tensor whose dtype or strides differ from the model's as built is copied
    into that layout, as ``load_state_dict`` without ``assign`` copies (a bfloat16 file into a
    float32 model: float32, as before); without it, ``state``'s dtype is the model's.
    """
    first_of: dict[int, str] = {}
    aliases = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        first = first_of.setdefault(id(p), name)
        if first != name:
            aliases[name] = first
    for name, first in aliases.items():
        if name in state and first in state and not _same_values(state[name], state[first]):
            raise ValueError(f"{first} and {name} are one (tied) parameter of the model, but the "
                             "weights hold different values for them")  # fmt: skip
    layout = {n: (t.dtype, t.stride()) for n, t in _tensors(model)}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [n for n in missing if n not in aliases]
    for name, first in aliases.items():  # an alias in ``state`` got a Parameter of its own
        _set(model, name, model.get_parameter(first))
    if keep_layout:
        copies: dict[int, torch.Tensor] = {}  # a shared Parameter copied once
        for name, t in list(_tensors(model)):
            dtype, stride = layout[name]
            if t.is_meta or _same_layout(t, dtype, stride):
                continue
            new = copies.get(id(t))
            if new is None:
                data = torch.empty_strided(t.shape, stride, dtype=dtype, device=t.device)
                data.copy_(t.detach())  # the cast load_state_dict's copy_ makes
                if isinstance(t, nn.Parameter):
                    data = nn.Parameter(data, requires_grad=t.requires_grad)
                new = copies[id(t)] = data
            _set(model, name, new)
    return missing, unexpected


def meta_tensors(model: nn.Module) -> list[str]:
    """The names of ``model``'s tensors still on the meta device: parameters, buffers and plain
    tensor attributes of its modules."""
    left = [n for n, t in _tensors(model) if t.is_meta]
    for prefix, module in model.named_modules(remove_duplicate=False):
        dot = f"{prefix}." if prefix else ""
        left += [f"{dot}{k}" for k, v in vars(module).items()
                 if isinstance(v, torch.Tensor) and v.is_meta]  # fmt: skip
    return left


def check_no_meta(model: nn.Module, who: str) -> None:
    """Raise unless every tensor of ``model`` has values: one left on the meta device is a
    tensor the constructor computes that no state dict holds, a gap in ``who``'s assembly."""
    left = meta_tensors(model)
    if left:
        raise RuntimeError(f"{who}: {left[:3]} left without values (a bug in spikemar, not in "
                           "the file: please report it)")  # fmt: skip


def _tensors(model: nn.Module):
    return chain(model.named_parameters(remove_duplicate=False),
                 model.named_buffers(remove_duplicate=False))  # fmt: skip


def _set(model: nn.Module, name: str, value: torch.Tensor) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, value)


def _same_layout(t: torch.Tensor, dtype: torch.dtype, stride: tuple[int, ...]) -> bool:
    # a dimension of size 1 is never stepped over: its stride does not matter
    return t.dtype == dtype and all(
        a == b for n, a, b in zip(t.shape, t.stride(), stride, strict=True) if n > 1
    )


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if (a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
            and a.storage_offset() == b.storage_offset() and a.stride() == b.stride()):  # fmt: skip
        return True  # one tensor saved under both names (torch.save keeps the sharing)
    return torch.equal(a, b)
