"""spikemar: spiking language models after MAR (arXiv 2601.21503).

One home per concept (README, Layout):

- ``neurons``: ATMN and its baselines, surrogates, the functional form and the backends;
- ``ssm``: the selective scan, the mixers (the ``Mixer`` interface), RMSNorm, ``Linear``;
- ``models``: the MAR LM, its dense twin, hybrids, the Transformer teacher, generation,
  pretrained Mamba-2/Llamba (``from_pretrained``), the mixer kinds' table;
- ``energy``: the SOP/energy counter, hardware profiles, reports; ``counting``: the neutral hooks
  that models call to tell a counter what they do;
- ``viz``: rasters, firing rates, membrane traces;
- ``distill``: the SBDS loss and the two-stage trainer; ``training``: the training loop;
  ``data``: corpora and token caches; ``tokenizer``: character and BPE tokenizers;
  ``checkpoint``: saving and loading models; ``convert``: spike points into a pretrained model;
- ``hardware``: Loihi fixed point, Lava and NIR export, the chip report;
- ``eval``: lm-evaluation-harness model, perplexity, the accuracy-vs-energy table;
- ``refine``: module-aware refinement (measure, plan, build the student).

``import spikemar`` imports none of them; ``spikemar.energy`` (or ``from spikemar import
energy``) imports that one when first named.
"""

__version__ = "0.1.0"

_SUBMODULES = (
    "checkpoint",
    "convert",
    "counting",
    "data",
    "distill",
    "energy",
    "eval",
    "hardware",
    "models",
    "neurons",
    "refine",
    "ssm",
    "tokenizer",
    "training",
    "viz",
)
# not the sub-packages: `from spikemar import *` would import all of them (lm_eval, Lava's
# tools) and bind `eval` over the builtin
__all__ = ["__version__"]


def __getattr__(name: str):
    if name in _SUBMODULES:  # PEP 562: imported on first use, as `from spikemar import x` does
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_SUBMODULES})
