import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# CI runs a fixed, derandomised set of examples so that a red build is reproducible; locally
# hypothesis explores new examples on every run.
settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    max_examples=60,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", deadline=None, max_examples=100)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# A few lines of Romeo and Juliet, repeated: a corpus big enough to split 90/10 and train on for
# a few steps (its 27 characters are the vocabulary).
ROMEO = "O Romeo, Romeo! wherefore art thou Romeo?\nDeny thy father and refuse thy name;\n" * 30


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    """``ROMEO`` as a text file, with HOME (and so the token cache under ~/.cache) in tmp_path."""
    monkeypatch.setenv("HOME", str(tmp_path))
    path = tmp_path / "romeo.txt"
    path.write_text(ROMEO)
    return path
