"""Reference implementations that tests compare spikemar against (not test modules)."""
