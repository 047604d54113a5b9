"""Language models: the dense Transformer teacher; the MAR spiking SSM student and its dense twin
follow (spikemar.ssm). Each model reads in one sitting: a config dataclass, a few blocks, one
forward, and a recurrent ``step`` for generation."""

from .common import FeedForward, SpikeConfig, SpikePoint
from .generation import generate
from .mar import MARLM, ActivationSparsifier, MARConfig
from .transformer import KVCache, TransformerConfig, TransformerLM

__all__ = [
    "MARLM",
    "ActivationSparsifier",
    "FeedForward",
    "KVCache",
    "MARConfig",
    "SpikeConfig",
    "SpikePoint",
    "TransformerConfig",
    "TransformerLM",
    "generate",
]
