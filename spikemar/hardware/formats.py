"""The files spikemar's hardware exporters write, their format versions, and the checks that
readers and writers share.

Every file carries its format and version: the netx HDF5 file of :func:`export_lava` as root
attributes ``format`` = ``spikemar-netx`` and ``version``; the NIR file of :func:`export_nir` as
graph ``metadata`` (``spikemar_format`` = ``spikemar-nir``, ``spikemar_version``), and every node
spikemar reads back as ``spikemar_version`` in its own metadata; a MAR segment folder's
``manifest.json`` as ``format``/``version``. A reader refuses a version newer than it knows with
"written by a newer spikemar (format N); upgrade spikemar" rather than misreading it.
"""

from __future__ import annotations

import os

from .._numbers import integer

__all__ = [
    "NETX_FORMAT",
    "NETX_VERSION",
    "NIR_FORMAT",
    "NIR_VERSION",
    "check_block_input",
    "check_input_shape",
    "check_version",
]

NETX_FORMAT = "spikemar-netx"
NETX_VERSION = 1
NIR_FORMAT = "spikemar-nir"
NIR_VERSION = 1


def check_input_shape(input_shape: object) -> tuple[int, ...]:
    """One sample's input shape, ``(features,)`` or ``(channels, height, width)``, as a tuple of
    ints; else a ValueError naming ``input_shape``."""
    ok = isinstance(input_shape, tuple | list) and len(input_shape) in (1, 3)
    # NumPy's integers as Python's (a shape read from an array's metadata), a bool refused
    sizes = tuple(integer(n) for n in input_shape) if ok else ()
    if not ok or any(n is None or n < 1 for n in sizes):
        raise ValueError(
            "input_shape: expected the per-sample shape (features,) or (channels, height, "
            f"width) of positive ints, got {input_shape!r}"
        )
    return sizes


def check_version(found: object, current: int, path: str | os.PathLike, what: str) -> int:
    """The version ``found`` in the file at ``path`` (a ``what``: "netx file", "NIR file"),
    checked: an int from 1 to ``current``; newer is refused with the advice to upgrade."""
    try:
        version = int(found)  # h5py hands back numpy integers
    except (TypeError, ValueError):
        raise ValueError(f"path: {path} is not a spikemar {what} (format version "
                         f"{found!r})") from None  # fmt: skip
    if version > current:
        raise ValueError(
            f"path: {path} was written by a newer spikemar (format {version}; this one reads "
            f"{what}s up to format {current}); upgrade spikemar"
        )
    if version < 1:
        raise ValueError(f"path: {path} has {what} format {version}, which no spikemar wrote")
    return version


def check_block_input(block, sample_shape: tuple[int, ...], *, name: str = "input_shape") -> None:
    """Whether one sample of shape ``sample_shape`` fits the first ``block`` (a
    :class:`~spikemar.hardware.fixed_point.Block`) of a network: a Linear needs its
    ``in_features`` (after flattening, if the block flattens), a Conv2d a (C, H, W) input with its
    ``in_channels``. Else a ValueError naming ``name``, rather than a matmul's shape error."""
    shape = tuple(int(n) for n in sample_shape)
    fan_in = int(block.weight.shape[1])
    synapse = next(iter(block.modules), block.path)
    if block.synapse == "dense":
        features = 1
        for n in shape if block.flatten else shape[-1:]:
            features *= n
        if features != fan_in or (len(shape) > 1 and not block.flatten):
            raise ValueError(
                f"{name}: {shape} does not fit {synapse}, a Linear with {fan_in} input features"
                + ("" if block.flatten or len(shape) == 1 else " (and no Flatten before it)")
            )
    else:
        channels = fan_in * int(block.groups)
        if len(shape) != 3 or shape[0] != channels:
            raise ValueError(f"{name}: {shape} does not fit {synapse}, a Conv2d that takes "
                             f"({channels}, height, width)")  # fmt: skip
