"""Language models: the dense Transformer teacher; the MAR spiking SSM student and its dense twin
(spikemar.ssm); Hugging Face Mamba-2 and Llamba read into the same classes
(:mod:`spikemar.models.pretrained`). Each model reads in one sitting: a config dataclass, a few
blocks, one forward, and a recurrent ``step`` for generation. A layer's mixer is one of the
kinds registered in :data:`spikemar.models.mixers.MIXERS`."""

from ..ssm.norm import RMSNorm
from .common import FeedForward, LlamaMLP, SpikeConfig, SpikePoint
from .generation import generate
from .hub import from_pretrained
from .mar import MARLM, ActivationSparsifier, MARConfig
from .mixers import MIXERS, AttentionMixer, AttentionState, register_mixer
from .transformer import KVCache, TransformerConfig, TransformerLM

__all__ = [
    "MARLM",
    "MIXERS",
    "ActivationSparsifier",
    "AttentionMixer",
    "AttentionState",
    "FeedForward",
    "KVCache",
    "LlamaMLP",
    "MARConfig",
    "RMSNorm",
    "SpikeConfig",
    "SpikePoint",
    "TransformerConfig",
    "TransformerLM",
    "from_pretrained",
    "generate",
    "register_mixer",
]
