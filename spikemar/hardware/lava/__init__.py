"""The Lava side of spikemar's export: numpy, h5py and lava only, no PyTorch (see
:mod:`spikemar.hardware.lava.runtime`). Nothing is imported here, so that importing
``spikemar.hardware.lava.atmn`` loads lava and nothing else."""
