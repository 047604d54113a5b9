"""Pretrained SSM language models as spikemar configs and state dicts: Hugging Face Mamba-2 and
Cartesia's Llamba.

Public functions (``spikemar.models.from_pretrained`` reads a directory with them)::

    architecture_of(config: dict) -> 'mamba2' | 'llamba' | None
    is_pretrained_config(config: dict) -> bool
    config_from_hf(config: dict) -> MARConfig
    state_dict_from_hf(config: MARConfig, tensors: Mapping[str, torch.Tensor])
        -> dict[str, torch.Tensor]
    source_names(config: MARConfig, tensors: Mapping[str, torch.Tensor])
        -> ({model name: name in the file}, tied head's copy in the file or None)

``architecture_of`` says which family a ``config.json`` describes (``None``: one spikemar does
not read itself, e.g. a Llama for transformers' ``AutoModelForCausalLM``), without validating
the rest of the config: that is ``config_from_hf``'s job, and its errors name what is wrong.

``config_from_hf`` takes a checkpoint's ``config.json`` as a dict and returns the dense
``MARConfig`` of the same architecture (``spikes=None``; set ``spikes`` for a MAR student):

- **Hugging Face Mamba-2** (``model_type: 'mamba2'``, transformers' ``Mamba2ForCausalLM``):
  mixer-only blocks (``ffn=None``), layers of kind ``'ssm'`` with ``n_groups``, ``use_bias``,
  ``use_conv_bias``, ``time_step_limit`` (the Δ clamp), ``layer_norm_epsilon`` (every norm),
  ``tie_word_embeddings`` and ``residual_in_fp32``; a key the file leaves out takes
  transformers' ``Mamba2Config`` default, as transformers reads it (``n_groups`` 8);
  ``rms_norm`` is not read, as transformers applies the gated norm whatever it says. With
  ``n_groups > 1`` the mixer's gated norm is per group, as in mamba_ssm (the kernels the
  checkpoints were trained with); transformers' torch path normalises over all channels
  instead, so for such checkpoints spikemar and transformers' CPU forward differ by
  design (see :class:`spikemar.ssm.SelectiveMixer`).
- **mamba_ssm's own Mamba-2 checkpoints** (the ``state-spaces/mamba2-*`` repositories, written by
  ``MambaLMHeadModel``: ``config.json`` in mamba_ssm's keys ``d_model``, ``n_layer``,
  ``ssm_cfg`` with ``layer: 'Mamba2'``, ``pad_vocab_size_multiple``, ``tie_embeddings``, and no
  ``model_type``): the same architecture as transformers' Mamba-2, with mamba_ssm's defaults
  (``d_state`` 128, ``headdim`` 64, ``expand`` 2, ε 1e-5, tied head), the vocabulary padded as
  the embedding's rows are, and the embedding named ``backbone.embedding`` (transformers:
  ``embeddings``). Refused with a clear error: Mamba-1/-3 mixers (``ssm_cfg`` without
  ``layer: 'Mamba2'`` is Mamba-1 there), attention layers (``attn_layer_idx``), gated-MLP blocks
  (``d_intermediate`` > 0), ``D_has_hdim``, ``norm_before_gate``, LayerNorm blocks.
- **Llamba** (Cartesia's keys: ``d_model``, ``n_layer``, ``ssm_cfg``, ``mlp_cfg``,
  ``tie_embeddings``, ``pad_vocab_size_multiple``, ``lm_head_bias``, ``norm_epsilon``): layers of
  kind ``'discrete-mamba2'`` with Llama's MLP (``ffn='llama'``); the block norms' ε is Cartesia's
  hard-coded 1e-5 and the final norm's ``norm_epsilon``; the vocabulary is padded to
  ``pad_vocab_size_multiple`` as the embedding's rows are; a given ``ssm_cfg``/``mlp_cfg``
  replaces the defaults wholesale, as in the original; tying follows ``tie_embeddings`` only.

Anything else raises ValueError naming what was found.

``state_dict_from_hf`` maps the checkpoint's tensors (by their names in the file) onto
``MARLM(config)``'s names, strictly: every tensor of the file is used (a tied head's copy must
equal the embedding), every expected one must be present with the expected shape, else a
ValueError names the first offending tensor, its shape and the expected shape. The spike points'
thresholds of a spiking ``config`` are not in a pretrained file and are left out of the result:
load it with ``model.load_state_dict(state, strict=False)`` and expect only ``…neuron.a`` to be
missing.

``source_names`` makes the same checks on names and shapes alone and returns which tensor of the
file each model tensor is: ``from_pretrained`` checks a file's header with it, then reads each
tensor once, in the dtype it loads, instead of holding the whole file beside the model.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch

from .mar import MARLM, MARConfig

__all__ = [
    "ARCHITECTURES",
    "architecture_of",
    "check_tied_copy",
    "config_from_hf",
    "is_pretrained_config",
    "source_names",
    "state_dict_from_hf",
]

# Cartesia's LlambaConfig defaults; a given ssm_cfg falls back to DiscreteMamba2's arguments
_LLAMBA_SSM_CFG = {"d_state": 64, "n_v_heads": 32, "n_qk_heads": 32, "expand": 1,
                   "chunk_size": 128, "activation": "identity", "bias": False}  # fmt: skip
_DISCRETE_ARGS = {"d_state": 64, "n_qk_heads": 32, "n_v_heads": 32, "d_conv": 4, "expand": 1,
                  "activation": "identity", "bias": False, "conv_bias": True,
                  "chunk_size": 128}  # fmt: skip
_LLAMBA_MLP_CFG = {"intermediate_size": 14336, "bias": False, "act_fn": "silu"}
_LLAMBA_BLOCK_EPS = 1e-5  # hard-coded for both block norms in Cartesia's Block
# the kinds of LlambaConfig's and mamba_ssm MambaConfig's top-level numbers and flags
_LLAMBA_TOP = {"vocab_size": 1, "d_model": 1, "n_layer": 1, "pad_vocab_size_multiple": 1,
               "tie_embeddings": False, "lm_head_bias": False, "norm_epsilon": 1e-5}  # fmt: skip
_MAMBA_SSM_TOP = {"vocab_size": 1, "d_model": 1, "n_layer": 1, "d_intermediate": 0,
                  "pad_vocab_size_multiple": 1, "tie_embeddings": True, "rms_norm": True,
                  "residual_in_fp32": True}  # fmt: skip


ARCHITECTURES = ("mamba2", "llamba")  # what architecture_of can return


def architecture_of(config: Mapping[str, Any]) -> str | None:
    """The pretrained family a ``config.json`` dict describes: ``'mamba2'`` (Hugging Face,
    ``model_type`` 'mamba2'), ``'llamba'`` (``model_type`` 'llamba', or Cartesia's keys
    ``d_model`` and ``mlp_cfg`` without a ``model_type``), else ``None``. Only the family is
    recognised here; :func:`config_from_hf` checks the rest."""
    if not isinstance(config, Mapping):
        raise TypeError(f"config: expected the config.json dict, got {type(config).__name__}")
    model_type = config.get("model_type")
    if model_type == "mamba2" or (
        model_type is None and "d_model" in config and "ssm_cfg" in config
        and "mlp_cfg" not in config and (config["ssm_cfg"] or {}).get("layer") == "Mamba2"
    ):  # fmt: skip
        return "mamba2"  # transformers' or mamba_ssm's own (state-spaces/mamba2-*) keys
    if model_type == "llamba" or (
        model_type is None and "d_model" in config and "mlp_cfg" in config
    ):
        return "llamba"
    return None


def is_pretrained_config(config: Mapping[str, Any]) -> bool:
    """Whether spikemar reads the architecture of this ``config.json`` dict itself (a Hugging
    Face Mamba-2 or a Llamba), i.e. :func:`architecture_of` is not None."""
    return architecture_of(config) is not None


def config_from_hf(config: Mapping[str, Any]) -> MARConfig:
    """The dense :class:`MARConfig` of a Hugging Face Mamba-2 or Llamba ``config.json``."""
    family = architecture_of(config)
    if family == "mamba2":
        if config.get("model_type") == "mamba2":  # transformers' keys, its defaults where absent
            _check_types(config, _HF_MAMBA2_DEFAULTS)
            return _mamba2_config({**_HF_MAMBA2_DEFAULTS, **config})
        return _mamba2_config(_hf_keys(config))  # mamba_ssm's own keys
    if family == "llamba":
        return _llamba_config(config)
    model_type, architectures = config.get("model_type"), config.get("architectures")
    if model_type is None and "d_model" in config and "ssm_cfg" in config:
        layer = (config["ssm_cfg"] or {}).get("layer", "Mamba1")  # mamba_ssm's default
        raise ValueError(
            f"config: a mamba_ssm checkpoint with ssm_cfg layer {layer!r}: only its Mamba2 mixers "
            "are supported (Mamba-1/-3 are other architectures)"
        )
    raise ValueError(
        f"config: unknown architecture (model_type {model_type!r}, architectures "
        f"{architectures!r}); expected a Hugging Face Mamba-2 config (model_type 'mamba2') or a "
        "Llamba config in Cartesia's keys (d_model, n_layer, ssm_cfg, mlp_cfg), or mamba_ssm's "
        "own Mamba-2 config (d_model, n_layer, ssm_cfg with layer 'Mamba2')"
    )


def _check_types(config: Mapping[str, Any], defaults: Mapping[str, Any], where: str = "") -> None:
    """Each key of ``config`` that ``defaults`` has holds a value of its default's kind (a whole
    number, a number, a bool, a string, a (low, high) pair), else a ValueError naming the key:
    a malformed config.json was a bare TypeError from deep in the mapping."""
    for key, default in defaults.items():
        if key not in config or default is None:
            continue
        value, name = config[key], f"{where}{key}"
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if isinstance(default, bool):
            ok, kind = isinstance(value, bool), "true or false"
        elif isinstance(default, int):  # (a fraction is named by the checks that follow)
            ok, kind = number, "a whole number"
        elif isinstance(default, float):
            ok, kind = number, "a number"
        elif isinstance(default, str):
            ok, kind = isinstance(value, str), "a string"
        else:  # a (low, high) pair: a Δ limit (None: no clamp, as _mamba2_config reads it)
            ok = value is None or (
                isinstance(value, list | tuple)
                and len(value) == 2
                and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
            )
            kind = "a pair of numbers"
        if not ok:
            raise ValueError(f"config: {name} {value!r}: expected {kind}")


def _require(config: Mapping[str, Any], keys: tuple[str, ...], what: str) -> None:
    missing = [k for k in keys if k not in config]
    if missing:
        raise ValueError(f"config: a {what} config needs {missing}")


def _whole(value: Any, key: str) -> int:
    """A config number that must be a whole number ≥ 1 (``expand``: spikemar's d_inner is
    ``expand·d_model``), as an int; a fractional one is refused by name, not truncated."""
    whole = (isinstance(value, int | float) and not isinstance(value, bool)
             and math.isfinite(value) and value >= 1 and value == int(value))  # fmt: skip
    if not whole:
        raise ValueError(f"config: {key} {value!r}: only a whole number >= 1 is supported")
    return int(value)


# transformers' Mamba2Config defaults (4.57), which Mamba2ForCausalLM.from_pretrained applies to
# any key a config.json leaves out (n_groups 8 included)
_HF_MAMBA2_DEFAULTS = {"vocab_size": 32768, "hidden_size": 4096, "num_hidden_layers": 64,
                       "state_size": 128, "head_dim": 64, "num_heads": 128, "expand": 2,
                       "conv_kernel": 4, "n_groups": 8, "use_bias": False, "use_conv_bias": True,
                       "hidden_act": "silu", "layer_norm_epsilon": 1e-5, "rms_norm": True,
                       "residual_in_fp32": True, "time_step_limit": (0.0, math.inf),
                       "tie_word_embeddings": False}  # fmt: skip


def _mamba2_config(c: Mapping[str, Any]) -> MARConfig:
    if c.get("hidden_act", "silu") not in ("silu", "swish"):
        raise ValueError(f"config: hidden_act {c['hidden_act']!r}: only SiLU is supported")
    # rms_norm is not read: transformers' Mamba2Mixer stores it and applies its gated norm
    # whatever it says (modeling_mamba2.py, 4.57), and the norm's weight is in the file, so a
    # config.json with rms_norm=False is the same model. (mamba_ssm's own rms_norm and
    # ssm_cfg.rmsnorm do change its model: _hf_keys refuses them.)
    expand = _whole(c["expand"], "expand")
    d_inner = expand * c["hidden_size"]
    if "num_heads" in c and c["num_heads"] * c["head_dim"] != d_inner:
        raise ValueError(
            f"config: num_heads·head_dim = {c['num_heads']}·{c['head_dim']} must equal "
            f"expand·hidden_size = {d_inner}"
        )
    limit = c.get("time_step_limit", (0.0, math.inf))
    limit = (0.0, math.inf) if limit is None else tuple(float(v) for v in limit)
    return MARConfig(
        vocab_size=c["vocab_size"], d_model=c["hidden_size"], n_layers=c["num_hidden_layers"],
        d_state=c["state_size"], head_dim=c["head_dim"], expand=expand,
        d_conv=c["conv_kernel"], n_groups=c["n_groups"], layers="ssm", spikes=None, ffn=None,
        bias=bool(c.get("use_bias", False)), conv_bias=bool(c.get("use_conv_bias", True)),
        dt_limit=limit, norm_eps=float(c.get("layer_norm_epsilon", 1e-5)),
        tie_embeddings=bool(c.get("tie_word_embeddings", False)),
        residual_in_fp32=bool(c.get("residual_in_fp32", True)),
    )  # fmt: skip


# mamba_ssm's defaults: Mamba2's arguments (mamba_ssm/modules/mamba2.py) and MambaConfig's
_MAMBA_SSM_MAMBA2_ARGS = {"d_state": 128, "d_conv": 4, "expand": 2, "headdim": 64, "d_ssm": None,
                          "ngroups": 1, "D_has_hdim": False, "rmsnorm": True,
                          "norm_before_gate": False, "dt_limit": (0.0, math.inf), "bias": False,
                          "conv_bias": True, "chunk_size": 256}  # fmt: skip
# arguments that only initialise or place the weights: no effect on a loaded model's outputs
_MAMBA_SSM_INIT_ARGS = {"A_init_range", "dt_min", "dt_max", "dt_init_floor", "conv_init",
                        "use_mem_eff_path", "sequence_parallel"}  # fmt: skip


def _hf_keys(c: Mapping[str, Any]) -> dict[str, Any]:
    """A mamba_ssm ``MambaLMHeadModel`` config (Mamba-2 mixers) in transformers' Mamba-2 keys."""
    _require(c, ("d_model", "n_layer", "vocab_size"), "mamba_ssm Mamba-2")
    _check_types(c, _MAMBA_SSM_TOP)
    ssm = {k: v for k, v in (c.get("ssm_cfg") or {}).items() if k != "layer"}
    _check_types(ssm, _MAMBA_SSM_MAMBA2_ARGS, "ssm_cfg.")
    unknown = sorted(set(ssm) - set(_MAMBA_SSM_MAMBA2_ARGS) - _MAMBA_SSM_INIT_ARGS)
    if unknown:
        raise ValueError(f"config: ssm_cfg keys {unknown} are not arguments of mamba_ssm's Mamba2")
    args = {**_MAMBA_SSM_MAMBA2_ARGS, **ssm}
    d_model, expand = int(c["d_model"]), _whole(args["expand"], "ssm_cfg.expand")
    d_ssm = args["d_ssm"]
    refused = [  # (key, its value, whether it is refused, what it would need)
        ("attn_layer_idx", c.get("attn_layer_idx"), bool(c.get("attn_layer_idx")),
         "attention layers (mamba_ssm's MHA)"),
        ("d_intermediate", c.get("d_intermediate"), bool(c.get("d_intermediate")),
         "gated-MLP blocks"),
        ("rms_norm", c.get("rms_norm"), not c.get("rms_norm", True), "LayerNorm blocks"),
        ("ssm_cfg.d_ssm", d_ssm, d_ssm not in (None, expand * d_model),
         "an SSM on part of the channels (the rest a gated MLP)"),
        ("ssm_cfg.D_has_hdim", args["D_has_hdim"], bool(args["D_has_hdim"]), "a D per channel"),
        ("ssm_cfg.rmsnorm", args["rmsnorm"], not args["rmsnorm"], "a mixer without its gated norm"),
        ("ssm_cfg.norm_before_gate", args["norm_before_gate"], bool(args["norm_before_gate"]),
         "the norm before the gate"),
    ]  # fmt: skip
    for key, value, bad, what in refused:
        if bad:
            raise ValueError(f"config: {key} = {value!r}: {what} is not supported")
    vocab = int(c["vocab_size"])
    multiple = _whole(c.get("pad_vocab_size_multiple", 8), "pad_vocab_size_multiple")
    vocab += -vocab % multiple  # MambaLMHeadModel pads the embedding's rows
    return {
        "vocab_size": vocab, "hidden_size": d_model, "num_hidden_layers": int(c["n_layer"]),
        "state_size": int(args["d_state"]), "head_dim": int(args["headdim"]), "expand": expand,
        "conv_kernel": int(args["d_conv"]), "n_groups": int(args["ngroups"]),
        "use_bias": bool(args["bias"]), "use_conv_bias": bool(args["conv_bias"]),
        "time_step_limit": args["dt_limit"], "layer_norm_epsilon": 1e-5,
        "tie_word_embeddings": bool(c.get("tie_embeddings", True)),
        "residual_in_fp32": bool(c.get("residual_in_fp32", True)),
    }  # fmt: skip


def _llamba_config(c: Mapping[str, Any]) -> MARConfig:
    _require(c, ("vocab_size", "d_model"), "Llamba")
    _check_types(c, _LLAMBA_TOP)
    for key in ("ssm_cfg", "mlp_cfg"):
        if not isinstance(c.get(key) or {}, Mapping):
            raise ValueError(f"config: {key} {c[key]!r}: expected an object")
    ssm = {**_DISCRETE_ARGS, **(c.get("ssm_cfg") or _LLAMBA_SSM_CFG)}
    mlp = dict(c.get("mlp_cfg") or _LLAMBA_MLP_CFG)
    _check_types(ssm, _DISCRETE_ARGS, "ssm_cfg.")
    _check_types(mlp, _LLAMBA_MLP_CFG, "mlp_cfg.")
    missing = [k for k in ("intermediate_size", "bias", "act_fn") if k not in mlp]
    if missing:
        raise ValueError(f"config: Llamba's mlp_cfg lacks {missing} (Llama's MLP has no defaults)")
    if mlp["act_fn"] not in ("silu", "swish"):
        raise ValueError(f"config: mlp_cfg act_fn {mlp['act_fn']!r}: only SiLU is supported")
    if ssm["activation"] not in ("identity", "silu", "swish"):  # DiscreteMamba2's only three
        raise ValueError(f"config: ssm_cfg activation {ssm['activation']!r}: DiscreteMamba2 "
                         "takes 'identity', 'silu' or 'swish'")  # fmt: skip
    d_model, expand = int(c["d_model"]), _whole(ssm["expand"], "ssm_cfg.expand")
    d_inner = expand * d_model
    if d_inner % _whole(ssm["n_v_heads"], "ssm_cfg.n_v_heads"):
        raise ValueError(f"config: n_v_heads {ssm['n_v_heads']} does not divide {d_inner}")
    multiple = _whole(c.get("pad_vocab_size_multiple", 8), "pad_vocab_size_multiple")
    vocab = multiple * math.ceil(int(c["vocab_size"]) / multiple)
    tied = bool(c.get("tie_embeddings", False))
    return MARConfig(
        vocab_size=vocab, d_model=d_model, n_layers=int(c.get("n_layer", 32)),
        d_state=int(ssm["d_state"]), head_dim=d_inner // int(ssm["n_v_heads"]), expand=expand,
        d_conv=int(ssm["d_conv"]), n_groups=int(ssm["n_qk_heads"]), layers="discrete-mamba2",
        spikes=None, ffn="llama", ffn_hidden=int(mlp["intermediate_size"]),
        ffn_bias=bool(mlp["bias"]), bias=bool(ssm["bias"]), conv_bias=bool(ssm["conv_bias"]),
        conv_activation={"swish": "silu"}.get(ssm["activation"], ssm["activation"]),
        norm_eps=_LLAMBA_BLOCK_EPS, final_norm_eps=float(c.get("norm_epsilon", 1e-5)),
        tie_embeddings=tied, head_bias=bool(c.get("lm_head_bias", False)) and not tied,
    )  # fmt: skip


# spikemar name → name in the file, per architecture (layer names after "layers.{i}.")
_MAMBA2_NAMES = [
    (r"^embed\.", "backbone.embeddings."),
    (r"^norm\.", "backbone.norm_f."),
    (r"^head\.", "lm_head."),
    (r"^layers\.(\d+)\.norm1\.", r"backbone.layers.\1.norm."),
    (r"^layers\.(\d+)\.mixer\.conv\.", r"backbone.layers.\1.mixer.conv1d."),
    (r"^layers\.(\d+)\.mixer\.", r"backbone.layers.\1.mixer."),
]
# mamba_ssm's MambaLMHeadModel: transformers' names but for the embedding
_MAMBA_SSM_NAMES = [(r"^embed\.", "backbone.embedding."), *_MAMBA2_NAMES[1:]]
_LLAMBA_NAMES = [
    (r"^embed\.", "backbone.embedding."),
    (r"^norm\.", "backbone.final_layernorm."),
    (r"^head\.", "lm_head."),
    (r"^layers\.(\d+)\.norm1\.", r"backbone.layers.\1.input_layernorm."),
    (r"^layers\.(\d+)\.norm2\.", r"backbone.layers.\1.post_attention_layernorm."),
    (r"^layers\.(\d+)\.mixer\.", r"backbone.layers.\1.mixer."),
    (r"^layers\.(\d+)\.ffn\.", r"backbone.layers.\1.mlp."),
]
_SPIKE_POINT = re.compile(r"\.spike_(in|out|hidden)\.")


def _renamer(rules: list[tuple[str, str]]) -> Callable[[str], str]:
    compiled = [(re.compile(pattern), repl) for pattern, repl in rules]

    def rename(name: str) -> str:
        for pattern, repl in compiled:
            if pattern.match(name):
                return pattern.sub(repl, name, count=1)
        raise AssertionError(f"no source name for {name}")  # the rules cover every model name

    return rename


def source_names(
    config: MARConfig, tensors: Mapping[str, Any]
) -> tuple[dict[str, str], str | None]:
    """Which tensor of a Mamba-2 or Llamba checkpoint each of ``MARLM(config)``'s dense tensors
    is: ``({model name: name in the file}, tied_copy)``, checked strictly on names and shapes
    alone (see the module docstring), so ``tensors`` may be meta tensors (a file's header): no
    value is read. A tied head is not in the dict (it is the embedding); ``tied_copy`` names a
    tied head saved beside the embedding in the file, whose values must equal the embedding's
    (:func:`check_tied_copy`), else None."""
    if not isinstance(config, MARConfig):
        raise TypeError(f"config: expected a MARConfig, got {type(config).__name__}")
    kinds = set(config.layer_kinds())
    if kinds == {"ssm"} and config.ffn is None:
        native = "backbone.embedding.weight" in tensors  # mamba_ssm's file, not transformers'
        rename = _renamer(_MAMBA_SSM_NAMES if native else _MAMBA2_NAMES)
    elif kinds == {"discrete-mamba2"} and config.ffn == "llama":
        rename = _renamer(_LLAMBA_NAMES)
    else:
        raise ValueError(
            f"config: layers {sorted(kinds)} with ffn {config.ffn!r} is neither a Hugging Face "
            "Mamba-2 (all 'ssm', ffn None) nor a Llamba (all 'discrete-mamba2', ffn 'llama') "
            "architecture"
        )
    with torch.device("meta"):  # names and shapes only: nothing is allocated
        expected = MARLM(config.dense()).state_dict()  # spike points aside
    names: dict[str, str] = {}
    tied = config.tie_embeddings
    for name, target in expected.items():
        if _SPIKE_POINT.search(name):
            continue  # a student's thresholds: not in a pretrained checkpoint
        if tied and name == "head.weight":
            continue  # the embedding's matrix (checked below)
        source = rename(name)
        if source not in tensors:
            also = ""
            if name == "embed.weight" and kinds == {"ssm"}:  # neither layout's embedding found
                also = " or mamba_ssm's 'backbone.embedding.weight'"
            raise ValueError(
                f"tensors: missing {source!r}{also} (expected shape {tuple(target.shape)}, for "
                f"{name})"
            )
        t = tensors[source]
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(target.shape):
            raise ValueError(
                f"tensors: {source!r} has shape {_shape(t)}, expected {tuple(target.shape)} "
                f"(for {name})"
            )
        names[name] = source
    tied_copy = None
    if tied and rename("head.weight") in tensors:  # a tied head saved beside the embedding
        tied_copy = rename("head.weight")
        shape, embedding = _shape(tensors[tied_copy]), tuple(expected["embed.weight"].shape)
        if shape != embedding:
            raise ValueError(
                f"tensors: {tied_copy!r} has shape {shape}, expected {embedding} (the config "
                "ties it to the embedding)"
            )
    extra = sorted(set(tensors) - set(names.values()) - {tied_copy})
    if extra:
        raise ValueError(
            f"tensors: unexpected {extra[0]!r} (shape {_shape(tensors[extra[0]])}) is not part "
            f"of the {'Llamba' if 'discrete-mamba2' in kinds else 'Mamba-2'} architecture the "
            f"config describes ({len(extra)} unused tensors)"
        )
    return names, tied_copy


def _shape(t: Any) -> tuple[int, ...] | str:
    """A file entry's shape for an error, or its type's name when it is not a tensor."""
    return tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__


def check_tied_copy(name: str, head: torch.Tensor, embedding: torch.Tensor) -> None:
    """A tied head saved in the file as ``name`` (``head``) must hold the embedding's values."""
    if not torch.equal(head, embedding):
        raise ValueError(f"tensors: {name!r} differs from the embedding, but the config ties them")


def state_dict_from_hf(
    config: MARConfig, tensors: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``MARLM(config)``'s state dict (without spike-point thresholds) from a Mamba-2 or Llamba
    checkpoint's ``tensors``, strictly (see the module docstring)."""
    names, tied_copy = source_names(config, tensors)
    out = {name: tensors[source] for name, source in names.items()}
    if tied_copy is not None:
        check_tied_copy(tied_copy, tensors[tied_copy], out["embed.weight"])
    if config.tie_embeddings:
        out["head.weight"] = out["embed.weight"]
    return out
