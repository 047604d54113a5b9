"""Checkpoints: what a trained spikemar model needs to be rebuilt, and a training run resumed.

A checkpoint is one ``torch.save`` file holding plain data (no pickled classes, so it loads with
``weights_only=True``):

    format        "spikemar-checkpoint-1"
    kind          "mar" | "mar-dense" | "transformer"
    model_config  the model's config as a dict (MARConfig's SpikeConfig as a nested dict)
    tokenizer     the tokenizer as a dict (its to_dict(): spikemar.tokenizer, char or hf)
    model         the model's state_dict
    train         optional: the training state (step, optimizer, scheduler, RNG states, config,
                  best validation loss, history) that ``--resume`` restores
    provenance    optional: how a released checkpoint was made (command, data, seed, result);
                  :func:`release_checkpoint` writes it in place of the training state

The format string carries its version N ("spikemar-checkpoint-N"): a file of a newer version is
refused with "written by a newer spikemar (format N); upgrade spikemar", not misread. Weights that
hold NaN or inf (a run that diverged) are refused unless ``allow_nonfinite=True``.

It is written with :func:`spikemar._io.atomic_write` (a temporary name in the same folder, then
one rename), so an interrupted save never leaves a half-written file, and the temporaries of a
killed save are removed by the next one.
"""

from __future__ import annotations

import inspect
import os
import pickle
import re
import zipfile
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._io import atomic_write
from .data import CharTokenizer
from .models import MARLM, MARConfig, SpikeConfig, TransformerConfig, TransformerLM
from .models.assembly import assign_weights, build_on_meta, check_no_meta
from .tokenizer import tokenizer_from_dict

__all__ = [
    "MODEL_KINDS",
    "NonFiniteWeightsError",
    "build_model",
    "check_model_config",
    "dense_twin",
    "load_checkpoint",
    "model_config_dict",
    "release_checkpoint",
    "save_checkpoint",
]

FORMAT_VERSION = 1
FORMAT = f"spikemar-checkpoint-{FORMAT_VERSION}"
MODEL_KINDS = ("mar", "mar-dense", "transformer")
_FORMAT_RE = re.compile(r"^spikemar-checkpoint-(\d+)$")


class NonFiniteWeightsError(ValueError):
    """A checkpoint (or a model about to be saved) holds NaN or inf weights."""


def nonfinite_parameters(state: dict[str, Any]) -> list[str]:
    """The names of the floating-point tensors of a state dict that hold NaN or inf."""
    return [name for name, t in state.items()
            if isinstance(t, torch.Tensor) and t.is_floating_point()
            and not _finite(t)]  # fmt: skip


def _finite(t: torch.Tensor) -> bool:
    if t.numel() == 0:
        return True
    # the least and the greatest value carry a NaN (both are NaN) and an infinity: no temporary
    # of the tensor's size, where torch.isfinite(t).all() makes |t| and two masks (at a load's
    # peak, 1.2 B per float32 parameter beside the weights' 4: measured on a 150 M-parameter model)
    lo, hi = torch.aminmax(t.detach())
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def check_model_config(kind: str, config: Any, *, name: str = "config") -> None:
    """Refuse a config dict for a model of ``kind`` that is no dict or names settings the
    model does not have (``spikes`` as a dict of :class:`SpikeConfig`'s), naming ``name``."""
    if not isinstance(config, dict):
        raise ValueError(f"{name}: expected a dict of model settings, got {config!r}")
    known = {f.name for f in fields(TransformerConfig if kind == "transformer" else MARConfig)}
    unknown = sorted(map(str, set(config) - known))
    if unknown:
        raise ValueError(f"{name}: {unknown} are not settings of a {kind} model; expected "
                         f"some of {sorted(known)}")  # fmt: skip
    spikes = config.get("spikes")
    if spikes is not None and kind != "transformer":
        if not isinstance(spikes, dict):
            raise ValueError(f"{name}: spikes: expected a dict of spike settings, got {spikes!r}")
        known = set(inspect.signature(SpikeConfig).parameters)
        unknown = sorted(map(str, set(spikes) - known))
        if unknown:
            raise ValueError(f"{name}: spikes: {unknown} are not spike settings; expected some "
                             f"of {sorted(known)}")  # fmt: skip


def build_model(kind: str, config: dict[str, Any]) -> nn.Module:
    """A model of ``kind`` from its config dict (as :func:`model_config_dict` writes it)."""
    if kind not in MODEL_KINDS:
        raise ValueError(f"kind: expected one of {MODEL_KINDS}, got {kind!r}")
    check_model_config(kind, config)
    if kind == "transformer":
        return TransformerLM(TransformerConfig(**config))
    config = dict(config)
    spikes = config.pop("spikes", None)
    if kind == "mar-dense":
        spikes = None
    elif spikes is None:
        spikes = {}
    spike_config = None if spikes is None else SpikeConfig(**spikes)
    return MARLM(MARConfig(**config, spikes=spike_config))


def dense_twin(model: nn.Module) -> MARLM:
    """The dense twin of a spiking MAR LM, with its weights (all but the spike thresholds), in
    eval mode: the same architecture without spikes, i.e. what a stage-2 teacher costs."""
    if not isinstance(model, MARLM) or model.config.spikes is None:
        what = "a dense MARLM" if isinstance(model, MARLM) else type(model).__name__
        raise ValueError(f"model: expected a spiking MARLM, got {what}")
    twin = build_model("mar-dense", model_config_dict(model))
    unexpected = twin.load_state_dict(model.state_dict(), strict=False).unexpected_keys
    others = [k for k in unexpected if not k.endswith("neuron.a")]
    if others:
        raise ValueError(f"model: parameters its dense twin does not have: {others}")
    twin.tokenizer = getattr(model, "tokenizer", None)
    return twin.eval()


def model_config_dict(model: nn.Module) -> dict[str, Any]:
    config = dict(vars(model.config))
    if isinstance(config.get("spikes"), SpikeConfig):
        config["spikes"] = config["spikes"].as_dict()
    if isinstance(config.get("ffn_sparsity"), tuple):
        config["ffn_sparsity"] = list(config["ffn_sparsity"])
    return config


def model_kind(model: nn.Module) -> str:
    if isinstance(model, TransformerLM):
        return "transformer"
    if isinstance(model, MARLM):
        return "mar" if model.config.spikes is not None else "mar-dense"
    raise TypeError(f"model: expected a TransformerLM or MARLM, got {type(model).__name__}")


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    tokenizer: CharTokenizer,
    train_state: dict[str, Any] | None = None,
    provenance: dict[str, Any] | None = None,
    *,
    model_state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``model`` (and optionally a run's training state or a release's provenance) to
    ``path`` atomically; returns the path. Refuses a model with NaN or inf weights
    (:class:`NonFiniteWeightsError`): a diverged run must not replace a good checkpoint.
    ``model_state``: the weights to write instead of ``model.state_dict()`` (a sharded model's
    full state, gathered by the trainer); ``model`` still gives the kind and config."""
    path = Path(path)
    if not callable(getattr(tokenizer, "to_dict", None)):
        raise TypeError(f"tokenizer: expected a tokenizer with to_dict() (CharTokenizer or "
                        f"HFTokenizer), got {type(tokenizer).__name__}")  # fmt: skip
    state = model.state_dict() if model_state is None else model_state
    bad = nonfinite_parameters(state)
    if bad:
        raise NonFiniteWeightsError(
            f"model: {len(bad)} weight tensors hold NaN or inf (first: {bad[0]}); not saving "
            f"them to {path}"
        )
    payload = {
        "format": FORMAT,
        "kind": model_kind(model),
        "model_config": model_config_dict(model),
        "tokenizer": tokenizer.to_dict(),
        "model": state,
    }
    if train_state is not None:
        payload["train"] = train_state
    if provenance is not None:
        payload["provenance"] = provenance
    # through a Python file, so that a failed write (a full disk) surfaces as its OSError
    # (the zip writer's "unexpected pos" RuntimeError has it as its cause)
    with atomic_write(path, name="checkpoint") as tmp, open(tmp, "wb") as f:
        torch.save(payload, f)
    return path


def _read(path: Path, map_location, name: str = "checkpoint") -> dict[str, Any]:
    """The payload of ``path``, or one clear ValueError: corrupt, not a checkpoint, newer."""
    if path.stat().st_size == 0:
        raise ValueError(f"{name}: {path} is empty (0 bytes), not a checkpoint")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, KeyError, IndexError, TypeError, AttributeError):
        # torch's message advises weights_only=False, i.e. running whatever code the file
        # holds: a spikemar checkpoint is plain data, so such a file is simply not one (a text
        # file read by torch's legacy, non-zip reader fails as a KeyError or an IndexError)
        raise ValueError(
            f"{name}: {path} is not a spikemar checkpoint (it holds Python objects or bytes "
            "that a checkpoint never contains; corrupt, or another program's file)"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
        reason = str(err).split(". ")[0].strip() or type(err).__name__
        raise ValueError(f"{name}: {path} is corrupt or truncated (torch.load: {reason})") from None
    form = payload.get("format") if isinstance(payload, dict) else None
    match = _FORMAT_RE.match(form) if isinstance(form, str) else None
    if match is None:
        raise ValueError(f"{name}: {path} is not a spikemar checkpoint (no format entry)")
    version = int(match.group(1))
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{name}: {path} was written by a newer spikemar (format {version}; this one "
            f"reads up to {FORMAT_VERSION}); upgrade spikemar"
        )
    if version < 1:
        raise ValueError(f"{name}: {path} has format {version}, which no spikemar wrote")
    return payload


def load_checkpoint(
    path: str | os.PathLike,
    map_location: str | torch.device = "cpu",
    *,
    allow_nonfinite: bool = False,
    name: str = "checkpoint",
) -> tuple[nn.Module, CharTokenizer, dict[str, Any]]:
    """``(model, tokenizer, payload)``; the model in eval mode with the saved weights, on
    ``map_location`` (the file is read into CPU memory and the model alone moved there, so a
    device holds the weights once; the payload's other tensors stay on the CPU). On the CPU the
    model's tensors are ``payload["model"]``'s themselves (the model is built on the meta device
    and they are assigned to it; one saved in another dtype than the model's is cast), so the
    host holds the weights once, about 4 B per float32 parameter at the peak beside the rest
    of the payload (building the model and copying them in took 9): an update of one is an
    update of the other.

    Raises ``FileNotFoundError`` for a missing file, ``ValueError`` for a file that is corrupt,
    not a checkpoint, or of a newer format, and :class:`NonFiniteWeightsError` for weights with
    NaN or inf (a diverged run) unless ``allow_nonfinite``. Every message begins with ``name``,
    the argument the caller reads the file for (``teacher``, ``resume``, ``--checkpoint``)."""
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"path: expected a str or path, got {type(path).__name__}")
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{name}: {path} is a folder; expected a checkpoint file")
    if not path.is_file():
        raise FileNotFoundError(f"{name}: no file at {path}")
    payload = _read(path, "cpu", name)
    try:
        model = _rebuild(payload["kind"], payload["model_config"], payload["model"])
        tokenizer = tokenizer_from_dict(payload["tokenizer"])
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as err:
        raise ValueError(f"{name}: {path} does not rebuild its model ({err})") from err
    check_no_meta(model, "load_checkpoint")
    bad = nonfinite_parameters(payload["model"])
    if bad and not allow_nonfinite:
        raise NonFiniteWeightsError(
            f"{name}: {path} holds NaN or inf weights in {len(bad)} tensors (first: "
            f"{bad[0]}): the run that wrote it diverged; pass allow_nonfinite=True to load it "
            "anyway"
        )
    model.to(map_location).eval()
    model.tokenizer = tokenizer  # generate(text) → text
    return model, tokenizer, payload


def _rebuild(kind: str, config: dict[str, Any], state: dict[str, torch.Tensor]) -> nn.Module:
    """``build_model(kind, config)`` holding ``state``'s tensors themselves: built on the meta
    device and ``state`` assigned, so the weights are in memory once (the file's), without the
    random initial weights that a copy into a built model allocates beside them. Every tensor
    of these models is in its state dict, so ``state`` fills them all (strictly, as
    ``load_state_dict`` does); dtypes and strides as the model builds them (a tensor saved in
    another dtype is cast, as loading it into a built model casts it)."""
    if not isinstance(state, dict):
        raise ValueError(f"the model's weights: expected a dict of tensors, got "
                         f"{type(state).__name__}")  # fmt: skip
    model = build_on_meta(lambda: build_model(kind, config))
    missing, unexpected = assign_weights(model, state, keep_layout=True)
    if missing or unexpected:
        raise ValueError(f"its weights do not fit the model: missing {missing[:3]}"
                         f"{' ...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}"
                         f"{' ...' if len(unexpected) > 3 else ''}")  # fmt: skip
    return model


def release_checkpoint(
    source: str | os.PathLike, path: str | os.PathLike, provenance: dict[str, Any]
) -> Path:
    """Write the model of ``source`` to ``path`` without its training state (a few MB instead of
    three times that), with ``provenance``: at least ``command``, ``data``, ``seed``, ``result``."""
    missing = {"command", "data", "seed", "result"} - set(provenance)
    if missing:
        raise ValueError(f"provenance: missing {sorted(missing)}")
    model, tokenizer, _ = load_checkpoint(source)
    return save_checkpoint(path, model, tokenizer, provenance=provenance)
