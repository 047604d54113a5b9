"""spikemar: spiking language models after MAR (arXiv 2601.21503).

Sub-packages: ``neurons`` (ATMN and baselines), ``viz`` (rasters, firing rates, membranes);
``ssm``, ``models``, ``distill``, ``energy`` and ``hardware`` follow the plan in DESIGN.md §2.
"""

__version__ = "0.1.0"
