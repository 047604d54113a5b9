"""Checkpoints: what a trained spikemar model needs to be rebuilt, and a training run resumed.

A checkpoint is one ``torch.save`` file holding plain data (no pickled classes, so it loads with
``weights_only=True``):

    format        "spikemar-checkpoint-1"
    kind          "mar" | "mar-dense" | "transformer"
    model_config  the model's config as a dict (MARConfig's SpikeConfig as a nested dict)
    tokenizer     the tokenizer as a dict (spikemar.data.CharTokenizer.to_dict)
    model         the model's state_dict
    train         optional: the training state (step, optimizer, scheduler, RNG states, config,
                  best validation loss, history) that ``--resume`` restores
    provenance    optional: how a released checkpoint was made (command, data, seed, result);
                  :func:`release_checkpoint` writes it in place of the training state

It is written to a temporary name in the same folder and renamed, so an interrupted save never
leaves a half-written file behind.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .data import CharTokenizer
from .models import MARLM, MARConfig, SpikeConfig, TransformerConfig, TransformerLM

__all__ = [
    "MODEL_KINDS",
    "build_model",
    "dense_twin",
    "load_checkpoint",
    "model_config_dict",
    "release_checkpoint",
    "save_checkpoint",
]

FORMAT = "spikemar-checkpoint-1"
MODEL_KINDS = ("mar", "mar-dense", "transformer")


def build_model(kind: str, config: dict[str, Any]) -> nn.Module:
    """A model of ``kind`` from its config dict (as :func:`model_config_dict` writes it)."""
    if kind not in MODEL_KINDS:
        raise ValueError(f"kind: expected one of {MODEL_KINDS}, got {kind!r}")
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
) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "kind": model_kind(model),
        "model_config": model_config_dict(model),
        "tokenizer": tokenizer.to_dict(),
        "model": model.state_dict(),
    }
    if train_state is not None:
        payload["train"] = train_state
    if provenance is not None:
        payload["provenance"] = provenance
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename: a crash leaves old or new, whole
        mask = os.umask(0)  # mkstemp makes the file private; give it the usual permissions
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, CharTokenizer, dict[str, Any]]:
    """``(model, tokenizer, payload)``; the model in eval mode with the saved weights."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: no file at {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise ValueError(
            f"checkpoint: {path} is not a readable spikemar checkpoint ({err})"
        ) from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"checkpoint: {path} is not a spikemar checkpoint (format {FORMAT!r})")
    try:
        model = build_model(payload["kind"], payload["model_config"])
        model.load_state_dict(payload["model"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"checkpoint: {path} does not rebuild its model ({err})") from err
    model.eval()
    return model, CharTokenizer.from_dict(payload["tokenizer"]), payload


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
