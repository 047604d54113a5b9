"""Pretrained SSM language models in: ``from_pretrained`` reads a checkpoint directory or Hub id.

    model = from_pretrained("path/to/dir")     # dense: the pretrained model itself
    model = from_pretrained("state-spaces/mamba2-130m", spikes={"T": 4})  # + MAR's spike points
    model.tokenizer                            # the directory's tokenizer (spikemar.tokenizer)

A checkpoint directory is what Hugging Face's ``save_pretrained`` writes (and what the Hub
serves): ``config.json``, the weights as ``model.safetensors`` or ``pytorch_model.bin`` (or shards
of either named by ``model.safetensors.index.json`` / ``pytorch_model.bin.index.json``), and a
tokenizer (``tokenizer.json``, or files transformers' AutoTokenizer reads). Two families are
understood, through :mod:`spikemar.models.pretrained`: Hugging Face Mamba-2 (``model_type``
``mamba2``) and Cartesia's Llamba (its own config keys). Names are mapped strictly: every tensor
of the file is used and every expected one must be there with its shape.

Memory: the model is built on the meta device (no random initial weights), and each tensor of
the file is read on its own, cast to the loaded dtype and assigned into it, so the peak is about
the loaded dtype's bytes per parameter plus one tensor (a 208 M-parameter bfloat16 Llamba: 2.4 B
per parameter in bfloat16, 4.75 in float32; building it in float32 and casting took 6.4); the
spike points' thresholds, which no file holds, are built as ``MARLM(config)`` builds them. Each
tensor is cast from the file's dtype straight to the loaded one (a float64 file loads as float64
without a float32 rounding). safetensors files are read with pread(2) (safetensors 0.8 on; before,
through a mapping opened per tensor); a ``.bin`` in torch's zip format is mapped per tensor too
(the pages a mapping read count in the process's resident memory until it goes); one in the
legacy format is read whole.

Anything that is not a local directory is taken as a Hub id and fetched with ``huggingface_hub``
(into its usual cache) when the machine has a network; offline (no network, or
``HF_HUB_OFFLINE=1``) it says so in one line, unless the id is already in the cache.

Every bad directory gives one error naming the directory and the problem: no config.json, a
config that is not JSON, an unknown architecture, no weights file, a shard the index names but
the folder lacks, a missing or unexpected tensor, a wrong shape, no tokenizer (pass
``tokenizer=False`` to load the weights alone).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..tokenizer import HFTokenizer, is_lfs_pointer, load_tokenizer
from .assembly import assign_weights, build_on_meta, check_no_meta
from .common import SpikeConfig
from .mar import MARLM, MARConfig, point_module

__all__ = [
    "from_pretrained",
    "is_hub_id",
    "read_pretrained_config",
    "read_pretrained_tensors",
    "resolve_pretrained",
    "resolve_tokenizer",
    "tokenizer_from",
]

WEIGHT_FILES = (("model", "safetensors"), ("pytorch_model", "bin"))
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# what a model needs from a Hub repository: config, weights, tokenizer files
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt"]
# a tokenizer's files in a Hub repository (tokenizers' JSON, transformers' slow formats)
# (and config.json, which AutoTokenizer reads for a repository whose tokenizer_config.json
# names no class)
_TOKENIZER_PATTERNS = ["tokenizer*", "special_tokens_map.json", "vocab.json", "vocab.txt",
                       "merges.txt", "*.model", "*.tiktoken", "config.json"]  # fmt: skip


# the end of from_pretrained's error for a directory without a tokenizer: the Python API's way
# out, which the command lines replace by theirs (command_line_hint)
NO_TOKENIZER_HINT = "; pass tokenizer=False to load the weights alone"
_FLAG_HINT = "; pass --tokenizer DIR|FILE|OWNER/NAME"


def command_line_hint(message: str) -> str:
    """An error message as a command with a ``--tokenizer`` option says it: its way out of a
    checkpoint without a tokenizer instead of the Python API's."""
    return message.replace(NO_TOKENIZER_HINT, _FLAG_HINT)


def checkpoint_or_tokenizer_line(
    message: str, tokenizer_given: bool, checkpoints: Sequence[str | os.PathLike] = ()
) -> str:
    """A loader's error on one line as a command with ``--checkpoint`` and ``--tokenizer`` says
    it: a ``tokenizer:`` error is ``--tokenizer``'s where one was given, else the checkpoint's
    own (a directory that ships none: with the command's way out); ``path_or_id:`` and an error
    that begins with a checkpoint's path (``DIR: no config.json ...``; ``checkpoints``: the
    paths the command was given, which may read as plain names) are ``--checkpoint``'s; others
    unchanged."""
    message = " ".join(command_line_hint(message).split())
    name, sep, rest = message.partition(": ")
    if name == "tokenizer":
        flag = "--tokenizer" if tokenizer_given else "--checkpoint"
        return f"{flag}: {rest}"
    if name == "path_or_id":
        return f"--checkpoint: {rest}"
    given = {Path(c) for c in checkpoints}
    if sep and (Path(name) in given or not (name.isidentifier() or name.startswith("--"))):
        return f"--checkpoint: {message}"  # a path: the checkpoint directory's
    return message


def is_hub_id(name: str | os.PathLike) -> bool:
    """Whether ``name`` has the form of a Hugging Face Hub id (``owner/name``)."""
    return bool(_HUB_ID.match(str(name)))


def resolve_pretrained(path_or_id: str | os.PathLike, revision: str | None = None) -> Path:
    """A local checkpoint directory, or the Hub snapshot of ``path_or_id`` (downloaded once)."""
    path = Path(path_or_id)
    if path.is_dir():
        return path
    if path.exists():
        raise NotADirectoryError(f"path_or_id: {path} is a file; expected a checkpoint directory")
    name = str(path_or_id)
    folder = _snapshot(name, revision, _HUB_PATTERNS, "path_or_id")
    if not any((folder / f"{stem}.{ext}").exists() or (folder / f"{stem}.{ext}.index.json")
               .exists() for stem, ext in WEIGHT_FILES):  # fmt: skip
        folder = _snapshot(name, revision, ["*.bin"], "path_or_id")
    return folder


def resolve_tokenizer(source: str | os.PathLike, revision: str | None = None) -> Path:
    """A tokenizer's local directory or file (``tokenizer.json``), or the tokenizer files of a
    Hub repository (``owner/name``, downloaded once; its weights are not fetched): for
    checkpoints that ship none, as state-spaces/mamba2-130m uses EleutherAI/gpt-neox-20b's."""
    if not str(source).strip():
        raise ValueError("tokenizer: expected a directory, a tokenizer.json or a Hub id, got ''")
    path = Path(source)
    if path.exists():
        return path
    return _snapshot(str(source), revision, _TOKENIZER_PATTERNS, "tokenizer")


def tokenizer_from(source: str | os.PathLike) -> Any:
    """The tokenizer of a directory, a ``tokenizer.json`` or a Hub id (see
    :func:`resolve_tokenizer`)."""
    return load_tokenizer(resolve_tokenizer(source))


def _snapshot(name: str, revision: str | None, patterns: list[str], argument: str) -> Path:
    """``huggingface_hub.snapshot_download`` of ``patterns`` from the Hub repository ``name``,
    its failures as one line each naming ``argument``."""
    if not _HUB_ID.match(name):
        raise FileNotFoundError(
            f"{argument}: no directory at {name}, and it is not a Hub id like 'owner/name'"
        )
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            HfHubHTTPError,
            HFValidationError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError as err:  # pragma: no cover - a dependency of spikemar
        raise ImportError(f"{argument}: Hub ids need huggingface_hub") from err
    try:
        return Path(snapshot_download(name, revision=revision, allow_patterns=patterns))
    except LocalEntryNotFoundError as err:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        why = "HF_HUB_OFFLINE is set" if offline else "the Hub cannot be reached (no network?)"
        raise ConnectionError(
            f"{argument}: {name!r} is not a local directory and {why}, and it is not in the "
            "local Hugging Face cache; download it on a machine with a network "
            "(huggingface-cli download) or pass a directory"
        ) from err
    except HFValidationError as err:  # owner/name in form, but not a name the Hub allows
        raise FileNotFoundError(
            f"{argument}: no directory at {name}, and it is not a valid Hub id ({_first_line(err)})"
        ) from err
    except HfHubHTTPError as err:  # the Hub answered: say why in one line (its text has several)
        if isinstance(err, GatedRepoError):
            why = "a gated repository: accept its terms on the Hub and log in (hf auth login)"
        elif isinstance(err, RepositoryNotFoundError):
            why = "no such repository, or a private one (log in with hf auth login)"
        elif isinstance(err, RevisionNotFoundError):
            why = f"no revision {revision!r} in the repository"
        else:
            why = _first_line(err)
        raise ConnectionError(
            f"{argument}: no directory at {name}, and the Hub refused it as a Hub id: {why}"
        ) from err


def _first_line(err: Exception) -> str:
    """The first non-empty line of an error's text (huggingface_hub's span several)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def read_pretrained_config(directory: str | os.PathLike) -> dict[str, Any]:
    """``config.json`` of a checkpoint directory as a dict."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: no config.json (not a checkpoint directory)")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not JSON ({err})") from err
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def _weight_files(directory: Path) -> tuple[str, list[Path]]:
    """The format and files of a directory's weights, in transformers' order: safetensors before
    bin, a single file before an index's shards (``save_pretrained`` into a folder that held
    shards leaves their index behind beside the new single file)."""
    for stem, ext in WEIGHT_FILES:
        single = directory / f"{stem}.{ext}"
        if single.is_file():
            return ext, [single]
        index = directory / f"{stem}.{ext}.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
                raise ValueError(f"{index}: not a weight index (no weight_map: {err})") from err
            if not isinstance(weight_map, dict) or not all(
                isinstance(f, str) for f in weight_map.values()
            ):
                raise ValueError(f"{index}: not a weight index (weight_map is not an object of "
                                 "tensor names to file names)")  # fmt: skip
            files = [directory / f for f in sorted(set(weight_map.values()))]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise FileNotFoundError(
                    f"{directory}: {index.name} names {len(files)} shards, missing "
                    f"{', '.join(missing[:3])}"
                )
            return ext, files
    raise FileNotFoundError(
        f"{directory}: no weights (expected model.safetensors or pytorch_model.bin, or their "
        "sharded form with an .index.json)"
    )


class _WeightReader:
    """A checkpoint directory's weights, read one tensor at a time: ``meta`` holds every
    entry's name, shape and dtype (meta tensors, from the files' headers), ``read`` one tensor
    into memory of its own. Nothing more than the tensor asked for is ever held."""

    def __init__(self, directory: Path) -> None:
        self.ext, files = _weight_files(directory)
        self.meta: dict[str, Any] = {}
        self._file: dict[str, Path] = {}
        self._whole: dict[Path, Mapping] = {}  # a legacy-format .bin, read whole
        # a zip-format .bin's mapping, and the bytes read through it since it was made
        self._mapped: dict[Path, tuple[Mapping, int]] = {}
        for f in files:
            if is_lfs_pointer(f):
                raise ValueError(f"{f}: a Git LFS pointer, not the weights (a clone without "
                                 "git-lfs: run git lfs pull in it, or download the repository "
                                 "with huggingface-cli)")  # fmt: skip
            with self._reading(f):
                if self.ext == "safetensors":
                    from safetensors import safe_open

                    with safe_open(str(f), framework="pt") as handle:
                        # get_tensor maps the file: the header's shape and dtype, no data read
                        part = {k: handle.get_tensor(k) for k in handle.keys()}
                else:
                    part, mapped = _load_bin(f)
                    if mapped:
                        self._mapped[f] = (part, 0)
                    else:
                        self._whole[f] = part
            if not isinstance(part, Mapping):
                raise ValueError(f"{f}: expected a mapping of tensor names to tensors")
            twice = self.meta.keys() & part.keys()
            if twice:
                raise ValueError(
                    f"{directory}: tensor {sorted(twice)[0]!r} is in more than one shard"
                )
            for k, t in part.items():
                self.meta[k] = torch.empty_like(t, device="meta") if torch.is_tensor(t) else t
                self._file[k] = f

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor ``name`` in ``dtype`` (None: the file's), in memory of its own: not a view
        of a mapped file, which a checkpoint rewritten in place would change under the model."""
        f = self._file[name]
        with self._reading(f):
            if self.ext == "safetensors":
                handle, owned = _open_safetensors(f)
                with handle:  # per tensor: a mapping goes (with the pages it read) at once
                    t = handle.get_tensor(name)
            elif f in self._whole:
                t, owned = self._whole[f][name], True  # the reader's dict goes with the reader
            else:
                t, owned = self._mapped_tensor(f, name), False
            if not torch.is_tensor(t):
                return t
            # contiguous, as a copy into a built model made it: a .bin may hold a transposed
            # view, and a strided weight computes other roundings (and slower)
            t = t.to(dtype=t.dtype if dtype is None else dtype, copy=not owned,
                     memory_format=torch.contiguous_format)  # fmt: skip
            return t.contiguous()  # to() keeps an owned tensor of the same dtype as it is

    _REMAP_BYTES = 1 << 28

    def _mapped_tensor(self, f: Path, name: str) -> torch.Tensor:
        """``name`` from a zip-format .bin's mapping, mapped afresh after every 256 MiB read
        through it: the pages a mapping has read stay resident until it goes, and a mapping per
        tensor would load the file's index once per tensor (minutes for a few hundred)."""
        part, read = self._mapped[f]
        if read >= self._REMAP_BYTES:
            part, read = _load_bin(f)[0], 0
        t = part[name]
        if torch.is_tensor(t):
            read += t.numel() * t.element_size()
        self._mapped[f] = (part, read)
        return t

    @staticmethod
    @contextlib.contextmanager
    def _reading(f: Path) -> Iterator[None]:
        """A file that safetensors or torch cannot read as one ValueError naming it."""
        try:
            yield
        except Exception as err:  # safetensors and torch raise several kinds for a bad file
            raise ValueError(f"{f}: unreadable weights ({type(err).__name__}: "
                             f"{_first_line(err)})") from err  # fmt: skip


def _open_safetensors(f: Path) -> tuple[Any, bool]:
    """A safetensors file opened to read tensors, and whether they come in memory of their own:
    read with pread(2) where safetensors offers it (0.8 on), else views of the mapped file."""
    from safetensors import safe_open

    try:
        return safe_open(str(f), framework="pt", backend="pread"), True
    except TypeError:  # an older safetensors: no backend argument
        return safe_open(str(f), framework="pt"), False


def _load_bin(f: Path) -> tuple[Any, bool]:
    """A ``pytorch_model.bin``'s dict and whether its tensors are mapped from the file (read as
    they are used: torch's zip format), else read whole (the legacy format)."""
    try:
        return torch.load(f, map_location="cpu", weights_only=True, mmap=True), True
    except RuntimeError as err:
        if "mmap" not in str(err):  # torch refuses mmap for the legacy format, saying so
            raise
        return torch.load(f, map_location="cpu", weights_only=True), False


def read_pretrained_tensors(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory's weights (single file or shards), on the CPU."""
    reader = _WeightReader(Path(directory))
    return {name: reader.read(name) for name in reader.meta}


def _spike_config(spikes: SpikeConfig | Mapping[str, Any] | None) -> SpikeConfig | None:
    if spikes is None or isinstance(spikes, SpikeConfig):
        return spikes
    if isinstance(spikes, Mapping):
        known = [k for k in inspect.signature(SpikeConfig).parameters]
        unknown = sorted(str(k) for k in spikes if k not in known)
        if unknown:
            raise ValueError(f"spikes: unknown keys {unknown}; SpikeConfig takes {known}")
        return SpikeConfig(**spikes)
    raise TypeError(f"spikes: expected None, a SpikeConfig or a dict, got {type(spikes).__name__}")


# the dtypes a model computes in (float8 types are storage formats: no norm or matmul runs in them)
RUNNABLE_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _dtype(dtype: torch.dtype | str | None, argument: str = "dtype") -> torch.dtype:
    if dtype is None:
        return torch.float32
    named = getattr(torch, dtype.removeprefix("torch."), None) if isinstance(dtype, str) else dtype
    if named not in RUNNABLE_DTYPES:
        raise ValueError(f"{argument}: expected a floating torch dtype a model computes in "
                         "(float32, float64, bfloat16, float16), its name or 'auto', got "
                         f"{dtype!r}")  # fmt: skip
    return named


def _checkpoint_dtype(config: Mapping[str, Any], tensors: Mapping[str, Any]) -> torch.dtype:
    """What ``dtype='auto'`` loads, as transformers does: the dtype ``config.json`` names
    (``dtype``, or ``torch_dtype`` as older transformers write it), else the first floating
    tensor's, else float32."""
    for key in ("dtype", "torch_dtype"):
        name = config.get(key)
        if isinstance(name, str):
            try:
                return _dtype(name)
            except ValueError:
                pass  # not a floating dtype's name: the weights say
    for t in tensors.values():
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            return t.dtype
    return torch.float32


def from_pretrained(
    path_or_id: str | os.PathLike,
    *,
    spikes: SpikeConfig | Mapping[str, Any] | None = None,
    dtype: torch.dtype | str | None = None,
    tokenizer: bool | str | os.PathLike = True,
    revision: str | None = None,
    torch_dtype: torch.dtype | str | None = None,
) -> MARLM:
    """A pretrained Hugging Face Mamba-2 or Llamba as a spikemar ``MARLM``, in eval mode.

    ``spikes`` None gives the dense model (logits equal to the original's); a ``SpikeConfig``
    (or its keyword dict) puts MAR's spike points in with the same weights and uncalibrated
    thresholds (``spikemar convert`` calibrates them). ``dtype`` casts the weights: float32 by
    default (as transformers' ``from_pretrained``), a floating dtype or its name, or ``'auto'``
    for the checkpoint's own (``config.json``'s ``dtype``/``torch_dtype``, else the weights');
    ``torch_dtype`` is its older name in transformers, accepted the same. ``tokenizer``: True
    loads the directory's own tokenizer as ``model.tokenizer``
    (required: its absence is an error); False leaves ``model.tokenizer`` None; a directory, a
    ``tokenizer.json`` or a Hub id takes the tokenizer from there (for a checkpoint that ships
    none: state-spaces/mamba2-130m's is ``EleutherAI/gpt-neox-20b``; its end-of-text token from
    that source's ``tokenizer_config.json``, else the checkpoint's ``config.json``).
    """
    if tokenizer is None:  # as False (it was a bool flag)
        tokenizer = False
    if not isinstance(tokenizer, bool | str | os.PathLike):
        raise TypeError(f"tokenizer: expected True, False, a path or a Hub id, got "
                        f"{type(tokenizer).__name__}")  # fmt: skip
    spike_config = _spike_config(spikes)
    if torch_dtype is not None:  # transformers' older name for dtype
        if dtype is not None:
            raise ValueError(f"dtype {dtype!r} and torch_dtype {torch_dtype!r}: give one (they "
                             "are the same setting)")  # fmt: skip
        dtype, argument = torch_dtype, "torch_dtype"
    else:
        argument = "dtype"
    auto = isinstance(dtype, str) and dtype == "auto"
    cast = None if auto else _dtype(dtype, argument)
    directory = resolve_pretrained(path_or_id, revision)
    hf_config = read_pretrained_config(directory)
    from .pretrained import check_tied_copy, config_from_hf, source_names

    try:
        config = config_from_hf(hf_config)
    except ValueError as err:
        raise ValueError(f"{directory}: {err}") from err
    tok = None
    if tokenizer is True:
        try:
            tok = load_tokenizer(directory)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{err}{NO_TOKENIZER_HINT}") from err
    elif tokenizer is not False:
        tok = tokenizer_from(tokenizer)
        eos = hf_config.get("eos_token_id")  # the checkpoint's, where the source names none
        if tok.eos_id is None and isinstance(tok, HFTokenizer) and isinstance(eos, int):
            if 0 <= eos < tok.vocab_size:
                tok = tok.with_eos_id(eos)
    reader = _WeightReader(directory)  # the headers: names, shapes, dtypes
    if cast is None:  # 'auto'
        cast = _checkpoint_dtype(hf_config, reader.meta)
        if cast not in RUNNABLE_DTYPES:
            raise ValueError(f"{argument}: 'auto' is the checkpoint's {cast}, which no model "
                             "computes in; pass float32 or bfloat16")  # fmt: skip
    try:
        names, tied_copy = source_names(config, reader.meta)  # checked before anything is read
        state = {}
        for name, source in names.items():
            if name == "embed.weight" and tied_copy is not None:  # compared in the file's dtype
                embedding = reader.read(source)
                check_tied_copy(tied_copy, reader.read(tied_copy), embedding)
                state[name] = embedding.to(cast)
                del embedding
            else:  # in the model's dtype as it is read: no copy of the whole file is held
                state[name] = reader.read(source, cast)
        config.spikes = spike_config
        model = _assemble(config, state, cast)
    except ValueError as err:
        raise ValueError(f"{directory}: {err}") from err
    del state
    model.eval()
    model.tokenizer = tok
    return model


def _assemble(config: MARConfig, state: dict[str, torch.Tensor], dtype: torch.dtype) -> MARLM:
    """``MARLM(config)`` holding ``state``'s tensors themselves (in ``dtype``), without
    allocating the random initial weights the file replaces: the model is built on the meta
    device, ``state`` assigned into it, and what the file cannot hold (a student's spike points)
    built for real, as ``MARLM(config).to(dtype)`` would have them."""
    model = build_on_meta(lambda: MARLM(config))
    # the tie kept (assign_weights shares the head's Parameter again), state's dtype kept
    missing, unexpected = assign_weights(model, state, keep_layout=False)
    # the mapping covers the dense model; a student's new tensors are its spike points' only
    owned = {f"{site.name}.{key}" for site in model.spike_points()
             for key in site.module.state_dict()}  # fmt: skip
    missing = sorted(set(missing) - owned)
    if missing or unexpected:
        raise ValueError(f"the mapped weights do not fit the model (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")  # fmt: skip
    for site in list(model.spike_points()):
        # every point is the config's spikes (a pretrained config sets no per-point settings,
        # config.points); its threshold starts at spikes.v_threshold, built in float32 and
        # cast, as MARLM(config) builds it and .to(dtype) casts it
        channels = next(iter(site.projections.values())).in_features
        point = point_module(channels, "spike", config.spikes).to(dtype)
        parent, _, attr = site.name.rpartition(".")
        setattr(model.get_submodule(parent), attr, point)
    check_no_meta(model, "from_pretrained")
    return model
