import importlib.util
import os
import sys
from pathlib import Path

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

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def load_script():
    """Import a script of the repository (``benchmarks/x.py``, ``examples/x.py``) by its path.

    The module is registered in ``sys.modules`` under its file's stem while the session runs
    (dataclasses look their module up by name) and removed at the end.
    """
    loaded: list[str] = []

    def load(relative: str):
        path = REPO_ROOT / relative
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = module
        loaded.append(path.stem)
        spec.loader.exec_module(module)
        return module

    yield load
    for name in loaded:
        sys.modules.pop(name, None)


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


# -- shared fixtures (tests never import each other: what several modules need lives here) ------


@pytest.fixture(scope="session")
def lava():
    """The Lava environment's Python (``bash .ci/lava-env``): skipped without it on a developer's
    machine, a failure under CI, where .ci/run builds it first."""
    from spikemar.hardware import LavaUnavailableError, lava_python

    try:
        return lava_python()
    except LavaUnavailableError as err:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the Lava tests: {err}")
        pytest.skip(str(err))


def _thresholds_near_weights(model, gen: torch.Generator):
    """Thresholds between 0.6 and 1.8 × the block's largest weight, so that layers fire."""
    from torch import nn

    from spikemar.neurons import ATMN

    weight = None
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear | nn.Conv2d):
                weight = m.weight
            if isinstance(m, ATMN):
                factor = 0.6 + 1.2 * torch.rand(m.a.shape, generator=gen)
                m.a.copy_(torch.log(factor * weight.abs().max()))
    return model


def _random_network(kind: str, seed: int):
    """``(model, input_shape)``: a small block network of ``kind`` with seeded weights."""
    from torch import nn

    from spikemar.hardware import CUBALIF
    from spikemar.neurons import ATMN, BinaryMultiStep, TernarySingleStep
    from spikemar.ssm.mixer import LTICell

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    if kind == "dense-ternary":
        model = nn.Sequential(
            nn.Linear(12, 24, bias=False), ATMN(2.0, num_channels=24),
            nn.Linear(24, 10), ATMN(1.5),
        )  # fmt: skip
        shape = (12,)
    elif kind == "dense-binary":
        model = nn.Sequential(
            nn.Linear(12, 24), BinaryMultiStep(2.0, num_channels=24),
            nn.Linear(24, 10, bias=False), BinaryMultiStep(1.0),
        )  # fmt: skip
        shape = (12,)
    elif kind == "dense-lti":
        model = nn.Sequential(
            nn.Linear(12, 24, bias=False), LTICell(24), ATMN(2.0, num_channels=24),
            nn.Linear(24, 10, bias=False), LTICell(10), BinaryMultiStep(2.0),
        )  # fmt: skip
        shape = (12,)
    elif kind == "conv-ternary":
        model = nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1, bias=False), ATMN(2.0),
            nn.Conv2d(4, 4, 3, stride=2, bias=False), TernarySingleStep(),
            nn.Flatten(), nn.Linear(4 * 2 * 2, 6, bias=False), ATMN(3.0, num_channels=6),
        )  # fmt: skip
        shape = (2, 6, 6)
    elif kind == "conv-binary":
        model = nn.Sequential(
            nn.Conv2d(2, 3, (3, 2), padding=(1, 0), bias=False), BinaryMultiStep(2.0),
            nn.Flatten(), nn.Linear(3 * 5 * 4, 6, bias=False), BinaryMultiStep(2.0),
        )  # fmt: skip
        shape = (2, 5, 5)
    elif kind == "cuba-mixed":
        model = nn.Sequential(
            nn.Linear(12, 24, bias=False), ATMN(2.0, num_channels=24),
            nn.Linear(24, 16, bias=False), CUBALIF(0.25, 0.1, 0.3),
            nn.Linear(16, 8, bias=False), ATMN(1.0),
        )  # fmt: skip
        shape = (12,)
    else:  # cuba-only
        model = nn.Sequential(
            nn.Linear(12, 16, bias=False), CUBALIF(0.5, 0.05, 0.4),
            nn.Linear(16, 8, bias=False), CUBALIF(1.0, 0.2, 0.3),
        )  # fmt: skip
        shape = (12,)
    return _thresholds_near_weights(model, gen), shape


def _random_inputs(shape, ternary: bool, seed: int, steps: int = 120) -> torch.Tensor:
    """[steps, *shape] spike payloads, 30 % active: {-1, 0, 1} (ternary) or {0, 1}."""
    gen = torch.Generator().manual_seed(seed)
    active = torch.rand(steps, *shape, generator=gen) < 0.3
    sign = torch.where(torch.rand(steps, *shape, generator=gen) < 0.5, -1.0, 1.0)
    return active * (sign if ternary else 1.0)


@pytest.fixture
def random_network():
    """``random_network(kind, seed) -> (model, input_shape)``: the hardware tests' networks."""
    return _random_network


@pytest.fixture
def random_inputs():
    """``random_inputs(shape, ternary, seed, steps=120)``: random spike payloads."""
    return _random_inputs


def _interrupt_in_step_3(monkeypatch, where: str, draws_before: int = 0) -> None:
    """Raise KeyboardInterrupt in the third training step: right after its batch was drawn (the
    handler must give the batch back) or right after its update (the handler must complete the
    step). ``draws_before``: 'train' batches drawn before the first step (a teacher's eval)."""
    from spikemar.data import TokenDataset

    calls = {"n": 0}
    if where == "after the batch":
        original = TokenDataset.batch

        def batch(self, split, *args, **kwargs):
            out = original(self, split, *args, **kwargs)
            if split == "train":
                calls["n"] += 1
                if calls["n"] == draws_before + 3:
                    raise KeyboardInterrupt
            return out

        monkeypatch.setattr(TokenDataset, "batch", batch)
    else:
        original = torch.optim.lr_scheduler.LambdaLR.step

        def step(self, *args, **kwargs):
            original(self, *args, **kwargs)
            calls["n"] += 1
            if calls["n"] == 4:  # once at construction, then steps 1, 2, 3
                raise KeyboardInterrupt

        monkeypatch.setattr(torch.optim.lr_scheduler.LambdaLR, "step", step)


@pytest.fixture
def interrupt_in_step_3():
    """``interrupt_in_step_3(monkeypatch, where, draws_before=0)``: a Ctrl-C inside step 3."""
    return _interrupt_in_step_3


@pytest.fixture
def saved_figures(monkeypatch):
    """The matplotlib figures that ``spikemar.viz.save_figure`` saves during the test (still
    written to their paths), in order: for tests that read a plot's axes and labels."""
    import spikemar.viz

    figures = []
    real = spikemar.viz.save_figure

    def keep(fig, path, **kwargs):
        figures.append(fig)
        return real(fig, path, **kwargs)

    monkeypatch.setattr(spikemar.viz, "save_figure", keep)
    return figures
